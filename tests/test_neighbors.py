"""Duplicates, leakage, the index and search, on real images of the sample with planted copies (exact and near)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from m9.cli import main
from m9.neighbors import duplicates as dup
from m9.neighbors import features, planted
from m9.neighbors import index as m9index
from m9.stages import lifecycle
from tests.conftest import SAMPLE

# One Training image of each of these labels: different fruits, no two views of one photo.
LABELS = ("apple_fuji", "banana", "broccoli", "carrot", "cherry_stella", "corn", "eggplant", "kiwi", "lemon", "onion")


def _unit(n: int, d: int = 64, seed: int = 0) -> np.ndarray:
    return features.normalize(np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32))


def test_groups_join_pairs_transitively_and_number_the_largest_first():
    group = dup.groups(7, np.array([0, 1, 5]), np.array([1, 2, 6]))
    assert group.tolist() == [0, 0, 0, -1, -1, 1, 1]
    assert dup.groups(3, np.zeros(0, np.int64), np.zeros(0, np.int64)).tolist() == [-1, -1, -1]


def test_exact_pairs_by_bytes():
    i, j = dup.exact_pairs(["a", "b", "a", None, "a", None])
    assert list(zip(i.tolist(), j.tolist())) == [(0, 2), (0, 4)]


def test_near_pairs_finds_planted_copies_exactly_and_through_the_ivf(monkeypatch):
    x = _unit(3000)
    copies = np.arange(0, 3000, 10)
    x[copies + 1] = features.normalize(x[copies] + 0.05 * _unit(len(copies), seed=1))  # cosine ≈ 0.999
    want = set(zip(copies.tolist(), (copies + 1).tolist()))
    i, j, s = dup.near_pairs(x, 0.9)
    assert set(zip(i.tolist(), j.tolist())) == want and (s >= 0.9).all()
    monkeypatch.setattr(m9index, "EXACT_MAX", 100)  # the same search past the exact size: within k-means cells
    i, j, _ = dup.near_pairs(x, 0.9)
    assert set(zip(i.tolist(), j.tolist())) == want


def test_the_summary_counts_groups_crossing_the_split_per_label():
    rows = [
        (0, "a", "Training", True, "exact"),
        (0, "b", "Test", False, "exact"),
        (0, "c", "Test", False, "near"),
        (1, "d", "Training", True, "near"),
        (1, "e", "Training", False, "near"),
        (2, "f", "Test", True, "near"),
        (2, "g", "Training", False, "near"),
    ]
    labels = {0: "kiwi", 1: "kiwi", 2: "lemon"}
    table = pa.table(
        {
            "group": [r[0] for r in rows],
            "image_id": [r[1] for r in rows],
            "path": [f"/{r[1]}.jpg" for r in rows],
            "label": [labels[r[0]] for r in rows],
            "split": [r[2] for r in rows],
            "kind": [r[4] for r in rows],
            "similarity": pa.array([1.0] * len(rows), pa.float32()),
            "representative": [r[3] for r in rows],
        },
        schema=dup.SCHEMA,
    )
    summary = dup.summarize(table, 20, 0.9)
    assert (summary["groups"], summary["images_in_groups"], summary["crossing_groups"]) == (3, 7, 2)
    assert summary["crossing_groups_by_label"] == {"kiwi": 1, "lemon": 1}
    assert summary["leaked_test_images"] == 3 and dup.leaked_test_ids(table) == {"b", "c", "f"}
    assert summary["largest_groups"][0] == {
        "group": 0,
        "images": 3,
        "labels": {"kiwi": 3},
        "splits": {"Training": 1, "Test": 2},
    }


def test_an_index_grows_and_shrinks_without_a_rebuild():
    x = _unit(2000)
    for kind in ("exact", "ivf"):
        index = m9index.build(x[:1500], kind)
        before = m9index.search(index, x[:5], 1)[1][:, 0].tolist()
        m9index.add(index, x[1500:], np.arange(1500, 2000, dtype=np.int64))
        index.remove_ids(np.arange(0, 10, dtype=np.int64))
        assert index.ntotal == 1990
        assert before == [0, 1, 2, 3, 4]
        _, ids = m9index.search(index, x[1990:], 1, nprobe=10_000)
        assert ids[:, 0].tolist() == list(range(1990, 2000))  # the new vectors are found, as themselves
        assert 0 not in m9index.search(index, x[:1], 5, nprobe=10_000)[1][0]


def test_modify_keeps_an_image_and_exact_keeps_its_bytes():
    from PIL import Image

    original = next((SAMPLE / "Training" / "kiwi").glob("*.jpg")).read_bytes()
    assert planted.modify(original, "exact") == original
    for how in planted.NEAR:
        import io

        with Image.open(io.BytesIO(planted.modify(original, how))) as im:
            assert im.format == "JPEG" and min(im.size) >= 45
    with pytest.raises(ValueError, match="unknown modification"):
        planted.modify(original, "rotated")


def test_old_variable_length_features_still_index(tmp_path):
    """An embed output written by an m9 before FixedSizeList features is read as the same matrix."""
    x = _unit(30, d=1280)
    emb = tmp_path / "embed"
    (emb / "embeddings").mkdir(parents=True)
    table = pa.table(
        {
            "image_id": [f"i{k:02d}" for k in range(30)],
            "path": [f"/x/{k}.jpg" for k in range(30)],
            "label": ["a"] * 30,
            "split": ["Training"] * 30,
            "features": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 1280).cast(pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, emb / "embeddings" / "part-0.parquet")
    lifecycle.write_manifest(str(emb), lifecycle.Manifest(stage="embed", input="", fingerprint={}, counts={}))
    meta, got = features.read(str(emb))
    np.testing.assert_allclose(got, x, atol=1e-6)
    result = m9index.index(m9index.IndexConfig(input=str(emb), output=str(tmp_path / "index")))
    assert result.counts["vectors"] == 30 and result.details["kind"] == "exact"


def test_a_workdir_without_features_is_one_error_line(tmp_path):
    runner = CliRunner()
    for args in (
        ["duplicates", "--workdir", str(tmp_path)],
        ["index", "--workdir", str(tmp_path)],
        ["search", "--workdir", str(tmp_path), "--id", "x"],
    ):
        result = runner.invoke(main, args)
        assert result.exit_code == 1
        assert result.output.strip().splitlines() == [
            f"Error: {tmp_path} holds no features: no finished `m9 embed` output there or in its embed/; "
            "run `m9 run` (or `m9 embed`) first"
        ]


# ---- on real images: the sample's, with planted copies, through ingest and embed ----


@pytest.fixture(scope="module")
def planted_work(spark, ray_local, tmp_path_factory) -> dict:
    """Ten different fruits (Training), each with a planted copy: 2 exact copies and 1 near copy in Test (they
    leak), 7 near copies beside their originals; ingested and embedded. No two originals are duplicates."""
    from m9.config import EmbedConfig, IngestConfig
    from m9.stages.embed import embed
    from m9.stages.ingest import ingest

    root = tmp_path_factory.mktemp("planted")
    tree = root / "tree"
    originals = []
    for label in LABELS:
        source = sorted((SAMPLE / "Training" / label).glob("*.jpg"))[0]
        target = tree / "Training" / label / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        originals.append(target)
    made = planted.plant(originals[:2], tree, tree, kinds=("exact",), other_split=True)
    # Darker by 15 %: the modification every copy survives at the default threshold (docs/neighbors.md: on
    # these 100-pixel images resized, cropped and JPEG-30 copies fall below it about half the time).
    made += planted.plant(originals[2:3], tree, tree, kinds=("darker",), other_split=True)
    made += planted.plant(originals[3:], tree, tree, kinds=("darker",))
    # A query that is in no folder: another modification of the first near-copied original.
    query = root / "query.jpg"
    query.write_bytes(planted.modify(originals[3].read_bytes(), "brighter"))
    work = root / "work"
    ingest(IngestConfig(input=str(tree), output=str(work / "images"), images_per_file=8))
    embed(EmbedConfig(input=str(work / "images"), output=str(work / "embed"), actors=2, batch_size=8))
    return {"work": work, "made": made, "originals": originals, "query": query}


@pytest.mark.slow
def test_duplicates_finds_every_planted_copy_and_nothing_else(planted_work):
    work = planted_work["work"]
    result = CliRunner().invoke(main, ["duplicates", "--workdir", str(work)])
    assert result.exit_code == 0, result.output
    assert "10 groups of 20 images among 20; 3 cross the Training/Test split (3 Test images leaked)" in result.output
    table = pq.read_table(work / "duplicates" / "duplicates.parquet")
    assert table.schema.names[:7] == ["group", "image_id", "path", "label", "split", "kind", "similarity"]
    by_path = {r["path"]: r for r in table.to_pylist()}
    for m in planted_work["made"]:
        a, b = by_path[m["original"]], by_path[m["copy"]]
        assert a["group"] == b["group"]
        assert b["kind"] == ("exact" if m["kind"] == "exact" else "near")
        assert b["similarity"] == 1.0 if m["kind"] == "exact" else b["similarity"] >= dup.DEFAULT_THRESHOLD
    summary = json.loads((work / "duplicates" / "duplicates.json").read_text())
    assert summary["crossing_groups_by_label"] == {"apple_fuji": 1, "banana": 1, "broccoli": 1}
    assert summary["exact_images"] == 4 and summary["near_images"] == 16


@pytest.mark.slow
def test_search_by_file_and_by_id_and_the_index_grows_without_a_rebuild(planted_work, tmp_path):
    import faiss

    work = planted_work["work"]
    runner = CliRunner()
    # The index of the embed output without its last shard, then with it: the new images are added.
    partial = tmp_path / "embed"
    shutil.copytree(work / "embed", partial)
    shards = sorted((partial / "embeddings").glob("*.parquet"))
    held_back = pq.read_table(shards[-1]).num_rows
    shards[-1].rename(tmp_path / "held.parquet")
    result = runner.invoke(main, ["index", "--workdir", str(partial), "--kind", "ivf"])
    assert result.exit_code == 0, result.output
    assert f"{20 - held_back} vectors (ivf, {min(16, 20 - held_back)} cells)" in result.output
    before = m9index.load(str(tmp_path / "index"))
    ivf = faiss.downcast_index(before.index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    (tmp_path / "held.parquet").rename(shards[-1])
    result = runner.invoke(main, ["index", "--workdir", str(partial), "--kind", "ivf"])
    assert result.exit_code == 0, result.output
    cells = min(16, 20 - held_back)  # trained once, on the first images: not retrained
    assert f"20 vectors (ivf, {cells} cells) at {tmp_path / 'index'}; {held_back} added, 0 removed" in result.output
    after = m9index.load(str(tmp_path / "index"))
    ivf = faiss.downcast_index(after.index)
    assert np.array_equal(centroids, ivf.quantizer.reconstruct_n(0, ivf.nlist))
    assert after.rows.slice(0, before.rows.num_rows).equals(before.rows)  # old rows keep their ids
    assert sorted(p.name for p in (tmp_path / "index").glob("index-*")) == ["index-1.faiss"]
    assert "already up to date" in runner.invoke(main, ["index", "--workdir", str(partial), "--kind", "ivf"]).output

    # By file: a modified copy no folder holds finds its original first.
    original = str(planted_work["originals"][3])
    out = runner.invoke(
        main, ["search", "--workdir", str(partial), "--image", str(planted_work["query"]), "--top", "3", "--json"]
    )
    assert out.exit_code == 0, out.output
    hits = json.loads(out.output)
    assert len(hits) == 3 and hits[0]["path"] in (original, *[m["copy"] for m in planted_work["made"]])
    assert {original} <= {h["path"] for h in hits[:2]} and hits[0]["similarity"] > 0.9
    # By id: an original's nearest other image is its planted copy.
    rows = after.rows.to_pylist()
    first = next(r for r in rows if r["path"] == original)
    copy = next(m["copy"] for m in planted_work["made"] if m["original"] == original)
    out = runner.invoke(main, ["search", "--workdir", str(partial), "--id", first["image_id"], "--top", "1"])
    assert out.exit_code == 0 and out.output.split()[-1] == copy and out.output.split()[0] == "1"
    # Bad queries: one line each.
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    for args, message in (
        (["--image", str(bad)], f"Error: --image {bad} is not an image m9 can read: cannot decode"),
        (["--id", "nope"], "Error: --id nope: no embedded image has this id"),
        (["--id", "x", "--image", str(bad)], "Error: search needs exactly one of --image FILE or --id ID"),
    ):
        out = runner.invoke(main, ["search", "--workdir", str(partial), *args])
        assert out.exit_code == 1 and len(out.output.strip().splitlines()) == 1, out.output
        assert out.output.startswith(message), out.output
