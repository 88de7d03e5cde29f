"""m9 evaluate as a stage of the contract, on a small ingest and embed output written here with pyarrow
(no engines): its manifest, reuse, refusal naming the change, --overwrite, and the raw-pixel baseline's
decode budget."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from m9.errors import InputError
from m9.stages import contract, lifecycle
from m9.stages.evaluate import EvaluateConfig, evaluate, result
from m9.stages.lifecycle import Manifest


def _png(colour, side: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def work(tmp_path):
    """images/ and embed/ of 12 images of 2 labels (Training and Test); one image is 1200x1200 (5.5 MB to
    decode, above a 1 MB budget)."""
    rows = []
    for label, colour in (("dark", (20, 20, 20)), ("light", (230, 230, 230))):
        for i in range(6):
            split = "Training" if i < 4 else "Test"
            content = _png(colour, 1200 if (label, i) == ("light", 5) else 32)
            rows.append((f"{label}-{i}", f"/x/{split}/{label}/{i}.png", label, split, content))
    ids, paths, labels, splits, contents = (list(c) for c in zip(*rows))
    images, embed = tmp_path / "w" / contract.INGEST.folder, tmp_path / "w" / contract.EMBED.folder
    images.mkdir(parents=True)
    pq.write_table(
        pa.table({"image_id": ids, "path": paths, "label": labels, "split": splits, "content": contents}),
        images / "part-0.parquet",
    )
    lifecycle.write_manifest(str(images), Manifest(stage="ingest", input="/x", fingerprint={"i": 1}, counts={}))
    features = np.zeros((len(ids), 1280), np.float32)
    features[np.array(labels) == "dark", :640] = 1
    features[np.array(labels) == "light", 640:] = 1
    features += np.random.default_rng(0).normal(0, 0.01, features.shape).astype(np.float32)
    (embed / contract.EMBEDDINGS).mkdir(parents=True)
    table = pa.table(
        {
            "image_id": ids,
            "path": paths,
            "label": labels,
            "split": splits,
            "features": pa.FixedSizeListArray.from_arrays(pa.array(features.ravel()), 1280),
        }
    )
    pq.write_table(table, embed / contract.EMBEDDINGS / "part-0.parquet")
    print_ = {"input": lifecycle.input_identity(str(images)), "e": 1}
    lifecycle.write_manifest(str(embed), Manifest(stage="embed", input=str(images), fingerprint=print_, counts={}))
    return tmp_path / "w"


def test_evaluate_leaves_out_what_does_not_decode_and_is_reused_refused_or_redone(work):
    out = str(work / contract.EVALUATE.folder)
    cfg = EvaluateConfig(input=str(work / contract.EMBED.folder), output=out, decode_memory_mb=1)
    first = evaluate(cfg)
    assert not first.skipped and first.counts["raw_left_out"] == 1
    scored = result(out)
    assert scored["raw_left_out"] == 1 and scored["counts"]["scored"] == 4
    # Raw pixels score the 3 Test images that decode; the full space all 4.
    assert sum(sum(row) for row in scored["spaces"][contract.RAW_SPACE]["confusion"]) == 3
    assert sum(sum(row) for row in scored["spaces"][contract.FULL_SPACE]["confusion"]) == 4
    assert scored["accuracy"][contract.RAW_SPACE] == 1.0  # a row of zeros would have been "dark"
    manifest = json.loads((work / contract.EVALUATE.folder / contract.MANIFEST).read_text())
    assert manifest["stage"] == "evaluate" and manifest["input"] == f"../{contract.EMBED.folder}"

    assert evaluate(cfg).skipped
    other = EvaluateConfig(input=cfg.input, output=out, decode_memory_mb=1, neighbors=3)
    with pytest.raises(InputError, match=r"made differently \(neighbors 5 → 3\); pass --overwrite"):
        evaluate(other)
    assert result(out)["neighbors"] == 5  # refused means untouched
    redone = evaluate(EvaluateConfig(input=cfg.input, output=out, neighbors=3, overwrite=True))
    assert not redone.skipped and result(out)["neighbors"] == 3 and result(out)["raw_left_out"] == 0


def test_m9_evaluate_refuses_a_change_in_one_line_and_redoes_with_overwrite(work):
    from m9.cli import main

    args = ["evaluate", "--input", str(work / contract.EMBED.folder), "--output", str(work / "e")]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert "already done" in CliRunner().invoke(main, args).output
    refused = CliRunner().invoke(main, [*args, "--neighbors", "3"])
    assert refused.exit_code == 1 and refused.output.startswith("Error: ") and refused.output.count("\n") == 1
    assert "neighbors 5 → 3" in refused.output
    redone = CliRunner().invoke(main, [*args, "--neighbors", "3", "--overwrite"])
    assert redone.exit_code == 0 and "3-NN accuracy" in redone.output and "already done" not in redone.output


def test_accuracy_without_leaked_images_is_that_of_a_knn_scored_on_the_others(monkeypatch):
    import pandas as pd

    from m9.neighbors import duplicates
    from m9.stages import evaluate as ev

    rng = np.random.default_rng(3)
    labels = np.array([f"l{i % 3}" for i in range(60)])
    x = rng.normal(size=(60, 4)) + np.repeat(np.arange(3)[None], 20, 0).T.ravel()[:, None] * 0.8
    frame = pd.DataFrame({"image_id": [f"id{i:02d}" for i in range(60)]})
    train, test = np.arange(0, 40), np.arange(40, 60)
    leaked = {"id41", "id47", "id55"}
    monkeypatch.setattr(duplicates, "read_output", lambda found: found)
    monkeypatch.setattr(duplicates, "leaked_test_ids", lambda table: leaked)
    keep_raw = np.ones(60, bool)
    keep_raw[[3, 44, 50]] = False  # images the raw baseline could not decode
    scored_rows, hits = {}, {}
    for name, keep in (("full", None), ("raw", keep_raw)):
        within = ev._within([(train, test)], keep)
        true, pred = ev.knn_predict(x, labels, within, 5)
        scored_rows[name], hits[name] = np.concatenate([t for _, t in within]), true == pred
    honest = ev._without_leaked("dups", frame, [(train, test)], scored_rows, hits)
    assert honest["leaked_test_images"] == 3 and honest["scored"] == 17
    for name, keep in (("full", None), ("raw", keep_raw)):
        kept = np.array([i for i in test if frame["image_id"][i] not in leaked])
        true, pred = ev.knn_predict(x, labels, ev._within([(train, kept)], keep), 5)
        assert honest["accuracy"][name] == float(np.mean(true == pred))
