"""m9 evaluate and m9 report on the suite's pipeline run; the report opened in headless Chromium."""

from __future__ import annotations

import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from m9.errors import InputError
from m9.stages.evaluate import _protocol, grey_pixels, scores

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_scores_count_accuracy_recall_and_confusions():
    true = np.array(["a", "a", "a", "b", "b", "c"])
    pred = np.array(["a", "b", "b", "b", "b", "a"])
    s = scores(true, pred, ["a", "b", "c"])
    assert s["accuracy"] == pytest.approx(3 / 6)
    assert s["recall"] == pytest.approx({"a": 1 / 3, "b": 1.0, "c": 0.0})
    assert s["most_confused"][0] == {"true": "a", "predicted": "b", "count": 2}
    assert s["confusion"] == [[1, 2, 0], [0, 2, 0], [1, 0, 0]]


def test_protocol_uses_the_split_else_stratified_folds():
    labels = np.array(["a", "b"] * 6)
    described, folds = _protocol(np.array(["Training"] * 8 + ["Test"] * 4, dtype=object), labels)
    assert described == "trained on Training, scored on Test"
    assert [len(te) for _, te in folds] == [4]
    described, folds = _protocol(np.array([None] * 12, dtype=object), labels)
    assert described.startswith("5-fold stratified")
    scored = np.concatenate([te for _, te in folds])
    assert sorted(scored) == list(range(12))  # every image scored once


def test_grey_pixels_are_28x28_in_unit_range_and_nan_where_they_do_not_decode():
    buf = io.BytesIO()
    Image.fromarray(np.full((100, 100, 3), 255, np.uint8)).save(buf, "JPEG")
    large = io.BytesIO()
    Image.new("RGB", (1200, 1200), "white").save(large, "PNG")  # 5.5 MB to decode: above a 1 MB budget
    pixels = grey_pixels([buf.getvalue(), b"not an image", large.getvalue()], memory_mb=1)
    assert pixels.shape == (3, 784)
    assert pixels[0].min() > 0.95 and np.isnan(pixels[1:]).all()


def _reduce_only(tmp_path: Path) -> Path:
    """A workdir holding a finished reduce output of 12 images whose embed output is gone."""
    from m9.stages import contract, lifecycle
    from m9.stages.lifecycle import Manifest

    work = tmp_path / "work"
    reduce_dir = work / contract.REDUCE.folder
    (reduce_dir / contract.PCA_DIR).mkdir(parents=True)
    pca = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
    table = {
        "image_id": [f"i{i}" for i in range(12)],
        "label": ["a", "b"] * 6,
        "split": ["Training", "Test"] * 6,
        contract.PCA_COLUMN: pa.FixedSizeListArray.from_arrays(pa.array(pca.ravel()), 3).cast(pa.list_(pa.float32())),
    }
    pq.write_table(pa.table(table), reduce_dir / contract.PCA_DIR / "part-0.parquet")
    variance = {"k": 3, "explained_variance_ratio": [0.5, 0.3, 0.1], "cumulative": [0.5, 0.8, 0.9]}
    variance |= {"smallest_k_reaching": {"0.9": 3}, "total_explained": 0.9}
    (reduce_dir / contract.VARIANCE_NAME).write_text(json.dumps(variance))
    manifest = Manifest(stage="reduce", input=str(work / contract.EMBED.folder), fingerprint={}, counts={})
    lifecycle.write_manifest(str(reduce_dir), manifest)
    return work


def test_report_of_a_reduce_output_whose_embed_output_is_gone(tmp_path):
    from m9.stages import contract
    from m9.stages.report import page, report

    work = _reduce_only(tmp_path)
    assert report(str(work)).counts == {"figures": 3}  # scree, scatter, neighbours: no evaluation
    assert "principal components kept" in Path(page(str(work))).read_text()
    (work / contract.REDUCE.folder / contract.VARIANCE_NAME).unlink()
    with pytest.raises(InputError, match=f"has no {contract.VARIANCE_NAME}"):
        report(str(work), overwrite=True)


@pytest.fixture(scope="module")
def workdir(pipeline, tmp_path_factory) -> Path:
    """A copy of the suite's pipeline run (its folders are shared), evaluated."""
    from m9.stages.evaluate import EvaluateConfig, evaluate

    work = tmp_path_factory.mktemp("report") / "work"
    for name, folder in pipeline["dirs"].items():
        shutil.copytree(folder, work / name)  # the manifests name their inputs relative to themselves
    evaluate(EvaluateConfig(input=str(work / "reduce"), output=str(work / "evaluate")))
    return work


@pytest.mark.slow
def test_evaluate_scores_every_space_on_the_test_split(workdir):
    result = json.loads((workdir / "evaluate" / "evaluate.json").read_text())
    assert result["protocol"] == "trained on Training, scored on Test"
    assert result["counts"] == {"images": 240, "labels": 48, "train": 144, "scored": 96}
    assert result["raw_left_out"] == 0
    assert result["dims"] == {"full": 1280, "pca": 12, "raw": 784}
    assert set(result["accuracy"]) == {"pca", "full", "raw"}
    # MobileNetV2's features tell 48 fruits apart far better than 28x28 grey pixels do.
    assert result["accuracy"]["full"] > 0.8 > 0.5 > result["accuracy"]["raw"]
    assert len(result["spaces"]["pca"]["recall"]) == 48
    assert result["neighbors"] == 5


@pytest.mark.slow
def test_the_pca_space_keeps_the_full_spaces_accuracy(workdir):
    """Was 0.094 when Spark ML's PCA used its pure-Java LAPACK, which diagonalised the covariance wrongly."""
    result = json.loads((workdir / "evaluate" / "evaluate.json").read_text())
    assert result["accuracy"]["pca"] > 0.8


@pytest.mark.slow
def test_evaluate_an_embed_output_has_no_pca_space(workdir, tmp_path):
    from m9.stages.evaluate import EvaluateConfig, evaluate

    done = evaluate(EvaluateConfig(input=str(workdir / "embed"), output=str(tmp_path), neighbors=3))
    assert set(done.details["accuracy"]) == {"full", "raw"}
    assert done.details["neighbors"] == 3 and done.counts["raw_left_out"] == 0


def _check_in_chromium(page: Path, tmp_path: Path) -> dict:
    """Load a copy of page with a probe that records errors and undecoded images, and return its record."""
    probe = """<script>
    window.__errors = [];
    window.addEventListener('error',
      e => window.__errors.push(String(e.message || (e.target && e.target.src) || e)), true);
    const consoleError = console.error;
    console.error = (...a) => { window.__errors.push(a.join(' ')); consoleError(...a); };
    window.addEventListener('load', () => {
      const images = [...document.images];
      document.body.setAttribute('data-probe', JSON.stringify({
        images: images.length,
        undecoded: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
        errors: window.__errors,
      }));
    });
    </script>"""
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("<head>", "<head>" + probe, 1))
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            probed.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r'data-probe="([^"]*)"', done.stdout)
    assert match, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads(html.unescape(match.group(1)))
    record["console"] = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    return record


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (make tools installs Debian's chromium)")
def test_report_opens_in_a_browser_offline_with_every_image(workdir, tmp_path):
    from m9.stages.report import page, report

    assert not report(str(workdir)).skipped
    page = Path(page(str(workdir)))
    assert page == workdir / "report" / "report.html"
    text = page.read_text()
    assert not re.search(r'(src|href)="(https?:)?//', text)  # nothing to fetch: it must open offline
    for name in ("scree", "scatter", "neighbours", "evaluate"):
        assert (page.parent / f"{name}.png").stat().st_size > 1000
    assert "All 240 images are drawn" in text and "cannot decode" in text  # the broken files' reason
    record = _check_in_chromium(page, tmp_path)
    assert record["images"] == 4 and record["undecoded"] == [] and record["errors"] == [], record
    assert record["console"] == []
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1100,3000",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    grey = np.asarray(Image.open(shot).convert("L"))
    assert grey.std() > 20 and (grey < 200).mean() > 0.02  # text and figures, not a blank page


@pytest.mark.slow
def test_report_is_reused_until_its_inputs_change_and_redone_with_overwrite(workdir):
    from m9.stages import contract
    from m9.stages.report import report

    report(str(workdir))
    assert report(str(workdir)).skipped
    (workdir / contract.RUN_RECORD).write_text(json.dumps({"wall_s": {"ingest": 1.0}}))  # another run's record
    assert not report(str(workdir)).skipped  # written again: it has no settings to refuse a change of
    assert report(str(workdir)).skipped
    assert not report(str(workdir), overwrite=True).skipped
    (workdir / contract.RUN_RECORD).unlink()
    assert not report(str(workdir)).skipped
