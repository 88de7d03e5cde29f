"""Ingest: Spark's binaryFile source reads the image tree into Parquet with ids, labels and splits."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from m9 import spark as m9spark
from m9 import stage, storage
from m9.config import IMAGE_EXTENSIONS, IngestConfig
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


def images_frame(spark, src: str):
    """The images under src as a DataFrame with m9's ingest schema (lazy; nothing is read yet)."""
    from pyspark.sql import functions as F

    root = m9spark.spark_uri(src)
    # What Spark reports for each file starts with the root's path, after its scheme (file:/x or s3a://b/x).
    root_path = root.split(":", 1)[1].lstrip("/")
    raw = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .option("pathGlobFilter", _glob())
        .load(root)
    )
    # Spark reports paths as URIs (a space is %20); decode them, keeping a literal '+' a '+'.
    decoded = F.expr("url_decode(replace(path, '+', '%2B'))")
    rel = F.expr(f"substring(decoded, instr(decoded, '{root_path}') + {len(root_path) + 1})")
    dirs = F.slice(F.split(F.col("rel"), "/"), 1, F.size(F.split(F.col("rel"), "/")) - 1)
    lower_dirs = F.transform(dirs, lambda d: F.lower(d))
    return (
        raw.select("path", "length", "content")
        .withColumn("decoded", decoded)
        .withColumn("rel", F.regexp_replace(rel, "^/+", ""))
        .select(
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
    )


def _count_all_files(spark, src: str) -> int:
    """Every non-hidden file under src, images or not (only paths are read, not contents)."""
    return (
        spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(m9spark.spark_uri(src))
        .select("path").count()
    )


def ingest(cfg: IngestConfig) -> dict:
    """Read every jpg/jpeg/png under cfg.input into Parquet files of about cfg.images_per_file rows."""
    src, out = storage.normalize(cfg.input), storage.normalize(cfg.output)
    _check_input(src)
    if cfg.images_per_file < 1:
        raise InputError("--images-per-file must be at least 1")
    done = stage.guard_output(out, "ingest", src, cfg.overwrite)
    if done is not None:
        log.info("ingest: %s already holds this input's output; skipping", out)
        return {**done, "skipped": True}
    with m9spark.session("m9-ingest") as spark:
        frame = images_frame(spark, src).cache()
        found = frame.count()
        if found == 0:
            frame.unpersist()
            raise InputError(f"no images (.{', .'.join(IMAGE_EXTENSIONS)}) found under {src}")
        ignored = _count_all_files(spark, src) - found
        files = math.ceil(found / cfg.images_per_file)
        (
            frame.repartition(files, "image_id")
            .sortWithinPartitions("image_id")
            .write.mode("overwrite")
            .option("maxRecordsPerFile", cfg.images_per_file)
            .option("compression", "snappy")
            .option("parquet.block.size", ROW_GROUP_BYTES)
            .parquet(m9spark.spark_uri(out))
        )
        written = spark.read.parquet(m9spark.spark_uri(out)).count()
        frame.unpersist()
    if written != found:
        raise RuntimeError(f"ingest wrote {written} rows for {found} files found")
    counts = {"files_found": found, "rows": written, "ignored_files": ignored, "parquet_files": len(
        storage.list_files(out, ".parquet"))}
    log.info("ingest: %d images from %s into %d Parquet files (%d other files ignored)",
             found, src, counts["parquet_files"], ignored)
    return stage.write_manifest(out, "ingest", src, counts, images_per_file=cfg.images_per_file)
