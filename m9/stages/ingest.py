"""Ingest: Spark's binaryFile source reads the image tree into Parquet with ids, labels and splits."""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

from m9.config import IMAGE_EXTENSIONS, IngestConfig
from m9.engines import spark as m9spark
from m9.errors import InputError
from m9.io import lease, storage
from m9.stages import contract
from m9.stages.contract import INGEST, Manifest
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


def _glob(extensions=IMAGE_EXTENSIONS) -> str:
    """A Hadoop glob matching the extensions in any case, e.g. *.{[jJ][pP][gG],…}."""

    def anycase(ext: str) -> str:
        return "".join(f"[{c.lower()}{c.upper()}]" for c in ext)

    return "*.{" + ",".join(anycase(e) for e in extensions) + "}"


def _check_input(src: str) -> None:
    if storage.is_s3(src):
        if not storage.exists(src):
            raise InputError(f"input {src} does not exist or is empty")
    elif not Path(src).is_dir():
        raise InputError(f"input {src} is not a folder" if Path(src).exists() else f"input {src} does not exist")


def _is_image(name: str, extensions=IMAGE_EXTENSIONS) -> bool:
    return "." in name and name.rsplit(".", 1)[-1].lower() in extensions


def parse_extensions(text: str) -> tuple[str, ...]:
    """`--extensions jpg,PNG,.webp` → ("jpg", "png", "webp")."""
    exts = tuple(dict.fromkeys(e.strip().lstrip(".").lower() for e in text.split(",") if e.strip()))
    if not exts or not all(e.isalnum() for e in exts):
        raise ValueError(f"--extensions {text}: expected comma-separated extensions like jpg,png,webp")
    return exts


@dataclass
class Listing:
    """Every entry under an input: the files Spark reads (path inside the filesystem, size), how many
    hidden ones it skips, and the ones nobody can read, each with its reason."""

    files: list[tuple[str, int]] = field(default_factory=list)
    hidden: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _walk_local(root: str) -> Listing:
    """The local tree as Hadoop's local filesystem lists it: symlinks followed (to files and to folders, as
    Hadoop's getFileStatus does; a file reached through two paths is two images, as Spark reads it), except
    a link whose target is gone, which Hadoop drops without a word and m9 counts as unreadable; a file the
    user cannot read is counted too (Spark would fail on it)."""
    listing = Listing()
    for top, dirs, names in os.walk(root, followlinks=True):
        real_top = os.path.realpath(top)
        for d in list(dirs):
            real = os.path.realpath(os.path.join(top, d))
            if real_top == real or real_top.startswith(real + os.sep):
                # Hadoop's listing follows it again and again (until the path is too long): no count of
                # the tree would be right, so the user removes the link.
                raise InputError(
                    f"{os.path.join(top, d)} links back to {real}, a folder above it: Spark would read that "
                    f"tree over and over; remove the link (or move the images out of its way)"
                )
        for name in sorted(names):
            path = os.path.join(top, name)
            rel = path[len(root) :].lstrip("/")
            if _hidden(rel):
                listing.hidden += 1
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                listing.unreadable.append((path, f"dangling symlink to {os.readlink(path)}"))
                continue
            except OSError as exc:  # a symlink loop, an I/O error
                listing.unreadable.append((path, f"cannot stat: {exc.strerror or exc}"))
                continue
            if not os.path.isfile(path):
                listing.unreadable.append((path, "not a regular file"))
            elif not os.access(path, os.R_OK):
                listing.unreadable.append((path, "permission denied"))
            else:
                listing.files.append((path, st.st_size))
    return listing


def list_tree(src: str) -> Listing:
    """Every entry under src: what Spark will see, the hidden files it skips, and the unreadable ones.

    Hadoop skips names starting with '.' or '_' (hidden and bookkeeping files, or any file below such a
    folder); so does this listing, and m9 never reads them, but it counts them so the user can see them.
    Spark's file scans also drop zero-byte files without a word, so m9 lists the tree itself to find them.
    """
    fs, root = storage.filesystem(src)
    if not storage.is_s3(src):
        return _walk_local(root)
    listing = Listing()
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        if _hidden(info.path[len(root) :].lstrip("/")):
            listing.hidden += 1
            continue
        listing.files.append((info.path, info.size))
    return listing


def unreadable_summary(reasons: dict[str, int]) -> str:
    """`2 dangling symlink, 1 permission denied` from {reason kind: count}."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(reasons.items()))


def images_frame(spark, src: str, empty_files: list[str] = (), extensions=IMAGE_EXTENSIONS):
    """The images under src as a DataFrame with m9's ingest schema (lazy; nothing is read yet).

    empty_files are filesystem paths of zero-byte images, which Spark's scan skips; they are added back
    with empty content so that embed rejects them with a reason instead of losing them.
    """
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    root = m9spark.spark_uri(src)
    # What Spark reports for each file starts with the root's path, after its scheme (file:/x or s3a://b/x).
    scheme, root_path = root.split(":", 1)
    root_path = root_path.lstrip("/")
    raw = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .option("pathGlobFilter", _glob(extensions))
        # A file m9's listing found unreadable (permission denied) is counted there; Spark must skip it,
        # not fail the job. The count check after the read catches any other file Spark skipped.
        .option("ignoreCorruptFiles", "true")
        .load(m9spark.read_uri(src))
        # Spark 3.5 reports each file's path as it is (a space stays a space, a literal "%20" stays "%20"):
        # URL-decoding it would turn real names into names that do not exist, or fail on "100%.jpg".
        .select(F.col("path").alias("decoded"), "length", "content")
    )
    if empty_files:
        prefix = "file:" if scheme == "file" else f"{scheme}://"
        schema = T.StructType(
            [
                T.StructField("decoded", T.StringType()),
                T.StructField("length", T.LongType()),
                T.StructField("content", T.BinaryType()),
            ]
        )
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


def ingest(cfg: IngestConfig) -> Manifest:
    """Read every image (cfg.extensions) under cfg.input into Parquet files of at most cfg.images_per_file
    rows and about cfg.bytes_per_file bytes; every entry of the tree is counted."""
    src, out = storage.normalize(cfg.input), storage.normalize(cfg.output)
    storage.check_access(read=src, write=out)
    _check_input(src)
    if cfg.images_per_file < 1:
        raise InputError("--images-per-file must be at least 1")
    if cfg.bytes_per_file < 1:
        raise InputError("--bytes-per-file must be at least 1")
    contract.check_not_a_file(out)
    listing = list_tree(src)
    images = [(path, size) for path, size in listing.files if _is_image(path.rsplit("/", 1)[-1], cfg.extensions)]
    unreadable = [(p, r) for p, r in listing.unreadable if _is_image(p.rsplit("/", 1)[-1], cfg.extensions)]
    if not images:
        raise InputError(
            f"no images (.{', .'.join(cfg.extensions)}) found under {src}"
            + (f"; {len(unreadable)} unreadable" if unreadable else "")
        )
    # The input is the tree as listed (each image's path and size); where it is, the source, is not: the
    # same tree grown or shrunk updates the output, another tree is refused.
    # extensions as a list: the fingerprint is compared with its JSON copy, where a tuple is a list.
    print_ = contract.fingerprint(
        INGEST, cfg, f"files:{contract.digest(images)}", source=src, extensions=list(cfg.extensions)
    )
    with lease.hold(out, INGEST.name):
        done = contract.prepare(INGEST, out, print_, cfg.overwrite)
        if done is not None:
            log.info("ingest: %s already holds this input's output; skipping", out)
            return done
        return _write(cfg, src, out, images, listing, unreadable, print_)


def _write(
    cfg: IngestConfig, src: str, out: str, images: list, listing: Listing, unreadable: list, print_: dict
) -> Manifest:
    started = time.perf_counter()
    ignored = len(listing.files) + len(listing.unreadable) - len(images) - len(unreadable)
    total_bytes = sum(size for _, size in images)
    # Spark appends below: its "overwrite" mode would delete the folder, and with it the lease we hold.
    # An interrupted run's files are ours (contract.prepare checked), so clear them first.
    for name in contract.owned_files(INGEST, out):
        storage.remove(storage.join(out, name))
    with m9spark.session("m9-ingest", s3=storage.is_s3(src) or storage.is_s3(out)) as spark:
        m9spark.configure_s3(spark, src, out)
        frame = images_frame(spark, src, [path for path, size in images if size == 0], cfg.extensions).cache()
        found = frame.count()
        if found != len(images):
            frame.unpersist()
            raise InputError(
                f"Spark found {found} images under {src} but the listing has {len(images)}; "
                f"was the folder changed during the run? Re-run the same command."
            )
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
        written = spark.read.parquet(m9spark.read_uri(out)).count()
        frame.unpersist()
    if written != found:
        raise RuntimeError(f"ingest wrote {written} rows for {found} files found")
    reasons = Counter(reason.split(" to ")[0] for _, reason in unreadable)
    counts = {
        "entries": len(listing.files) + len(listing.unreadable) + listing.hidden,
        "files_found": found,
        "rows": written,
        "ignored_files": ignored,
        "hidden_files": listing.hidden,
        "unreadable_files": len(unreadable),
        "parquet_files": len(storage.list_files(out, ".parquet")),
    }
    log.info(
        "ingest: %d images (%.0f MB) from %s into %d Parquet files (%d other files and %d hidden files ignored, "
        "%d unreadable%s)",
        found,
        total_bytes / 1e6,
        src,
        counts["parquet_files"],
        ignored,
        listing.hidden,
        len(unreadable),
        f": {unreadable_summary(reasons)}" if unreadable else "",
    )
    for path, reason in unreadable[:UNREADABLE_LISTED]:
        log.warning("ingest: unreadable: %s: %s", path, reason)
    details = {
        "images_per_file": cfg.images_per_file,
        "bytes_per_file": cfg.bytes_per_file,
        "unreadable": [{"path": p, "reason": r} for p, r in unreadable[:UNREADABLE_LISTED]],
        "unreadable_reasons": dict(reasons),
        "wall_s": round(time.perf_counter() - started, 2),
    }
    return contract.write_manifest(
        out, Manifest(stage=INGEST.name, input=src, fingerprint=print_, counts=counts, details=details)
    )


def row_group_rows(table) -> int:
    """Rows per row group that give a pyarrow-written copy of ingested rows (an Arrow table with `content`)
    ingest's own layout: about ROW_GROUP_BYTES, at least ROW_GROUP_CHECK_ROWS rows."""
    per_row = table.column("content").nbytes // max(table.num_rows, 1)
    return max(ROW_GROUP_CHECK_ROWS, ROW_GROUP_BYTES // max(per_row, 1))
