"""Ingest: Spark's binaryFile source reads the image tree into Parquet with ids, labels and splits."""

from __future__ import annotations

import io
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from m9.config import IMAGE_EXTENSIONS, IngestConfig
from m9.engines import spark as m9spark
from m9.errors import InputError
from m9.io import lease, storage
from m9.stages import lifecycle, listing
from m9.stages.contract import INGEST, INGEST_INDEX
from m9.stages.lifecycle import Manifest
from m9.ui.progress import spark_tasks

log = logging.getLogger(__name__)

#: Hex characters of sha256(relative path) kept as image_id: 64 bits, collision-free far past 10^9 images.
ID_HEX_CHARS = 16

#: Parquet row-group size of the ingest output. Embed's work items read the row groups they overlap, so
#: small groups keep each read close to the rows it needs; 256 KiB is still far above Parquet's per-group
#: cost. (parquet-mr checks the size every ROW_GROUP_CHECK_ROWS rows, so groups hold at least that many.)
ROW_GROUP_BYTES = 256 * 1024

#: Rows parquet-mr writes between two checks of a row group's size (its default is 100, which let groups
#: of 1 MB photos grow to 100 MB, and every work item read a whole group to use 64 rows of it).
ROW_GROUP_CHECK_ROWS = 4

#: Unreadable files listed by name in the manifest (all are counted); the rest are summed by reason.
UNREADABLE_LISTED = 100


def _check_input(src: str) -> None:
    if storage.is_s3(src):
        if not storage.exists(src):
            raise InputError(f"input {src} does not exist or is empty")
    elif not Path(src).is_dir():
        raise InputError(f"input {src} is not a folder" if Path(src).exists() else f"input {src} does not exist")


def images_frame(
    spark, src: str, empty_files: Sequence[str] = (), extensions=IMAGE_EXTENSIONS, files: list[str] | None = None
):
    """The images under src as a DataFrame with m9's ingest schema (lazy; nothing is read yet).

    empty_files are filesystem paths of zero-byte images, which Spark's scan skips; they are added back
    with empty content so that embed rejects them with a reason instead of losing them. files, if given,
    are the filesystem paths (non-empty images under src) to read instead of the whole tree: the rows are
    those a read of the whole tree gives for them.
    """
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    root = m9spark.spark_uri(src)
    # What Spark reports for each file starts with the root's path, after its scheme (file:/x or s3a://b/x).
    scheme, root_path = root.split(":", 1)
    root_path = root_path.lstrip("/")
    schema = T.StructType(
        [
            T.StructField("decoded", T.StringType()),
            T.StructField("length", T.LongType()),
            T.StructField("content", T.BinaryType()),
        ]
    )
    if files is not None and not files:
        raw = spark.createDataFrame([], schema)
    else:
        where = m9spark.read_uri(src) if files is None else [m9spark.read_uri(_uri(src, p)) for p in files]
        raw = (
            spark.read.format("binaryFile")
            .option("recursiveFileLookup", "true")
            .option("pathGlobFilter", listing.glob_of(extensions))
            # A file m9's listing found unreadable (permission denied) is counted there; Spark must skip it,
            # not fail the job. The count check after the read catches any other file Spark skipped.
            .option("ignoreCorruptFiles", "true")
            .load(where)
            # Spark 3.5 reports each file's path as it is (a space stays a space, a literal "%20" stays "%20"):
            # URL-decoding it would turn real names into names that do not exist, or fail on "100%.jpg".
            .select(F.col("path").alias("decoded"), "length", "content")
        )
    if empty_files:
        prefix = "file:" if scheme == "file" else f"{scheme}://"
        raw = raw.unionByName(spark.createDataFrame([(prefix + p, 0, bytearray()) for p in empty_files], schema))
    # Column functions, not SQL text, so that a quote in the root's path cannot break the expression.
    rel = F.col("decoded").substr(F.instr("decoded", root_path) + len(root_path) + 1, F.lit(1 << 30))
    parts = F.split(F.col("rel"), "/")
    lower_dirs = F.transform(F.slice(parts, 1, F.size(parts) - 1), lambda d: F.lower(d))
    return raw.withColumn("rel", F.regexp_replace(rel, "^/+", "")).select(
        F.substring(F.sha2(F.col("rel"), 256), 1, ID_HEX_CHARS).alias("image_id"),
        F.regexp_replace(F.regexp_replace("decoded", "^file:(//)?", ""), "^s3[an]://", "s3://").alias("path"),
        F.col("rel").alias("relative_path"),
        F.element_at(F.split(F.col("decoded"), "/"), -2).alias("label"),
        F.when(F.array_contains(lower_dirs, "training"), F.lit("Training"))
        .when(F.array_contains(lower_dirs, "test"), F.lit("Test"))
        .otherwise(F.lit(None).cast("string"))
        .alias("split"),
        F.sha2(F.col("content"), 256).alias("sha256"),
        F.col("length").alias("size"),
        F.col("content"),
    )


def _uri(src: str, fs_path: str) -> str:
    """A listed file's URI: its path inside the filesystem, with s3:// for an S3 input."""
    return f"s3://{fs_path}" if storage.is_s3(src) else fs_path


def ingest(cfg: IngestConfig) -> Manifest:
    """Read every image (cfg.extensions) under cfg.input into Parquet files of at most cfg.images_per_file
    rows and about cfg.bytes_per_file bytes; every entry of the tree is counted. An output of an earlier
    state of the same tree is updated: only the images added or changed since are read (see _update)."""
    src, out = storage.normalize(cfg.input), storage.normalize(cfg.output)
    storage.check_access(read=src, write=out)
    _check_input(src)
    if cfg.images_per_file < 1:
        raise InputError("--images-per-file must be at least 1")
    if cfg.bytes_per_file < 1:
        raise InputError("--bytes-per-file must be at least 1")
    lifecycle.check_not_a_file(out)
    tree = listing.list_tree(src)
    images = [f for f in tree.files if listing.is_image(f[0].rsplit("/", 1)[-1], cfg.extensions)]
    unreadable = [(p, r) for p, r in tree.unreadable if listing.is_image(p.rsplit("/", 1)[-1], cfg.extensions)]
    if not images:
        raise InputError(
            f"no images (.{', .'.join(cfg.extensions)}) found under {src}"
            + (f"; {len(unreadable)} unreadable" if unreadable else "")
        )
    # The input is the tree as listed (each image's path, size and modification time); where it is, the
    # source, is not: the same tree grown, shrunk or edited updates the output, another tree is refused.
    # extensions as a list: the fingerprint is compared with its JSON copy, where a tuple is a list.
    print_ = lifecycle.fingerprint(
        INGEST, cfg, f"files:{lifecycle.digest(images)}", source=src, extensions=list(cfg.extensions)
    )
    with lease.hold(out, INGEST.name):
        done = lifecycle.prepare(INGEST, out, print_, cfg.overwrite, in_place=True)
        if done is not None:
            log.info("ingest: %s already holds this input's output; skipping", out)
            return done
        return _write(cfg, src, out, images, tree, unreadable, print_)


#: The schema of INGEST_INDEX: one row per ingested image, and the part file (its name) holding it.
INDEX_SCHEMA = pa.schema(
    [("relative_path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("part", pa.string())]
)


def read_index(out: str) -> pa.Table | None:
    """The ingest output's index (INGEST_INDEX), or None when it has none (an earlier m9, or a first run
    killed before it)."""
    uri = storage.join(out, INGEST_INDEX)
    if not storage.exists(uri):
        return None
    fs, path = storage.filesystem(uri)
    return pq.read_table(path, filesystem=fs).cast(INDEX_SCHEMA)


def _write_index(out: str, rows: list[tuple[str, int, int, str]]) -> None:
    """The commit point of an ingest: the parts it names are the output; others are leftovers."""
    rows = sorted(rows)
    table = pa.table({name: [r[i] for r in rows] for i, name in enumerate(INDEX_SCHEMA.names)}, schema=INDEX_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy")
    storage.write_bytes_atomic(storage.join(out, INGEST_INDEX), buf.getvalue())


def _part_paths(out: str, parts) -> dict[str, list[str]]:
    """part name → the relative paths of its rows (its relative_path column only)."""
    found = {}
    for name in parts:
        fs, path = storage.filesystem(storage.join(out, name))
        found[name] = pq.read_table(path, filesystem=fs, columns=["relative_path"]).column(0).to_pylist()
    return found


def _index_rows(paths: dict[str, list[str]], stats: dict[str, tuple[int, int]]) -> list[tuple[str, int, int, str]]:
    """Index rows of parts (paths: part name → its rows' relative paths), each row's size and mtime from the
    listing (stats: relative path → (size, mtime_ns)); a row the listing does not name gets mtime -1, so the
    next update reads it again."""
    rows = []
    for part, rels in paths.items():
        for rel in rels:
            size, mtime = stats.get(rel, (-1, -1))
            rows.append((rel, size, mtime, part))
    return rows


def _spark_write(spark, frame, found: int, total_bytes: int, cfg: IngestConfig, out: str) -> None:
    """Append frame's rows to out as Parquet parts of ingest's layout."""
    files = max(math.ceil(found / cfg.images_per_file), math.ceil(total_bytes / cfg.bytes_per_file), 1)
    with spark_tasks(spark, "ingest", f"writing {found} images"):
        (
            frame.repartition(files, "image_id")
            .sortWithinPartitions("image_id")
            .write.mode("append")
            .option("maxRecordsPerFile", cfg.images_per_file)
            .option("compression", "snappy")
            .option("parquet.block.size", ROW_GROUP_BYTES)
            .option("parquet.block.size.row.check.min", ROW_GROUP_CHECK_ROWS)
            .option("parquet.page.size.row.check.min", ROW_GROUP_CHECK_ROWS)
            .parquet(m9spark.spark_uri(out))
        )


def _read_images(
    spark, src: str, out: str, cfg: IngestConfig, images: list, files: list[str] | None
) -> dict[str, list[str]]:
    """Read images (listing rows; files: their non-empty paths to read one by one, or None for the whole
    tree) with Spark and append them to out; returns the new parts, each with its rows' relative paths."""
    empty = [path for path, size, _ in images if size == 0]
    frame = images_frame(spark, src, empty, cfg.extensions, files=files)
    before = _parts(out)
    if images:
        # One pass: read, hash and write. Counting first would read every image twice, or hold all their
        # bytes in Spark's cache (13.3 against 14.7 s for 10,000 thumbnails, AMD EPYC, 2 cores).
        _spark_write(spark, frame, len(images), sum(size for _, size, _ in images), cfg, out)
    written = _part_paths(out, _parts(out) - before)
    found = sum(len(rels) for rels in written.values())
    if found != len(images):
        # The new parts are named in no index: the next run removes them.
        raise InputError(
            f"Spark found {found} images under {src} but the listing has {len(images)}; "
            f"was the folder changed during the run? Re-run the same command."
        )
    return written


def _parts(out: str) -> set[str]:
    return {uri.rsplit("/", 1)[-1] for uri in storage.list_files(out, ".parquet")}


def _write(
    cfg: IngestConfig, src: str, out: str, images: list, tree: listing.Listing, unreadable: list, print_: dict
) -> Manifest:
    started = time.perf_counter()
    ignored = len(tree.files) + len(tree.unreadable) - len(images) - len(unreadable)
    total_bytes = sum(size for _, size, _ in images)
    root = storage.filesystem(src)[1]
    stats = {path[len(root) :].lstrip("/"): (size, mtime) for path, size, mtime in images}
    index = read_index(out)
    with m9spark.session("m9-ingest", s3=storage.is_s3(src) or storage.is_s3(out)) as spark:
        m9spark.configure_s3(spark, src, out)
        if index is None:
            # Spark appends below: its "overwrite" mode would delete the folder, and with it the lease we
            # hold. An interrupted run's files are ours (lifecycle.prepare checked), so clear them first.
            for name in lifecycle.owned_files(INGEST, out):
                storage.remove(storage.join(out, name))
            rows = _index_rows(_read_images(spark, src, out, cfg, images, None), stats)
            change = {"added": len(rows), "removed": 0, "unchanged": 0}
        else:
            rows, change = _update(spark, cfg, src, out, images, stats, index, root)
        _write_index(out, rows)
    # The index is committed: what it does not name goes (parts an update replaced, Spark's commit files).
    kept = {part for *_, part in rows}
    for name in lifecycle.owned_files(INGEST, out):
        if name != INGEST_INDEX and name not in kept:
            storage.remove(storage.join(out, name))
    written = sum(_row_counts(out, kept).values())
    if written != len(rows) or len(rows) != len(images):
        raise RuntimeError(f"ingest wrote {written} rows ({len(rows)} indexed) for {len(images)} files listed")
    reasons = Counter(reason.split(" to ")[0] for _, reason in unreadable)
    counts = {
        "entries": len(tree.files) + len(tree.unreadable) + tree.hidden,
        "files_found": len(images),
        "rows": written,
        "ignored_files": ignored,
        "hidden_files": tree.hidden,
        "unreadable_files": len(unreadable),
        "parquet_files": len(kept),
        **change,
    }
    log.info(
        "ingest: %d images (%.0f MB) from %s into %d Parquet files (%d read, %d removed, %d unchanged; %d other "
        "files and %d hidden files ignored, %d unreadable%s)",
        len(images),
        total_bytes / 1e6,
        src,
        counts["parquet_files"],
        change["added"],
        change["removed"],
        change["unchanged"],
        ignored,
        tree.hidden,
        len(unreadable),
        f": {listing.unreadable_summary(reasons)}" if unreadable else "",
    )
    for path, reason in unreadable[:UNREADABLE_LISTED]:
        log.warning("ingest: unreadable: %s: %s", path, reason)
    details = {
        "images_per_file": cfg.images_per_file,
        "bytes_per_file": cfg.bytes_per_file,
        "update": index is not None,
        "unreadable": [{"path": p, "reason": r} for p, r in unreadable[:UNREADABLE_LISTED]],
        "unreadable_reasons": dict(reasons),
        "wall_s": round(time.perf_counter() - started, 2),
    }
    return lifecycle.write_manifest(
        out, Manifest(stage=INGEST.name, input=src, fingerprint=print_, counts=counts, details=details)
    )


def _row_counts(out: str, parts) -> dict[str, int]:
    counts = {}
    for name in parts:
        fs, path = storage.filesystem(storage.join(out, name))
        counts[name] = pq.ParquetFile(path, filesystem=fs).metadata.num_rows
    return counts


def _update(spark, cfg: IngestConfig, src: str, out: str, images: list, stats: dict, index: pa.Table, root: str):
    """Bring an indexed output up to the tree as listed now; returns (the new index's rows, counts).

    An image is unchanged when its relative path, size and mtime are those indexed; an indexed row that is
    not is removed (a changed file is removed and read again), and every listed image not unchanged is read.
    Spark reads only those; each part holding a removed row is written again without it, under a new name
    (a part's name says which rows it holds: embed keeps the output of every part still there); the other
    parts stay as they are. Nothing is deleted here: the new index, once written, says what the output is.
    """
    indexed = index.to_pylist()
    holding = {row["part"] for row in indexed}
    # Parts the index does not name were written by a run killed before its index: leftovers.
    for name in lifecycle.owned_files(INGEST, out):
        if name != INGEST_INDEX and name not in holding:
            log.info("ingest: removing %s, left by an interrupted run", name)
            storage.remove(storage.join(out, name))
    unchanged = [r for r in indexed if stats.get(r["relative_path"]) == (r["size"], r["mtime_ns"])]
    removed = [r for r in indexed if stats.get(r["relative_path"]) != (r["size"], r["mtime_ns"])]
    kept_paths = {r["relative_path"] for r in unchanged}
    added = [f for f in images if f[0][len(root) :].lstrip("/") not in kept_paths]
    log.info(
        "ingest: updating %s: %d images to read, %d to remove, %d unchanged",
        out,
        len(added),
        len(removed),
        len(unchanged),
    )
    new_parts = _read_images(spark, src, out, cfg, added, [path for path, size, _ in added if size > 0])
    gone = {r["relative_path"] for r in removed}
    renamed: dict[str, str | None] = {}
    for part in sorted({r["part"] for r in removed}):
        renamed[part] = _rewrite_without(out, part, gone)
    rows = [(r["relative_path"], r["size"], r["mtime_ns"], renamed.get(r["part"], r["part"])) for r in unchanged]
    rows += _index_rows(new_parts, stats)
    return rows, {"added": len(added), "removed": len(removed), "unchanged": len(unchanged)}


def _rewrite_without(out: str, part: str, gone: set[str]) -> str | None:
    """Write part's rows but those whose relative path is in gone to a part of a new name, in ingest's
    layout (order and row groups); returns its name, or None when no row is left."""
    fs, path = storage.filesystem(storage.join(out, part))
    table = pq.read_table(path, filesystem=fs)
    keep = pc.invert(pc.is_in(table.column("relative_path"), value_set=pa.array(sorted(gone), pa.string())))
    table = table.filter(keep)
    if not table.num_rows:
        return None
    name = f"part-{uuid.uuid4()}-m9.snappy.parquet"
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy", row_group_size=row_group_rows(table))
    storage.write_bytes_atomic(storage.join(out, name), buf.getvalue())
    return name


def row_group_rows(table) -> int:
    """Rows per row group that give a pyarrow-written copy of ingested rows (an Arrow table with `content`)
    ingest's own layout: about ROW_GROUP_BYTES, at least ROW_GROUP_CHECK_ROWS rows."""
    per_row = table.column("content").nbytes // max(table.num_rows, 1)
    return max(ROW_GROUP_CHECK_ROWS, ROW_GROUP_BYTES // max(per_row, 1))
