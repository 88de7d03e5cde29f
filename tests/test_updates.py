"""A changed image tree updates its ingest and embed outputs: only what changed is read and computed, and the
result is what a fresh run on the changed tree gives (real Spark, Ray, ONNX Runtime and Parquet)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from m9.config import EmbedConfig, IngestConfig
from m9.errors import InputError
from m9.stages import contract, lifecycle
from m9.stages import ingest as ingest_stage
from m9.stages.contract import EMBEDDINGS, ERRORS, INGEST_INDEX, MANIFEST, PENDING
from m9.stages.embed import embed
from m9.stages.ingest import ingest
from tests.conftest import SAMPLE, write_bad_images

pytestmark = pytest.mark.slow

#: Small parts, so that a change touches some parts and leaves others as they were.
PER_FILE = 4

LABELS = ("kiwi", "onion", "lettuce", "broccoli")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Four labels of the bundled sample (Training/ and Test/, 20 images) and three broken files."""
    root = tmp_path_factory.mktemp("base")
    for split in ("Training", "Test"):
        for label in LABELS:
            shutil.copytree(SAMPLE / split / label, root / split / label)
    write_bad_images(root / "Training" / "broken")
    return root


def _tree(base: Path, where: Path) -> Path:
    shutil.copytree(base, where)  # copy2: the same sizes and mtimes as base
    return where


def _ingest(src: Path, out: Path, **kw):
    return ingest(IngestConfig(input=str(src), output=str(out), images_per_file=PER_FILE, **kw))


def _embed(src: Path, out: Path, store: str):
    return embed(EmbedConfig(input=str(src), output=str(out), actors=2, batch_size=8, store=store))


def _rows(folder: Path) -> list[dict]:
    """Every ingested row (pyarrow skips `_` files such as the index), by relative path."""
    return sorted(pq.read_table(folder).to_pylist(), key=lambda r: r["relative_path"])


def _parts(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("part-*.parquet")}


def _indexed(folder: Path) -> set[str]:
    return set(pq.read_table(folder / INGEST_INDEX).column("part").to_pylist())


def _features(folder: Path) -> dict[str, tuple[tuple, np.ndarray]]:
    table = pq.read_table(folder / EMBEDDINGS)
    vectors = contract.vectors(table, "features")
    meta = table.select(["image_id", "path", "label", "split"]).to_pylist()
    return {m["image_id"]: (tuple(m.values()), v) for m, v in zip(meta, vectors)}


def _errors(folder: Path) -> set[tuple]:
    return {tuple(r.values()) for r in pq.read_table(folder / ERRORS).to_pylist()}


def test_a_changed_tree_updates_ingest_and_embed_as_a_fresh_run_would(spark, ray_local, weights_path, base, tmp_path):
    tree, work, store = _tree(base, tmp_path / "tree"), tmp_path / "work", str(tmp_path / "store")
    _ingest(tree, work / "images")
    first = _embed(work / "images", work / "embed", store)
    before = _parts(work / "images")
    # Added (a new label, and an empty file), removed, renamed, and duplicated under a second name.
    shutil.copytree(SAMPLE / "Training" / "almond", tree / "Training" / "almond")
    (tree / "Training" / "kiwi" / "blank.jpg").write_bytes(b"")
    (tree / "Test" / "onion" / "onion_r060.jpg").unlink()
    (tree / "Test" / "lettuce" / "lettuce_r060.jpg").rename(tree / "Test" / "lettuce" / "renamed.jpg")
    shutil.copy2(tree / "Training" / "kiwi" / "kiwi_r000.jpg", tree / "Training" / "kiwi" / "copy.jpg")

    updated = _ingest(tree, work / "images")
    assert updated.details["update"] and not updated.skipped
    c = updated.counts
    assert (c["added"], c["removed"], c["unchanged"]) == (3 + 1 + 1 + 1, 2, first.counts["rows_in"] - 2)
    assert c["rows"] == c["files_found"] == first.counts["rows_in"] + 3 + 1 + 1 - 1
    after = _parts(work / "images")
    kept = set(before) & set(after)
    assert kept and all(before[n] == after[n] for n in kept)  # untouched parts stay byte for byte
    assert set(after) == _indexed(work / "images")
    _ingest(tree, tmp_path / "fresh" / "images")
    assert _rows(work / "images") == _rows(tmp_path / "fresh" / "images")

    again = _embed(work / "images", work / "embed", store)
    # Only the three almonds are new bytes: the renamed, copied and empty files' sha256 are known.
    assert (again.counts["computed"], again.counts["shards_skipped"]) == (3, len(kept))
    fresh = _embed(tmp_path / "fresh" / "images", tmp_path / "fresh" / "embed", "none")
    assert fresh.counts["computed"] == fresh.counts["rows_in"]
    mine, theirs = _features(work / "embed"), _features(tmp_path / "fresh" / "embed")
    assert {k: m for k, (m, _) in mine.items()} == {k: m for k, (m, _) in theirs.items()}
    assert max(float(np.abs(v - theirs[k][1]).max()) for k, (_, v) in mine.items()) < 1e-5
    assert _errors(work / "embed") == _errors(tmp_path / "fresh" / "embed") and len(_errors(work / "embed")) == 4
    assert sorted(p.name for p in (work / "embed" / EMBEDDINGS).iterdir()) == sorted(after)

    # The same command again: nothing to do. Another option: refused, with its reason.
    assert _ingest(tree, work / "images").skipped and _embed(work / "images", work / "embed", store).skipped
    with pytest.raises(InputError, match=r"made differently \(images_per_file 4 → 5\)"):
        ingest(IngestConfig(input=str(tree), output=str(work / "images"), images_per_file=PER_FILE + 1))
    with pytest.raises(InputError, match=r"made differently \(extensions "):
        _ingest(tree, work / "images", extensions=("jpg",))
    assert _parts(work / "images") == after and (work / "images" / MANIFEST).exists()


def test_an_update_killed_before_its_index_is_finished_by_the_same_command(spark, base, tmp_path, monkeypatch):
    tree, out = _tree(base, tmp_path / "tree"), tmp_path / "images"
    _ingest(tree, out)
    shutil.copytree(SAMPLE / "Test" / "almond", tree / "Test" / "almond")
    (tree / "Training" / "broccoli" / "broccoli_r000.jpg").unlink()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the index was written")

    # Killed after the new parts are written and before the index that names them.
    monkeypatch.setattr(ingest_stage, "_write_index", killed)
    with pytest.raises(KeyboardInterrupt):
        _ingest(tree, out)
    monkeypatch.undo()
    assert not (out / MANIFEST).exists() and (out / PENDING).exists()
    assert set(_parts(out)) - _indexed(out)  # the interrupted run's parts, which no index names
    done = _ingest(tree, out)
    assert (done.counts["added"], done.counts["removed"]) == (2, 1)
    assert set(_parts(out)) == _indexed(out)
    _ingest(tree, tmp_path / "fresh")
    assert _rows(out) == _rows(tmp_path / "fresh")

    # Killed after the index and before the parts it no longer names were deleted (and the manifest): a
    # part the index does not name, and the pending record. The same command deletes it and reads nothing.
    stale = next(iter(_parts(out)))
    shutil.copy2(out / stale, out / stale.replace("part-", "part-99999-"))
    pending = lifecycle.read_manifest(str(out)).fingerprint
    (out / MANIFEST).unlink()
    (out / PENDING).write_text(json.dumps(pending))
    again = _ingest(tree, out)
    assert (again.counts["added"], again.counts["removed"], again.counts["unchanged"]) == (0, 0, 20 + 3 - 1 + 2)
    assert set(_parts(out)) == _indexed(out) and _rows(out) == _rows(tmp_path / "fresh")

    # An output without an index (an earlier m9's) is ingested again in full.
    (out / INGEST_INDEX).unlink()
    shutil.copy2(SAMPLE / "Test" / "kiwi" / "kiwi_r060.jpg", tree / "Test" / "kiwi" / "again.jpg")
    full = _ingest(tree, out)
    assert not full.details["update"] and full.counts["added"] == full.counts["rows"] == 25
    assert set(_parts(out)) == _indexed(out)


@pytest.mark.parametrize("stage", ["images", "embed"])
def test_kill_9_during_an_update_then_the_same_command_completes_it(ray_local, weights_path, base, tmp_path, stage):
    """`m9 run` on a changed tree killed (-9, with its Spark and Ray) while it updates ingest's or embed's
    output; the same command then finishes it, equal to a fresh run, and the store holds each image once."""
    import subprocess
    import sys
    import time

    from click.testing import CliRunner

    from m9.cli import main
    from m9.store import FeatureStore
    from tests.conftest import kill_session

    tree, work, store = _tree(base, tmp_path / "tree"), tmp_path / "work", tmp_path / "store"
    command = ["run", "--input", str(tree), "--workdir", str(work), "--store", str(store), "--actors", "2", "--k", "5"]
    first = CliRunner().invoke(main, command)
    assert first.exit_code == 0, first.output
    shutil.copytree(SAMPLE / "Training" / "almond", tree / "Training" / "almond")
    (tree / "Test" / "onion" / "onion_r060.jpg").unlink()
    (tree / "Test" / "lettuce" / "lettuce_r060.jpg").rename(tree / "Test" / "lettuce" / "renamed.jpg")
    shutil.copy2(tree / "Training" / "kiwi" / "kiwi_r000.jpg", tree / "Training" / "kiwi" / "copy.jpg")

    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "m9.cli", *command], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 600
    while not (work / stage / PENDING).exists():  # that stage's update has begun
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    kill_session(proc)
    assert not (work / stage / MANIFEST).exists()

    again = CliRunner().invoke(main, command)
    assert again.exit_code == 0, again.output
    fresh_work = ["--workdir", str(tmp_path / "fresh"), "--store", "none", "--k", "5"]
    fresh = CliRunner().invoke(main, [*command[:3], *fresh_work])
    assert fresh.exit_code == 0, fresh.output
    assert _rows(work / "images") == _rows(tmp_path / "fresh" / "images")
    assert set(_parts(work / "images")) == _indexed(work / "images")
    mine, theirs = _features(work / "embed"), _features(tmp_path / "fresh" / "embed")
    assert {k: m for k, (m, _) in mine.items()} == {k: m for k, (m, _) in theirs.items()}
    assert max(float(np.abs(v - theirs[k][1]).max()) for k, (_, v) in mine.items()) < 1e-5
    assert _errors(work / "embed") == _errors(tmp_path / "fresh" / "embed")
    # The store: each image's bytes once (the renamed and copied files added none; the removed one stays, as
    # the store only grows), the broken ones as rejections.
    [entries] = FeatureStore(str(store)).show()
    shas = set(pq.read_table(work / "images", columns=["sha256"]).column("sha256").to_pylist())
    shas.add(hashlib.sha256((SAMPLE / "Test" / "onion" / "onion_r060.jpg").read_bytes()).hexdigest())
    assert entries.entries == len(shas) and entries.rejections == len(_errors(work / "embed"))
