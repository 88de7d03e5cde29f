"""Ingest: Spark's binaryFile source reads the image tree into Parquet with ids, labels and splits."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pyarrow.fs as pafs

from m9 import contract, lease, storage
from m9 import spark as m9spark
from m9.config import IMAGE_EXTENSIONS, IngestConfig
from m9.contract import INGEST, Manifest
from m9.errors import InputError

log = logging.getLogger(__name__)

#: Hex characters of sha256(relative path) kept as image_id: 64 bits, collision-free far past 10^9 images.
ID_HEX_CHARS = 16

#: Parquet row-group size of the ingest output. Embed hands out work by row group, so small groups
#: let every actor start at once; 256 KiB is still far above Parquet's per-group cost. (parquet-mr checks
#: the size every 100 rows, so groups of small JPEGs hold 100 rows; embed slices them further.)
ROW_GROUP_BYTES = 256 * 1024


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


def _is_image(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def list_tree(src: str) -> tuple[list[tuple[str, int]], int]:
    """(path inside the filesystem, size) of every file under src that Spark would see, and how many
    hidden files it skipped.

    Hadoop skips names starting with '.' or '_' (hidden and bookkeeping files, or any file below such a
    folder); so does this listing, and m9 never reads them, but it counts them so the user can see them.
    Spark's file scans also drop zero-byte files without a word, so m9 lists the tree itself to find them.
    """
    fs, root = storage.filesystem(src)
    files, hidden = [], 0
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root) :].lstrip("/")
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            hidden += 1
            continue
        files.append((info.path, info.size))
    return files, hidden


def images_frame(spark, src: str, empty_files: list[str] = ()):
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
        .option("pathGlobFilter", _glob())
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
    """Read every jpg/jpeg/png under cfg.input into Parquet files of about cfg.images_per_file rows."""
    src, out = storage.normalize(cfg.input), storage.normalize(cfg.output)
    storage.check_access(read=src, write=out)
    _check_input(src)
    if cfg.images_per_file < 1:
        raise InputError("--images-per-file must be at least 1")
    contract.check_not_a_file(out)
    listed, hidden = list_tree(src)
    images = [(path, size) for path, size in listed if _is_image(path.rsplit("/", 1)[-1])]
    # The input is the tree as listed: where it is, and each image's path and size.
    if not images:
        raise InputError(f"no images (.{', .'.join(IMAGE_EXTENSIONS)}) found under {src}")
    print_ = contract.fingerprint(INGEST, cfg, f"files:{contract.digest([src, images])}")
    with lease.hold(out, INGEST.name):
        done = contract.prepare(INGEST, out, print_, cfg.overwrite)
        if done is not None:
            log.info("ingest: %s already holds this input's output; skipping", out)
            return done
        return _write(cfg, src, out, images, len(listed) - len(images), hidden, print_)


def _write(cfg: IngestConfig, src: str, out: str, images: list, ignored: int, hidden: int, print_: dict) -> Manifest:
    started = time.perf_counter()
    # Spark appends below: its "overwrite" mode would delete the folder, and with it the lease we hold.
    # An interrupted run's files are ours (contract.prepare checked), so clear them first.
    for name in contract.owned_files(INGEST, out):
        storage.remove(storage.join(out, name))
    with m9spark.session("m9-ingest", s3=storage.is_s3(src) or storage.is_s3(out)) as spark:
        m9spark.configure_s3(spark, src, out)
        frame = images_frame(spark, src, [path for path, size in images if size == 0]).cache()
        found = frame.count()
        if found != len(images):
            frame.unpersist()
            raise InputError(
                f"Spark found {found} images under {src} but the listing has {len(images)}; "
                f"was the folder changed during the run? Re-run the same command."
            )
        files = math.ceil(found / cfg.images_per_file)
        (
            frame.repartition(files, "image_id")
            .sortWithinPartitions("image_id")
            .write.mode("append")
            .option("maxRecordsPerFile", cfg.images_per_file)
            .option("compression", "snappy")
            .option("parquet.block.size", ROW_GROUP_BYTES)
            .parquet(m9spark.spark_uri(out))
        )
        written = spark.read.parquet(m9spark.read_uri(out)).count()
        frame.unpersist()
    if written != found:
        raise RuntimeError(f"ingest wrote {written} rows for {found} files found")
    counts = {
        "files_found": found,
        "rows": written,
        "ignored_files": ignored,
        "hidden_files": hidden,
        "parquet_files": len(storage.list_files(out, ".parquet")),
    }
    log.info(
        "ingest: %d images from %s into %d Parquet files (%d other files and %d hidden files ignored)",
        found,
        src,
        counts["parquet_files"],
        ignored,
        hidden,
    )
    details = {"images_per_file": cfg.images_per_file, "wall_s": round(time.perf_counter() - started, 2)}
    return contract.write_manifest(
        out, Manifest(stage=INGEST.name, input=src, fingerprint=print_, counts=counts, details=details)
    )
