"""The pipeline end to end on real Spark, Ray, TensorFlow and weights: counts, equality with Keras and numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from tests.conftest import SAMPLE, TEST_K

#: Every test here reads the suite's one pipeline run (Spark, Ray, TensorFlow).
pytestmark = pytest.mark.slow

BAD = {"truncated.jpg", "empty.jpg", "notes.png"}


def _table(folder: str, sub: str = ""):
    return pq.read_table(str(Path(folder, sub)) if sub else folder).to_pandas()


def test_counts_reconcile_at_every_stage(pipeline, images_tree):
    files = [p for p in images_tree.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    ingested = _table(pipeline["dirs"]["images"])
    embedded = _table(pipeline["dirs"]["embed"], "embeddings")
    errors = _table(pipeline["dirs"]["embed"], "errors")
    assert len(files) == 243
    assert pipeline["ingest"].counts["files_found"] == len(files) == len(ingested)
    assert len(ingested) == len(embedded) + len(errors)
    assert pipeline["embed"].counts == {
        **pipeline["embed"].counts,
        "embedded": 240,
        "rejected": 3,
        "rows_in": 243,
    }
    assert ingested["image_id"].is_unique
    assert set(embedded["image_id"]).isdisjoint(errors["image_id"])
    assert set(embedded["image_id"]) | set(errors["image_id"]) == set(ingested["image_id"])
    pca = _table(pipeline["dirs"]["reduce"], "pca")
    assert sorted(pca["image_id"]) == sorted(embedded["image_id"])
    # The COPYING and NOTICE.md files are not images: ignored, and counted as such.
    assert pipeline["ingest"].counts["ignored_files"] == 2


def test_labels_splits_and_ids_follow_the_folders(pipeline, images_tree):
    ingested = _table(pipeline["dirs"]["images"])
    for row in ingested.itertuples():
        rel = Path(row.path).relative_to(images_tree)
        assert row.label == rel.parent.name
        assert row.split == rel.parts[0]
        assert row.relative_path == rel.as_posix()
        assert row.size == (images_tree / rel).stat().st_size
    assert set(ingested["split"]) == {"Training", "Test"}
    assert len(set(ingested["label"])) == 49  # 48 sample labels + broken/


def test_image_ids_are_stable_across_reruns_and_roots(pipeline, images_tree, tmp_path, spark):
    from m9.config import IngestConfig
    from m9.stages.ingest import ingest

    moved = tmp_path / "elsewhere"
    (moved / "Test").mkdir(parents=True)
    import shutil

    shutil.copytree(images_tree / "Test", moved / "Test", dirs_exist_ok=True)
    ingest(IngestConfig(input=str(moved), output=str(tmp_path / "out")))
    again = _table(str(tmp_path / "out")).set_index("relative_path")["image_id"]
    first = _table(pipeline["dirs"]["images"]).set_index("relative_path")["image_id"]
    assert len(again) == 96
    assert (first.loc[again.index] == again).all()


def test_bad_images_are_rejected_with_reasons(pipeline):
    errors = _table(pipeline["dirs"]["embed"], "errors")
    by_name = {Path(p).name: reason for p, reason in zip(errors["path"], errors["error"])}
    assert set(by_name) == BAD
    assert by_name["empty.jpg"] == "empty file"
    assert by_name["truncated.jpg"].startswith("cannot decode") and "truncated" in by_name["truncated.jpg"]
    assert by_name["notes.png"].startswith("cannot decode: UnidentifiedImageError")
    assert set(errors["label"]) == {"broken"}


def _reference_input(path: Path) -> np.ndarray:
    """The preprocessing spelled out independently: Pillow, EXIF, alpha on white, bilinear 224, x/127.5-1."""
    im = ImageOps.exif_transpose(Image.open(path))
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    white.alpha_composite(rgba)
    x = np.asarray(white.convert("RGB").resize((224, 224), Image.BILINEAR), dtype=np.float32)
    import keras

    return keras.applications.mobilenet_v2.preprocess_input(x)


def test_embeddings_equal_a_direct_keras_forward_pass(pipeline, weights_path):
    import keras

    assert pipeline["embed"].details["runtime"] == "onnx"  # the default path, ONNX Runtime, against Keras itself

    model = keras.applications.MobileNetV2(input_shape=(224, 224, 3), include_top=False, weights=None, pooling="avg")
    model.load_weights(str(weights_path))
    embedded = _table(pipeline["dirs"]["embed"], "embeddings").sort_values("image_id")
    inputs = np.stack([_reference_input(Path(p)) for p in embedded["path"]])
    expected = model.predict(inputs, batch_size=32, verbose=0)
    got = np.stack(embedded["features"].to_numpy()).astype(np.float32)
    assert got.shape == (240, 1280)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.isfinite(got).all() and got.std() > 0.1  # real features, not zeros


def test_pca_equals_numpy_on_the_same_matrix(pipeline):
    embedded = _table(pipeline["dirs"]["embed"], "embeddings").sort_values("image_id")
    x = np.stack(embedded["features"].to_numpy()).astype(np.float64)
    centered = x - x.mean(axis=0)
    eigvals, eigvecs = np.linalg.eigh(np.cov(centered, rowvar=False))
    order = np.argsort(eigvals)[::-1]
    eigvals, eigvecs = eigvals[order], eigvecs[:, order]
    report = json.loads(Path(pipeline["dirs"]["reduce"], "variance.json").read_text())
    ratios = np.array(report["explained_variance_ratio"])
    np.testing.assert_allclose(ratios, eigvals[:TEST_K] / eigvals.sum(), rtol=1e-6)
    np.testing.assert_allclose(report["cumulative"], np.cumsum(ratios), rtol=1e-9)

    pca = _table(pipeline["dirs"]["reduce"], "pca").set_index("image_id").loc[embedded["image_id"]]
    got = np.stack(pca["pca"].to_numpy()).astype(np.float64)
    expected = centered @ eigvecs[:, :TEST_K]
    signs = np.sign((got * expected).sum(axis=0))
    np.testing.assert_allclose(got * signs, expected, atol=1e-3 * np.abs(expected).max())


def test_csv_and_variance_report(pipeline):
    lines = Path(pipeline["dirs"]["reduce"], "pca.csv").read_text().splitlines()
    assert lines[0] == "image_id,path,label,split," + ",".join(f"pc_{i}" for i in range(1, TEST_K + 1))
    assert len(lines) == 1 + 240
    report = json.loads(Path(pipeline["dirs"]["reduce"], "variance.json").read_text())
    assert report["k"] == TEST_K and report["centered"] is True
    for threshold, k in report["smallest_k_reaching"].items():
        if k is not None:
            assert report["cumulative"][k - 1] >= int(threshold.rstrip("%")) / 100
            assert k == 1 or report["cumulative"][k - 2] < int(threshold.rstrip("%")) / 100


def test_each_actor_loads_the_model_once(pipeline):
    assert pipeline["embed"].counts["model_loads"] == 2


def test_rerun_skips_finished_stages_and_refuses_foreign_output(pipeline, spark, ray_local):
    from m9.config import EmbedConfig, IngestConfig
    from m9.errors import InputError
    from m9.stages.embed import embed
    from m9.stages.ingest import ingest

    again = embed(EmbedConfig(input=pipeline["dirs"]["images"], output=pipeline["dirs"]["embed"], actors=2))
    assert again.skipped is True
    with pytest.raises(InputError, match="holds the output of `m9 embed`"):
        ingest(IngestConfig(input=str(SAMPLE), output=pipeline["dirs"]["embed"]))


def test_spark_stages_run_on_a_multi_executor_master(pipeline, tmp_path):
    """ingest and reduce under local-cluster[2,1,1024] (separate executor JVMs) give the local results."""
    import subprocess
    import sys

    script = f"""
from m9.config import IngestConfig, ReduceConfig
from m9.stages.ingest import ingest
from m9.stages.reduce import reduce
from m9.engines import spark as s
with s.session("m9-cluster-test", master="local-cluster[2,1,1024]") as spark:
    assert spark.sparkContext.master.startswith("local-cluster")
    ingest(IngestConfig(input={pipeline["ingest"].input!r}, output={str(tmp_path / "images")!r}, images_per_file=100))
    reduce(ReduceConfig(input={pipeline["dirs"]["embed"]!r}, output={str(tmp_path / "reduce")!r}, k={TEST_K}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cluster = _table(str(tmp_path / "images")).sort_values("image_id").reset_index(drop=True)
    local = _table(pipeline["dirs"]["images"]).sort_values("image_id").reset_index(drop=True)
    assert cluster[["image_id", "path", "label", "split", "sha256"]].equals(
        local[["image_id", "path", "label", "split", "sha256"]]
    )
    a = json.loads(Path(tmp_path, "reduce", "variance.json").read_text())["explained_variance_ratio"]
    b = json.loads(Path(pipeline["dirs"]["reduce"], "variance.json").read_text())["explained_variance_ratio"]
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_an_interrupted_reduce_resumes(pipeline, spark, tmp_path):
    """Killed after writing pca/ but before its manifest: the same command finishes it (it was refused
    as 'files m9 did not write (e.g. pca)' before the stage contract listed reduce's own files)."""
    import shutil

    from m9.config import ReduceConfig
    from m9.stages.reduce import reduce

    out = tmp_path / "reduce"
    shutil.copytree(pipeline["dirs"]["reduce"], out)
    for name in ("_m9.json", "pca.csv", "variance.json"):
        (out / name).unlink()
    result = reduce(ReduceConfig(input=pipeline["dirs"]["embed"], output=str(out), k=TEST_K))
    assert not result.skipped and result.counts == {"rows": 240}
    again, before = (
        _table(folder, "pca").sort_values("image_id").reset_index(drop=True)
        for folder in (str(out), pipeline["dirs"]["reduce"])
    )
    assert list(again["image_id"]) == list(before["image_id"])
    a, b = np.stack(again["pca"].to_numpy()), np.stack(before["pca"].to_numpy())
    signs = np.sign((a * b).sum(axis=0))  # a component's sign is arbitrary (and may differ between fits)
    np.testing.assert_allclose(a * signs, b, atol=1e-4 * np.abs(b).max())


def test_a_finished_output_made_differently_is_refused_naming_the_change(pipeline, weights_path, tmp_path):
    """--k 5 after k 12 no longer deletes the earlier output without a word; --weights other.h5 on a finished
    embed output no longer says 'already done' and keeps the old features. Both are refused untouched."""
    import shutil

    from m9.config import EmbedConfig, ReduceConfig
    from m9.errors import InputError
    from m9.stages.embed import embed
    from m9.stages.reduce import reduce

    before = Path(pipeline["dirs"]["reduce"], "pca.csv").read_text()
    with pytest.raises(InputError, match=rf"made differently \(k {TEST_K} → 5\); pass --overwrite"):
        reduce(ReduceConfig(input=pipeline["dirs"]["embed"], output=pipeline["dirs"]["reduce"], k=5))
    assert Path(pipeline["dirs"]["reduce"], "pca.csv").read_text() == before

    from m9.model.keras_model import load_model

    model = load_model(str(weights_path))
    arrays = model.get_weights()
    model.set_weights([arrays[0] + 1e-3, *arrays[1:]])  # other weights: one array nudged
    other = tmp_path / "other.weights.h5"
    model.save_weights(str(other))
    same = tmp_path / "same.weights.h5"  # the verified arrays in another file: the same weights
    shutil.copy(weights_path, same)
    assert embed(
        EmbedConfig(input=pipeline["dirs"]["images"], output=pipeline["dirs"]["embed"], weights=str(same))
    ).skipped
    with pytest.raises(InputError, match=r"made differently \(weights c009b1f1262c… → "):
        embed(EmbedConfig(input=pipeline["dirs"]["images"], output=pipeline["dirs"]["embed"], weights=str(other)))
    assert json.loads(Path(pipeline["dirs"]["embed"], "_m9.json").read_text())["counts"]["embedded"] == 240


def test_a_second_writer_of_the_same_output_is_refused(pipeline, tmp_path):
    import signal
    import subprocess
    import sys

    from click.testing import CliRunner

    from m9.cli import main

    out = tmp_path / "embed"
    hold = "import sys, time\nfrom m9.io import lease\nwith lease.hold(sys.argv[1], 'embed'):\n"
    hold += "    print('held', flush=True)\n    time.sleep(600)\n"
    first = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        result = CliRunner().invoke(main, ["embed", "--input", pipeline["dirs"]["images"], "--output", str(out)])
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {out} is being written by `m9 embed` (pid {first.pid} on ")
    assert result.output.count("\n") == 1 and not list(out.glob("embeddings/*"))


def test_a_moved_or_copied_workdir_reuses_every_stage(pipeline, images_tree, tmp_path, ray_local):
    """The manifests name their inputs relative to themselves (`../embed`): a workdir moved after a run
    reruns without a traceback (it was FileNotFoundError: …/w/embed/embeddings) and recomputes nothing."""
    import shutil

    from m9.stages.pipeline import RunConfig, run

    work = tmp_path / "w"
    for folder in pipeline["dirs"].values():
        shutil.copytree(folder, work / Path(folder).name)  # a copied workdir
    settings = {"ingest": {"images_per_file": 100}, "embed": {"actors": 2, "batch_size": 8}, "reduce": {"k": TEST_K}}
    first = run(RunConfig(input=str(images_tree), workdir=str(work), settings=settings))
    assert all(first.stages[name].skipped for name in ("ingest", "embed", "reduce"))
    moved = tmp_path / "moved"
    work.rename(moved)
    again = run(RunConfig(input=str(images_tree), workdir=str(moved), settings=settings))
    assert {name: m.skipped for name, m in again.stages.items()} == dict.fromkeys(again.stages, True)
    assert again.evaluation["accuracy"] == first.evaluation["accuracy"]
    assert Path(again.report).parent.parent == moved
