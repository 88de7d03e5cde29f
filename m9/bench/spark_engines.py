"""Engines `spark-udf`, `spark-udf-defaults` and `spark-predict`: the seed's method and Spark's own UDF."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pyarrow as pa

from m9.bench.config import (
    ARROW_BATCH_BATCHES,
    DEFAULT_KNOBS_ARROW_BATCH,
    DEFAULT_KNOBS_BATCH_SIZE,
    DEFAULT_KNOBS_THREADS,
    BenchConfig,
    Outcome,
)
from m9.config import FEATURE_DIM
from m9.model.spec import ModelSpec


def _spark_tasks_and_threads(cfg: BenchConfig) -> tuple[int, int]:
    """Concurrent tasks (one per actor the Ray engine would run) and the threads each runs: m9's one resource
    plan (embed.plan_resources) for a local node of this machine's cores, so both engines get one layout."""
    from m9.stages.embed import plan_resources

    _, threads = plan_resources([float(os.cpu_count() or 1)], cfg.actors)
    return cfg.actors, threads


@contextlib.contextmanager
def _arrow_batch(spark, records: int) -> Iterator[None]:
    """Set spark.sql.execution.arrow.maxRecordsPerBatch for one engine's run, then restore it."""
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    previous = spark.conf.get(key)
    spark.conf.set(key, str(records))
    try:
        yield
    finally:
        spark.conf.set(key, previous)


def _spark_knobs(runtime: str, tasks: int, threads: int | None, batch_size: int, arrow_batch: int) -> dict:
    # threads None: TensorFlow's default pools, as many intra-op and inter-op threads as cores, in every task.
    threads_out = threads if threads else "tf-default"
    return {
        "runtime": runtime,
        "tasks": tasks,
        "threads_per_task": threads_out,
        "batch_size": batch_size,
        "arrow_batch_size": arrow_batch,
    }


def _spark_frame(spark, input_dir: str, tasks: int):
    from m9.engines.spark import read_uri

    # repartition: a small Parquet file is one split, which would leave all but one core idle.
    return spark.read.parquet(read_uri(input_dir)).select("image_id", "content").repartition(tasks)


def _collect(df, model_loads) -> tuple[list[str], np.ndarray, np.ndarray, int]:
    pdf = df.select("image_id", "out.features", "out.done_at").toPandas()
    return (
        list(pdf["image_id"]),
        pdf["done_at"].to_numpy(),
        np.stack(pdf["features"].to_numpy()).astype(np.float32),
        model_loads.value,
    )


def _embed_stamped(embedder, contents: list) -> tuple[np.ndarray, np.ndarray]:
    """Embedder.embed over one Arrow batch, with the time each forward batch finished for every row in it.

    Like the seed's UDF and Embedder.embed, the whole Arrow batch is decoded first and then run through the
    model in slices of the batch size; the per-slice times let the steady rate be measured even when an
    Arrow batch holds a task's every row (Spark's default of 10,000 rows).
    """
    from m9.model.embedder import place

    inputs, errors = embedder.decode(contents)
    slices, stamps = [np.zeros((0, FEATURE_DIM), np.float32)], [np.zeros(0)]
    for features in embedder.forward_slices(inputs):
        slices.append(features)
        stamps.append(np.full(len(features), time.time()))
    return place(np.concatenate(slices), errors), place(np.concatenate(stamps), errors, fill=time.time())


def run_spark_udf(
    cfg: BenchConfig, input_dir: str, table: pa.Table, model: ModelSpec, defaults: bool = False
) -> Outcome:
    """The seed's method: weights broadcast from the driver; an iterator pandas UDF builds the model once per
    task and embeds each Arrow batch.

    With m9's knobs (the resource plan's threads per task, m9's batch size, a small Arrow batch) unless
    `defaults`: then with the knobs a notebook leaves at their defaults (DEFAULT_KNOBS_*, Keras only). Python
    workers are new per Spark session, so each engine's thread setting holds unless the caller keeps one
    session for both. On Keras the driver builds the model to broadcast its arrays (model.get_weights(), as
    the seed does); on ONNX it broadcasts the resolved model (its checked bytes) and builds nothing.
    """
    import pandas as pd
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, DoubleType, FloatType, StructField, StructType

    from m9.engines import spark as m9spark

    runtime = model.runtime
    if defaults and runtime != "keras":
        raise ValueError("the seed's default knobs are Keras's; spark-udf-defaults runs on Keras only")
    threads: int | None  # None: TensorFlow's default pools (the seed's knobs)
    tasks, threads = _spark_tasks_and_threads(cfg)
    batch_size, arrow_batch = cfg.batch_size, ARROW_BATCH_BATCHES * cfg.batch_size
    if defaults:
        threads, batch_size, arrow_batch = DEFAULT_KNOBS_THREADS, DEFAULT_KNOBS_BATCH_SIZE, DEFAULT_KNOBS_ARROW_BATCH
    out_type = StructType([StructField("features", ArrayType(FloatType())), StructField("done_at", DoubleType())])
    with m9spark.session("m9-bench") as spark, _arrow_batch(spark, arrow_batch):
        sc = spark.sparkContext
        if runtime == "keras":
            from m9.model.keras_model import load_model

            arrays = load_model(data=model.data, name=model.source).get_weights()
            # The arrays travel in the broadcast; the spec beside them only names what they must be.
            weights, builds, spec = sc.broadcast(arrays), 1, replace(model, data=b"")
        else:
            weights, builds, spec = sc.broadcast(model), 0, None
        loads = sc.accumulator(0)

        def embed_udf(contents):
            from m9.model.embedder import Embedder

            if spec is None:
                embedder = Embedder(weights.value, threads=threads, batch_size=batch_size)
            else:
                embedder = Embedder(spec, threads=threads, batch_size=batch_size, arrays=weights.value)
            loads.add(1)
            for series in contents:
                features, done_at = _embed_stamped(embedder, list(series))
                yield pd.DataFrame({"features": list(features), "done_at": done_at})

        # Real types, not the strings `from __future__ import annotations` would leave for Spark to read.
        embed_udf.__annotations__ = {"contents": Iterator[pd.Series], "return": Iterator[pd.DataFrame]}
        # pyspark's stubs have no overload for this Spark 3 form (the UDF's kind read from its type hints).
        udf = F.pandas_udf(embed_udf, out_type)  # type: ignore[call-overload]
        df = _spark_frame(spark, input_dir, tasks).withColumn("out", udf("content"))
        ids, done, feats, n_loads = _collect(df, loads)
        weights.destroy()
    knobs = _spark_knobs(runtime, tasks, threads, batch_size, arrow_batch)
    return Outcome(ids, done, feats, n_loads, knobs, extra={"driver_model_builds": builds})


def run_spark_predict(cfg: BenchConfig, input_dir: str, table: pa.Table, model: ModelSpec) -> Outcome:
    """Spark's own predict_batch_udf on the bench's runtime; make_predict_fn builds the model on the
    executor from the resolved model, which travels in the function's closure."""
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql.types import ArrayType, DoubleType, FloatType, StructField, StructType

    from m9.engines import spark as m9spark

    tasks, threads = _spark_tasks_and_threads(cfg)
    arrow_batch = ARROW_BATCH_BATCHES * cfg.batch_size
    batch_size, runtime = cfg.batch_size, model.runtime
    out_type = StructType([StructField("features", ArrayType(FloatType())), StructField("done_at", DoubleType())])
    with m9spark.session("m9-bench") as spark, _arrow_batch(spark, arrow_batch):
        loads = spark.sparkContext.accumulator(0)

        def make_predict_fn():
            from m9.model.embedder import Embedder

            embedder = Embedder(model, threads=threads, batch_size=batch_size)
            loads.add(1)

            def predict(contents: np.ndarray) -> dict[str, np.ndarray]:
                features, _ = embedder.embed(list(contents))
                return {"features": features, "done_at": np.full(len(contents), time.time())}

            return predict

        udf = predict_batch_udf(make_predict_fn, return_type=out_type, batch_size=batch_size)
        df = _spark_frame(spark, input_dir, tasks).withColumn("out", udf("content"))
        ids, done, feats, n_loads = _collect(df, loads)
    return Outcome(ids, done, feats, n_loads, _spark_knobs(runtime, tasks, threads, batch_size, arrow_batch))
