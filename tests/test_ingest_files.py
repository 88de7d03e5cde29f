"""Ingest: every entry of a tree accounted for (formats, symlinks good and dangling), files sized by bytes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from m9.stages.listing import list_tree, parse_extensions
from tests.conftest import SAMPLE


def _tree(root: Path) -> Path:
    """Images in six formats, a symlinked file and folder, a dangling link, a text file, a hidden file."""
    photo = Image.open(next(SAMPLE.glob("Training/*/*.jpg"))).convert("RGB")
    (root / "pics").mkdir(parents=True)
    for ext in ("jpg", "png", "webp", "tif", "bmp", "gif"):
        photo.save(root / "pics" / f"photo.{ext}")
    (root / "links").mkdir()
    os.symlink("../pics/photo.jpg", root / "links/good.jpg")
    os.symlink("../pics/gone.jpg", root / "links/dangling.jpg")
    os.symlink("../pics", root / "links/pics-again")  # a folder reached twice: Hadoop lists it twice
    (root / "pics/notes.txt").write_text("notes\n")
    (root / "pics/.hidden.jpg").write_bytes(b"x")
    return root


def test_the_listing_follows_symlinks_and_counts_every_entry(tmp_path):
    listing = list_tree(str(_tree(tmp_path)))
    names = sorted(Path(p).relative_to(tmp_path).as_posix() for p, *_ in listing.files)
    assert names == sorted(
        [f"pics/photo.{e}" for e in ("jpg", "png", "webp", "tif", "bmp", "gif")]
        + [f"links/pics-again/photo.{e}" for e in ("jpg", "png", "webp", "tif", "bmp", "gif")]
        + ["links/good.jpg", "pics/notes.txt", "links/pics-again/notes.txt"]
    )
    reasons = {Path(p).relative_to(tmp_path).as_posix(): r for p, r in listing.unreadable}
    assert reasons == {"links/dangling.jpg": "dangling symlink to ../pics/gone.jpg"}
    assert listing.hidden == 2  # pics/.hidden.jpg and its twin below links/pics-again


def test_a_symlink_loop_is_a_clear_error(tmp_path):
    """Hadoop would list the tree below a link to its own ancestor again and again: refused, not miscounted."""
    os.symlink("..", _tree(tmp_path) / "links/up")
    from m9.errors import InputError

    with pytest.raises(InputError, match="links/up links back to .*remove the link"):
        list_tree(str(tmp_path))


def test_extensions_are_parsed_in_any_case_and_spelling():
    assert parse_extensions("jpg, .PNG,webp,jpg") == ("jpg", "png", "webp")
    for bad in ("", ",", "jp g", "*.jpg"):
        with pytest.raises(ValueError, match="--extensions"):
            parse_extensions(bad)


@pytest.mark.slow
def test_ingest_counts_reconcile_and_extensions_select(spark, tmp_path):
    from m9.cli import main

    tree = _tree(tmp_path / "in")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["ingest", "--input", str(tree), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "1 unreadable: 1 dangling symlink" in result.output
    manifest = json.loads((out / "_m9.json").read_text())
    c = manifest["counts"]
    assert (c["files_found"], c["ignored_files"], c["hidden_files"], c["unreadable_files"]) == (13, 2, 2, 1)
    assert c["entries"] == c["files_found"] + c["ignored_files"] + c["hidden_files"] + c["unreadable_files"]
    assert [u["reason"] for u in manifest["details"]["unreadable"]] == ["dangling symlink to ../pics/gone.jpg"]
    rows = pq.read_table(str(out), columns=["relative_path", "size"]).to_pylist()
    by_path = {r["relative_path"]: r["size"] for r in rows}
    assert by_path["links/good.jpg"] == (tree / "pics/photo.jpg").stat().st_size  # the target's bytes

    only_jpg = tmp_path / "jpg"
    result = CliRunner().invoke(
        main, ["ingest", "--input", str(tree), "--output", str(only_jpg), "--extensions", "JPG"]
    )
    assert result.exit_code == 0, result.output
    c = json.loads((only_jpg / "_m9.json").read_text())["counts"]
    assert (c["files_found"], c["ignored_files"], c["unreadable_files"]) == (3, 12, 1)
    assert c["entries"] == c["files_found"] + c["ignored_files"] + c["hidden_files"] + c["unreadable_files"]


@pytest.mark.slow
def test_files_and_row_groups_are_sized_by_bytes(spark, tmp_path):
    """~120 KB images with --bytes-per-file 2 MB: files of about 2 MB, row groups of a few rows each."""
    from m9.config import IngestConfig
    from m9.stages.ingest import ROW_GROUP_BYTES, ROW_GROUP_CHECK_ROWS, ingest

    rng = np.random.default_rng(0)
    src = tmp_path / "noise" / "label"
    src.mkdir(parents=True)
    for i in range(40):  # noise does not compress: each PNG is ~120 KB
        Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(src / f"{i:02d}.png")
    total = sum(p.stat().st_size for p in src.iterdir())
    result = ingest(IngestConfig(input=str(tmp_path / "noise"), output=str(tmp_path / "out"), bytes_per_file=2**21))
    files = sorted((tmp_path / "out").glob("part-*.parquet"))
    assert result.counts["parquet_files"] == len(files) == math.ceil(total / 2**21)
    assert result.counts["rows"] == 40
    for f in files:
        meta = pq.ParquetFile(f).metadata
        groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
        # parquet-mr checks a group's size every ROW_GROUP_CHECK_ROWS rows (by default every 100 rows, and
        # then a file's ~16 rows would share one group)
        assert max(g.num_rows for g in groups) <= ROW_GROUP_BYTES // 100_000 + ROW_GROUP_CHECK_ROWS
