"""m9 bench on a few images: every engine runs, the JSON has every field, the engines agree."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from m9.bench import ENGINES, FEATURE_ENGINES, BenchConfig, bench, scaling
from m9.cli import main
from tests.conftest import SAMPLE

#: Few images, one ceiling configuration: the point is that every engine runs and agrees, not its speed.
IMAGES = 24

ENGINE_FIELDS = {"steady_img_per_s", "wall_s", "first_row_s", "model_loads", "peak_rss_mb", "cpu_util", "knobs"}


@pytest.fixture(scope="module")
def result(spark, ray_local, weights_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(output=str(out), limit=IMAGES, ceiling_batches=(8,), ceiling_images=16, ceiling_configs=((1, 1),))
    lines: list[str] = []
    return {"out": out, "result": bench(cfg, progress=lines.append), "lines": lines}


@pytest.mark.slow
def test_json_has_every_field(result):
    data = json.loads((result["out"] / "bench.json").read_text())
    assert {"machine", "images", "engines", "agree", "max_abs_diff"} <= set(data)
    assert {"cpu_model", "cores", "memory_gb", "versions", "loadavg_start", "loadavg_end"} <= set(data["machine"])
    assert data["images"] == IMAGES
    assert set(data["engines"]) == set(ENGINES)
    for name, engine in data["engines"].items():
        assert ENGINE_FIELDS <= set(engine), name
        assert engine["steady_img_per_s"] > 0, name
        assert engine["wall_s"] >= engine["first_row_s"] >= 0, name
        assert engine["peak_rss_mb"] > 0, name
    for name in FEATURE_ENGINES:
        assert data["engines"][name]["model_loads"] >= 1, name
        assert data["engines"][name]["knobs"]["batch_size"] >= 1, name
    assert data["engines"]["spark-udf"]["knobs"]["arrow_batch_size"] > 0
    # The seed's UDF as a notebook leaves it: Keras predict's batch, Spark's Arrow batch, TensorFlow's threads.
    assert data["engines"]["spark-udf-defaults"]["knobs"] == {
        "tasks": data["engines"]["spark-udf"]["knobs"]["tasks"],
        "threads_per_task": "tf-default",
        "batch_size": 32,
        "arrow_batch_size": 10_000,
    }


@pytest.mark.slow
def test_engines_agree(result):
    data = result["result"]
    assert data["agree"] is True
    assert data["max_abs_diff"] <= 1e-4
    assert set(data["max_abs_diff_by_engine"]) == set(FEATURE_ENGINES)


@pytest.mark.slow
def test_reports_and_progress(result):
    md = (result["out"] / "bench.md").read_text()
    for name in ENGINES:
        assert f"| {name} |" in md
    assert "× ceiling" in md and "× spark-udf" in md and "Engines agree: **yes**" in md
    assert (result["out"] / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # One line before and one after each engine.
    assert sum(line.startswith("[") for line in result["lines"]) == 2 * len(ENGINES)


@pytest.mark.slow
def test_scaling_writes_a_row_per_size(spark, ray_local, weights_path, tmp_path):
    out = scaling(BenchConfig(output=str(tmp_path)), [8])
    assert [row["images"] for row in out["sizes"]] == [8]
    assert {"steady_ms_per_image", "wall_ms_per_image", "peak_rss_mb"} <= set(out["sizes"][0])
    assert "| 8 |" in (tmp_path / "scaling.md").read_text()


def test_cli_rejects_unknown_engine(tmp_path):
    res = CliRunner().invoke(main, ["bench", "--engines", "ray,gpu", "--output", str(tmp_path)])
    assert res.exit_code == 1
    assert "unknown engine(s) gpu" in res.output


def test_cli_rejects_bad_scaling(tmp_path):
    res = CliRunner().invoke(main, ["bench", "--scaling", "1000,x"])
    assert res.exit_code == 2
    assert "comma-separated whole numbers" in res.output


def test_steady_rate_counts_bursts_once():
    import numpy as np

    from m9.bench import steady_rate

    assert steady_rate(np.arange(1000) / 70.0) == pytest.approx(70.0)
    # Two workers returning 64-row blocks together every 2 s: 64 rows/s, not the 128 that indexing the
    # sorted rows would claim when the 20 % mark falls inside the first pair of blocks.
    bursts = np.repeat([2.0, 2.001, 4.0, 4.001, 6.0, 6.001, 8.0, 8.001], 64)
    assert steady_rate(bursts) == pytest.approx(64.0, rel=0.01)


@pytest.mark.slow
def test_embed_stamped_keeps_rows_in_place(weights_path):
    """The Spark UDF's per-forward-batch timing: rows keep their places, a broken image gets zeros and a time."""
    import numpy as np

    from m9.bench.spark_engines import _embed_stamped
    from m9.model import Embedder

    good = sorted(SAMPLE.rglob("*.jpg"))[:3]
    contents = [good[0].read_bytes(), b"not an image", good[1].read_bytes(), good[2].read_bytes()]
    embedder = Embedder(str(weights_path), threads=1, batch_size=2)
    features, done_at = _embed_stamped(embedder, contents)
    expected, errors = embedder.embed(contents)
    assert errors[1] is not None and errors[0] is errors[2] is errors[3] is None
    np.testing.assert_allclose(features, expected, atol=1e-5)
    assert not features[1].any() and all(features[i].any() for i in (0, 2, 3))
    # Two forward batches (rows 0, 2 then row 3), each stamped when it finished; the broken row at the end.
    assert done_at[0] == done_at[2] <= done_at[3] <= done_at[1]
