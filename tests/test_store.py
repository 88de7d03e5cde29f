"""The feature store: its parts on local disk and on moto's S3, writers at once, and `m9 embed` with it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from m9.cli import main
from m9.config import FEATURE_DIM
from m9.errors import InputError
from m9.stages.reuse import STORE_ENV, resolve_store
from m9.store import FeatureStore, StoreError, digest, rows
from tests.conftest import SAMPLE, kill_session, moto_server, point_aws_at

IDENTITY = {"weights": "w1", "runtime": "onnx", "precision": "fp32", "preprocess": 2, "decode_memory_mb": 2048}
OTHER = {**IDENTITY, "precision": "int8"}


def _sha(i: int) -> str:
    return f"{i:064x}"


def _features(i: int) -> np.ndarray:
    """Features that depend only on the row's number, so any copy of a row can be checked."""
    return np.random.default_rng(i).random(FEATURE_DIM, dtype=np.float32)


def _rows(numbers, bad=()):
    numbers = list(numbers)
    return rows(
        [_sha(i) for i in numbers],
        np.stack([_features(i) for i in numbers]),
        [f"cannot decode: {i}" if i in bad else None for i in numbers],
    )


def _check(found, numbers, bad=()) -> None:
    """found holds exactly one row per number, with its own features or its rejection."""
    shas = found.column("sha256").to_pylist()
    assert sorted(shas) == sorted(_sha(i) for i in numbers)
    by_sha = dict(zip(shas, range(len(shas))))
    feats = found.column("features").to_pylist()
    errors = found.column("error").to_pylist()
    for i in numbers:
        j = by_sha[_sha(i)]
        if i in bad:
            assert errors[j] == f"cannot decode: {i}"
        else:
            assert errors[j] is None
            np.testing.assert_array_equal(np.asarray(feats[j], np.float32), _features(i))


# ---------------------------------------------------------------------------------------------------------
# The store itself (engine-free, local disk)
# ---------------------------------------------------------------------------------------------------------


def test_add_then_lookup_finds_one_row_per_image_and_keeps_rejections(tmp_path):
    store = FeatureStore(str(tmp_path)).model(IDENTITY)
    assert store.lookup([_sha(1)]).num_rows == 0
    assert store.add(_rows(range(0, 1500), bad={7})) == 1500
    assert store.add(_rows(range(1000, 2500), bad={7})) == 1500  # overlaps the first part: harmless
    found = store.lookup([_sha(i) for i in (0, 7, 999, 1000, 1499, 2499)] + [_sha(10**6)])
    _check(found, (0, 7, 999, 1000, 1499, 2499), bad={7})
    [entries] = FeatureStore(str(tmp_path)).show()
    assert (entries.digest, entries.entries, entries.rejections, entries.parts) == (digest(IDENTITY), 2500, 1, 2)
    assert entries.identity == IDENTITY


def test_compact_merges_the_parts_and_loses_nothing(tmp_path):
    store = FeatureStore(str(tmp_path)).model(IDENTITY)
    for start in range(0, 100, 10):
        store.add(_rows(range(start, start + 15), bad={42}))  # each part overlaps the next
    assert FeatureStore(str(tmp_path)).show()[0].parts == 10
    assert store.compact() == (10, 105)
    [entries] = FeatureStore(str(tmp_path)).show()
    assert (entries.parts, entries.entries, entries.rejections) == (1, 105, 1)
    _check(store.lookup([_sha(i) for i in range(105)]), range(105), bad={42})
    # A fresh reader (no cached keys) sees the same.
    _check(FeatureStore(str(tmp_path)).model(IDENTITY).lookup([_sha(i) for i in range(105)]), range(105), bad={42})


def test_identities_are_apart_and_drop_removes_one(tmp_path):
    fs = FeatureStore(str(tmp_path))
    fs.model(IDENTITY).add(_rows(range(5)))
    fs.model(OTHER).add(_rows(range(3, 8)))
    assert fs.model(OTHER).lookup([_sha(0)]).num_rows == 0
    assert {e.digest: e.entries for e in fs.show()} == {digest(IDENTITY): 5, digest(OTHER): 5}
    assert fs.drop(digest(OTHER)[:6]) == digest(OTHER)  # a unique prefix is enough
    assert [e.digest for e in fs.show()] == [digest(IDENTITY)]
    with pytest.raises(InputError, match="matches none"):
        fs.drop("ffff")


def test_a_folder_whose_identity_differs_is_never_served(tmp_path):
    fs = FeatureStore(str(tmp_path))
    fs.model(IDENTITY).add(_rows(range(5)))
    folder = tmp_path / digest(IDENTITY)
    # Another model's identity.json under this identity's name (a hand-copied folder, a collision).
    (folder / "identity.json").write_text('{"weights": "other"}')
    with pytest.raises(StoreError, match="another model identity"):
        fs.model(IDENTITY).lookup([_sha(0)])
    with pytest.raises(StoreError):
        fs.model(IDENTITY).add(_rows(range(5, 6)))
    # Parts without any identity.json are not trusted either.
    (folder / "identity.json").unlink()
    assert fs.model(IDENTITY).lookup([_sha(0)]).num_rows == 0


def test_a_leftover_temporary_part_is_ignored_then_removed_by_compact(tmp_path):
    store = FeatureStore(str(tmp_path)).model(IDENTITY)
    store.add(_rows(range(3)))
    store.add(_rows(range(3, 6)))
    folder = tmp_path / digest(IDENTITY)
    leftover = folder / "part-0123.parquet.tmp-deadbeef"
    leftover.write_bytes(b"PAR1 half a part, the writer was killed")
    _check(store.lookup([_sha(i) for i in range(6)]), range(6))
    assert FeatureStore(str(tmp_path)).show()[0].parts == 2
    young = folder / "part-4567.parquet.tmp-cafe"  # may still be being written: kept
    young.write_bytes(b"")
    old = time.time() - 2 * 3600
    os.utime(leftover, (old, old))
    store.compact()
    assert not leftover.exists() and young.exists()
    _check(store.lookup([_sha(i) for i in range(6)]), range(6))


_WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from tests.test_store import IDENTITY, _rows
    from m9.store import FeatureStore
    store = FeatureStore({uri!r}).model(IDENTITY)
    first = int(sys.argv[1])
    for start in range(first, first + 400, 20):
        store.add(_rows(range(start, start + 30), bad={{13}}))
    """
)


def test_two_writers_at_once_and_a_compact_beside_them_leave_a_consistent_store(tmp_path):
    root = str(Path(__file__).resolve().parent.parent)
    script = _WRITER.format(root=root, uri=str(tmp_path))
    # Two processes writing overlapping rows (0–409 and 200–609) while this one compacts and reads.
    writers = [subprocess.Popen([sys.executable, "-c", script, str(first)]) for first in (0, 200)]
    store = FeatureStore(str(tmp_path)).model(IDENTITY)
    while any(w.poll() is None for w in writers):
        store.compact()
        found = store.lookup([_sha(i) for i in range(610)])
        numbers = [int(s, 16) for s in found.column("sha256").to_pylist()]
        _check(found, numbers, bad={13})  # whatever is there is right
    assert [w.returncode for w in writers] == [0, 0]
    _check(FeatureStore(str(tmp_path)).model(IDENTITY).lookup([_sha(i) for i in range(610)]), range(610), bad={13})
    store.compact()
    [entries] = FeatureStore(str(tmp_path)).show()
    assert (entries.entries, entries.rejections, entries.parts) == (610, 1, 1)


def test_where_the_store_is(tmp_path, monkeypatch):
    monkeypatch.delenv(STORE_ENV, raising=False)
    monkeypatch.setenv("M9_CACHE_DIR", str(tmp_path / "cache"))
    assert resolve_store("auto", str(tmp_path / "out")) == str(tmp_path / "cache" / "store")
    assert resolve_store("auto", "s3://bucket/runs/one/embed") == "s3://bucket/store"
    assert resolve_store("none", "s3://bucket/x") is None
    assert resolve_store("s3://b/shared/", str(tmp_path)) == "s3://b/shared"
    monkeypatch.setenv(STORE_ENV, "s3://team/features")
    assert resolve_store("auto", str(tmp_path)) == "s3://team/features"
    assert resolve_store(str(tmp_path / "mine"), str(tmp_path)) == str(tmp_path / "mine")


def test_store_commands_show_and_drop(tmp_path):
    FeatureStore(str(tmp_path)).model(IDENTITY).add(_rows(range(4), bad={2}))
    shown = CliRunner().invoke(main, ["store", "show", "--store", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    assert f"{digest(IDENTITY)}  4 entries (1 rejections), 1 parts" in shown.output
    assert '"precision": "fp32"' in shown.output
    wrong = CliRunner().invoke(main, ["store", "drop", "--identity", "0000", "--store", str(tmp_path)])
    assert wrong.exit_code == 1 and wrong.output.startswith("Error: --identity '0000' matches none")
    dropped = CliRunner().invoke(main, ["store", "drop", "--identity", digest(IDENTITY), "--store", str(tmp_path)])
    assert dropped.exit_code == 0 and f"dropped {digest(IDENTITY)}" in dropped.output
    assert "empty" in CliRunner().invoke(main, ["store", "show", "--store", str(tmp_path)]).output


# ---------------------------------------------------------------------------------------------------------
# On moto's S3 server (loopback)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_port():
    with moto_server() as port:
        yield port


@pytest.mark.slow
def test_the_store_on_s3(moto_port, monkeypatch):
    import boto3

    endpoint = f"http://127.0.0.1:{moto_port}"
    point_aws_at(monkeypatch, endpoint, "m9-store-key", "m9-store-secret")
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="features")
    fs = FeatureStore("s3://features/store")
    store = fs.model(IDENTITY)
    for start in range(0, 2000, 500):
        store.add(_rows(range(start, start + 600), bad={5}))
    _check(store.lookup([_sha(i) for i in (0, 5, 1999, 2099)]), (0, 5, 1999, 2099), bad={5})
    assert store.compact() == (4, 2100)
    [entries] = fs.show()
    assert (entries.entries, entries.rejections, entries.parts, entries.identity) == (2100, 1, 1, IDENTITY)
    _check(fs.model(IDENTITY).lookup([_sha(i) for i in range(2100)]), range(2100), bad={5})
    fs.drop(entries.digest)
    assert fs.show() == []


# ---------------------------------------------------------------------------------------------------------
# m9 embed with a store
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ingested(spark, tmp_path_factory) -> str:
    """40 sample images, one of them again under another path, and a file that is no image, ingested."""
    from m9.config import IngestConfig
    from m9.stages.ingest import ingest

    root = tmp_path_factory.mktemp("store-tree")
    images = sorted((SAMPLE / "Training").rglob("*.jpg"))[:40]
    for image in images:
        (root / image.parent.name).mkdir(exist_ok=True)
        shutil.copy(image, root / image.parent.name / image.name)
    (root / "copies").mkdir()
    shutil.copy(images[0], root / "copies" / "same-bytes.jpg")
    (root / "broken").mkdir()
    (root / "broken" / "not-an-image.jpg").write_bytes(b"these bytes are no JPEG")
    out = str(root.parent / "store-images")
    ingest(IngestConfig(input=str(root), output=out, images_per_file=20))
    return out


def _embed(ingested: str, output: Path, store: str):
    result = CliRunner().invoke(
        main, ["embed", "--input", ingested, "--output", str(output), "--store", store, "--actors", "2"]
    )
    assert result.exit_code == 0, result.output
    return result.output


def _table(output: Path, sub: str):
    return pq.read_table(output / sub).sort_by("image_id")


def _same_output(a: Path, b: Path) -> None:
    for sub in ("embeddings", "errors"):
        ta, tb = _table(a, sub), _table(b, sub)
        assert ta.drop_columns(["features"] if sub == "embeddings" else []).equals(
            tb.drop_columns(["features"] if sub == "embeddings" else [])
        )
    fa = np.stack(_table(a, "embeddings").column("features").to_numpy(zero_copy_only=False))
    fb = np.stack(_table(b, "embeddings").column("features").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(fa, fb, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_embed_twice_with_one_store_computes_each_image_once(ingested, ray_local, weights_path, tmp_path):
    store = str(tmp_path / "store")
    first = _embed(ingested, tmp_path / "one", store)
    # 42 rows: 40 images, the copy (reused from its twin in the same run) and the broken file (rejected).
    assert "41 embedded, 1 rejected (of 42), 41 computed, 1 reused" in first
    second = _embed(ingested, tmp_path / "two", store)
    assert "41 embedded, 1 rejected (of 42), 0 computed, 42 reused, 0 model loads" in second
    _same_output(tmp_path / "one", tmp_path / "two")
    # The rejection was stored with its reason and served, not retried.
    [entries] = FeatureStore(store).show()
    assert (entries.entries, entries.rejections) == (41, 1)
    [reason] = _table(tmp_path / "two", "errors").column("error").to_pylist()
    assert reason == _table(tmp_path / "one", "errors").column("error").to_pylist()[0]
    assert reason.startswith("cannot decode")
    counts = json.loads((tmp_path / "two" / "_m9.json").read_text())["counts"]
    assert (counts["computed"], counts["reused"]) == (0, 42)

    scratch = _embed(ingested, tmp_path / "none", "none")
    assert "42 computed, 0 reused" in scratch
    _same_output(tmp_path / "one", tmp_path / "none")


@pytest.fixture(scope="module")
def ingested_many(spark, tmp_path_factory) -> str:
    """720 images of distinct bytes (the sample's 240, each also with 1 and 2 zero bytes after its end,
    which decoders ignore) in files of 100: enough work that a kill lands in the middle of an embed."""
    from m9.config import IngestConfig
    from m9.stages.ingest import ingest

    root = tmp_path_factory.mktemp("store-many")
    for n, image in enumerate(sorted(SAMPLE.rglob("*.jpg"))):
        for pad in range(3):
            target = root / f"v{pad}" / image.parent.name / f"{n}-{image.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(image.read_bytes() + b"\0" * pad)
    out = str(root.parent / "store-many-images")
    ingest(IngestConfig(input=str(root), output=out, images_per_file=100))
    return out


@pytest.mark.slow
def test_kill_9_during_an_embed_then_the_same_command_completes_it(ingested_many, ray_local, weights_path, tmp_path):
    store, out = tmp_path / "store", tmp_path / "out"
    command = ["embed", "--input", ingested_many, "--output", str(out), "--store", str(store), "--actors", "2"]
    log = (tmp_path / "killed.log").open("w")
    # Its own session, so the kill takes the command and the local Ray it started, as a kill -9 of a job does.
    proc = subprocess.Popen(
        [sys.executable, "-m", "m9.cli", *command], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 600
    while not list((out / "embeddings").glob("*.parquet")):
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    kill_session(proc)
    done = len(list((out / "embeddings").glob("*.parquet")))
    shards = len(list(Path(ingested_many).glob("part-*.parquet")))
    assert 1 <= done < shards, f"the kill came after {done} of {shards} files: nothing left to resume"

    again = CliRunner().invoke(main, command)
    assert again.exit_code == 0, again.output
    assert "720 embedded, 0 rejected (of 720)" in again.output
    _embed(ingested_many, tmp_path / "scratch", "none")
    _same_output(out, tmp_path / "scratch")
    # The store is consistent: each image at most once, its features those of the output. It holds at least
    # what the second run computed (the killed run's rows reach it FLUSH_ROWS at a time; its output kept them).
    killed_rows = sum(pq.read_metadata(f).num_rows for f in (tmp_path / "scratch" / "embeddings").glob("*"))
    [entries] = FeatureStore(str(store)).show()
    assert entries.rejections == 0 and entries.entries <= killed_rows == 720
    images = pq.read_table(ingested_many, columns=["image_id", "sha256"])
    sha_of = dict(zip(images.column("image_id").to_pylist(), images.column("sha256").to_pylist()))
    embedded = _table(out, "embeddings")
    identity = json.loads((store / entries.digest / "identity.json").read_text())
    found = FeatureStore(str(store)).model(identity).lookup(sha_of.values())
    assert found.num_rows == entries.entries >= 720 - 100 * done
    row_of = {s: i for i, s in enumerate(found.column("sha256").to_pylist())}
    stored = np.stack(found.column("features").to_numpy(zero_copy_only=False))
    ours = np.stack(embedded.column("features").to_numpy(zero_copy_only=False))
    keep = [j for j, i in enumerate(embedded.column("image_id").to_pylist()) if sha_of[i] in row_of]
    order = [row_of[sha_of[i]] for i in embedded.column("image_id").to_pylist() if sha_of[i] in row_of]
    np.testing.assert_allclose(stored[order], ours[keep], atol=1e-5, rtol=0)
