"""Bench: the same decode → preprocess → forward under each engine, timed against the bare model's ceiling."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import platform
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m9 import contract, storage
from m9.config import DEFAULT_ACTORS, DEFAULT_BATCH_SIZE, FEATURE_DIM
from m9.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["ENGINES", "BenchConfig", "bench", "scaling"]

#: Every engine, in the order a bench runs them: the two references first, then the distributions.
ENGINES = ("decode", "ceiling", "ray", "spark-udf", "spark-udf-defaults", "spark-predict")

#: Engines two runs must agree on (decode produces no features).
FEATURE_ENGINES = ("ceiling", "ray", "spark-udf", "spark-udf-defaults", "spark-predict")

#: The issue's bar for "the engines produced the same features": max |Δ| per feature value.
AGREE_TOLERANCE = 1e-4

#: Steady state is the rate between these fractions of rows done: it leaves out start-up, model loads and
#: the first batch's graph tracing (before) and the tail where some workers have already run dry (after).
STEADY_FROM, STEADY_TO = 0.2, 0.9

#: Seconds between samples of the process tree's memory and CPU: fine enough to catch a model load's
#: peak (seconds long), coarse enough that the sampler costs well under 1 % of a core.
SAMPLE_EVERY_S = 0.25

#: Batch sizes the ceiling tries: around the default, from where per-call overhead shows to where the
#: activations of one batch (~2.4 MB per image in MobileNetV2's first blocks) are far beyond any cache.
CEILING_BATCHES = (8, 16, 32, 64)

#: Images each ceiling configuration is timed over (after warm-up): ~4 s at 75 images/s, enough for a
#: rate within a few percent, small enough that the whole search stays around a minute.
CEILING_IMAGES = 256

#: Rows per Arrow batch for the Spark engines (spark.sql.execution.arrow.maxRecordsPerBatch, default
#: 10,000): a few forward batches, like the Ray engine's work items, so a task streams rather than holding
#: thousands of images' bytes and features at once.
ARROW_BATCH_BATCHES = 4

#: The knobs a notebook running the seed's UDF leaves alone (engine spark-udf-defaults): Keras
#: `model.predict`'s default batch, Spark's default spark.sql.execution.arrow.maxRecordsPerBatch, and
#: TensorFlow's own thread pools (None: as many intra- and inter-op threads as cores, in every task).
DEFAULT_KNOBS_BATCH_SIZE = 32
DEFAULT_KNOBS_ARROW_BATCH = 10_000
DEFAULT_KNOBS_THREADS = None

#: Rows per row group of the bench's input copy: several work items per file for the Ray engine.
INPUT_ROW_GROUP = 100


@dataclass(frozen=True)
class BenchConfig:
    """What `m9 bench` measures and where it writes."""

    input: str | None = None
    output: str = os.path.join("m9-out", "bench")
    engines: tuple[str, ...] = ENGINES
    actors: int = DEFAULT_ACTORS
    batch_size: int = DEFAULT_BATCH_SIZE
    limit: int | None = None
    repeat: int = 1
    ceiling_batches: tuple[int, ...] = CEILING_BATCHES
    ceiling_images: int = CEILING_IMAGES
    #: (processes, threads) pairs the ceiling tries; None: every way to split the cores (ceiling_configs).
    ceiling_configs: tuple[tuple[int, int], ...] | None = None


@dataclass
class Outcome:
    """What one engine run produced: per-row ids, features and the wall-clock second each row was done."""

    ids: list[str]
    done_at: np.ndarray
    features: np.ndarray | None
    model_loads: int
    knobs: dict
    steady: float | None = None  # engines that time their own steady state (ceiling, decode)
    started: float | None = None  # when the timed run began, if not when the engine was called (ceiling)
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------


class Monitor(threading.Thread):
    """Samples this process and all its descendants (Ray's raylet and workers, Spark's JVM and Python
    workers, the ceiling's processes): peak summed RSS and CPU seconds used while running."""

    def __init__(self):
        super().__init__(daemon=True)
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self._halt = threading.Event()
        self._cpu: dict[int, tuple[float, float]] = {}  # pid → (cpu seconds at first sight, at last sight)
        self._names: dict[int, str] = {self._me.pid: "driver"}
        self.peak_rss = 0

    def _sample(self) -> None:
        psutil = self._psutil
        try:
            procs = [self._me, *self._me.children(recursive=True)]
        except psutil.Error:
            return
        rss = 0
        for proc in procs:
            try:
                with proc.oneshot():
                    rss += proc.memory_info().rss
                    times = proc.cpu_times()
            except psutil.Error:
                continue
            used = times.user + times.system
            if proc.pid != self._me.pid:  # named at every sample: Spark's launcher execs bash → java in place
                self._names[proc.pid] = _role(proc)
            first = self._cpu.get(proc.pid, (used, used))[0]
            self._cpu[proc.pid] = (first, used)
        self.peak_rss = max(self.peak_rss, rss)

    def run(self) -> None:
        while not self._halt.is_set():
            self._sample()
            self._halt.wait(SAMPLE_EVERY_S)

    def __enter__(self) -> Monitor:
        self._sample()
        self.started = time.time()
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._halt.set()
        self.join()
        self._sample()
        self.wall = time.time() - self.started

    @property
    def cpu_seconds(self) -> float:
        return sum(last - first for first, last in self._cpu.values())

    def cpu_by_process(self, top: int = 6) -> dict[str, float]:
        """CPU seconds by process name (Ray workers, raylet, java, the driver …), the largest first."""
        by_name: dict[str, float] = {}
        for pid, (first, last) in self._cpu.items():
            name = self._names.get(pid, "?")
            by_name[name] = by_name.get(name, 0.0) + last - first
        return {k: round(v, 1) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:top] if v >= 0.05}


def _role(proc) -> str:
    """A short name for a process: Ray's title (ray::IDLE, ray::MapWorker(…)), else the executable's name."""
    import psutil

    try:
        cmdline = proc.cmdline()
        if cmdline and cmdline[0].startswith("ray::"):
            return cmdline[0].split(".")[0][:48]
        if any("pyspark" in part and "daemon" in part for part in cmdline[:3]):
            return "pyspark.daemon"
        return proc.name()
    except psutil.Error:
        return "?"


def steady_rate(done_at: np.ndarray) -> float:
    """Rows per second between the moments STEADY_FROM and STEADY_TO of the rows were done.

    Engines hand rows back in bursts (a Ray block, an Arrow batch), so the rate counts the rows done after
    the first moment and up to the second, over the time between them; 0 if the rows came in one burst.
    """
    t = np.sort(np.asarray(done_at, dtype=np.float64))
    n = len(t)
    if n == 0:
        return 0.0
    t_lo, t_hi = t[int(math.floor(STEADY_FROM * (n - 1)))], t[int(math.ceil(STEADY_TO * (n - 1)))]
    if t_hi <= t_lo:
        return 0.0
    rows = np.searchsorted(t, t_hi, side="right") - np.searchsorted(t, t_lo, side="right")
    return float(rows / (t_hi - t_lo))


# ---------------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------------


def load_rows(input_uri: str | None, workdir: Path) -> pa.Table:
    """The image rows of an ingest output (a folder of Parquet); with no input, the bundled sample ingested."""
    if input_uri is None:
        from m9.config import IngestConfig
        from m9.ingest import ingest
        from m9.pipeline import sample_dir

        input_uri = str(workdir / "sample-images")
        ingest(IngestConfig(input=sample_dir(), output=input_uri))
    src = storage.normalize(input_uri)
    files = storage.list_files(src, ".parquet")
    if not files:
        raise InputError(f"no Parquet files in {src}; pass the output of `m9 ingest` as --input")
    contract.check_columns(contract.EMBED, src, files[0])
    tables = []
    for uri in files:
        fs, path = storage.filesystem(uri)
        tables.append(pq.read_table(path, filesystem=fs, columns=list(contract.EMBED.needs)))
    table = pa.concat_tables(tables)
    return table.take(pa.compute.sort_indices(table, [("image_id", "ascending")]))


def take(table: pa.Table, n: int | None) -> pa.Table:
    """The first n rows; cycles through the rows again (ids suffixed ~1, ~2 …) when n exceeds them."""
    if n is None or n == table.num_rows:
        return table
    if n < table.num_rows:
        return table.slice(0, n)
    parts, copy = [], 0
    while sum(p.num_rows for p in parts) < n:
        part = table.slice(0, n - sum(p.num_rows for p in parts))
        if copy:
            ids = pa.array([f"{i}~{copy}" for i in part.column("image_id").to_pylist()], pa.string())
            part = part.set_column(part.schema.get_field_index("image_id"), "image_id", ids)
        parts.append(part)
        copy += 1
    return pa.concat_tables(parts)


def write_input(table: pa.Table, folder: Path) -> str:
    """The rows as one Parquet file in `folder`, in row groups the Ray engine can share out."""
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "part-00000.parquet", row_group_size=INPUT_ROW_GROUP)
    return str(folder)


# ---------------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------------


def _weights_path() -> str:
    from m9 import weights

    return str(weights.fetch())


def run_ray(cfg: BenchConfig, input_dir: str, table: pa.Table, keep_features: bool = True) -> Outcome:
    """`m9 embed`'s own pipeline (inference.embed_batches on a fixed actor pool), batches kept in memory."""
    import ray

    from m9 import engine_ray
    from m9.inference import embed_batches, plan_resources

    ids, done, feats = [], [], []
    with engine_ray.connect(None):
        counter = engine_ray.start_load_counter()
        for batch in embed_batches(storage.list_files(input_dir, ".parquet"), cfg.actors, cfg.batch_size, None):
            now = time.time()
            ids.extend(str(i) for i in batch["image_id"])
            done.extend([now] * len(batch["image_id"]))
            if keep_features:
                feats.append(np.asarray(batch["features"], dtype=np.float32).reshape(-1, FEATURE_DIM))
        loads = len(ray.get(counter.get.remote()))
        ray.kill(counter)
        actor_cpus, threads = plan_resources(engine_ray.node_cpus(), cfg.actors)
    return Outcome(
        ids,
        np.array(done),
        np.concatenate(feats) if feats else None,
        loads,
        {
            "actors": cfg.actors,
            "threads_per_actor": threads,
            "actor_cpus": actor_cpus,
            "batch_size": cfg.batch_size,
            "arrow_batch_size": None,
        },
    )


def _spark_tasks_and_threads(cfg: BenchConfig) -> tuple[int, int]:
    """Concurrent tasks (one per actor the Ray engine would run) and TensorFlow threads each, as plan_resources."""
    cores = os.cpu_count() or 1
    return cfg.actors, max(1, cores // cfg.actors)


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


def _spark_knobs(tasks: int, threads: int | None, batch_size: int, arrow_batch: int) -> dict:
    # threads None: TensorFlow's default pools, as many intra-op and inter-op threads as cores, in every task.
    threads_out = threads if threads else "tf-default"
    return {"tasks": tasks, "threads_per_task": threads_out, "batch_size": batch_size, "arrow_batch_size": arrow_batch}


def _spark_frame(spark, input_dir: str, tasks: int):
    from m9.spark import read_uri

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
    from m9.model import decode_many, place

    inputs, errors = decode_many(contents)
    slices, stamps = [np.zeros((0, FEATURE_DIM), np.float32)], [np.zeros(0)]
    for features in embedder.forward_slices(inputs):
        slices.append(features)
        stamps.append(np.full(len(features), time.time()))
    return place(np.concatenate(slices), errors), place(np.concatenate(stamps), errors, fill=time.time())


def run_spark_udf(cfg: BenchConfig, input_dir: str, table: pa.Table, defaults: bool = False) -> Outcome:
    """The seed's method: weights broadcast from the driver; an iterator pandas UDF builds the model once per
    task and embeds each Arrow batch.

    With m9's knobs (one TensorFlow thread per task, m9's batch size, a small Arrow batch) unless `defaults`:
    then with the knobs a notebook leaves at their defaults (DEFAULT_KNOBS_*). Python workers are new per
    Spark session, so each engine's thread setting holds unless the caller keeps one session for both.
    """
    import pandas as pd
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, DoubleType, FloatType, StructField, StructType

    from m9 import spark as m9spark
    from m9.model import load_model

    tasks, threads = _spark_tasks_and_threads(cfg)
    batch_size, arrow_batch = cfg.batch_size, ARROW_BATCH_BATCHES * cfg.batch_size
    if defaults:
        threads, batch_size, arrow_batch = DEFAULT_KNOBS_THREADS, DEFAULT_KNOBS_BATCH_SIZE, DEFAULT_KNOBS_ARROW_BATCH
    out_type = StructType([StructField("features", ArrayType(FloatType())), StructField("done_at", DoubleType())])
    with m9spark.session("m9-bench") as spark, _arrow_batch(spark, arrow_batch):
        sc = spark.sparkContext
        weights = sc.broadcast(load_model(_weights_path()).get_weights())
        loads = sc.accumulator(0)

        def embed_udf(contents):
            from m9.model import Embedder

            embedder = Embedder(None, threads=threads, batch_size=batch_size, verify=False, arrays=weights.value)
            loads.add(1)
            for series in contents:
                features, done_at = _embed_stamped(embedder, list(series))
                yield pd.DataFrame({"features": list(features), "done_at": done_at})

        # Real types, not the strings `from __future__ import annotations` would leave for Spark to read.
        embed_udf.__annotations__ = {"contents": Iterator[pd.Series], "return": Iterator[pd.DataFrame]}
        udf = F.pandas_udf(embed_udf, out_type)
        df = _spark_frame(spark, input_dir, tasks).withColumn("out", udf("content"))
        ids, done, feats, n_loads = _collect(df, loads)
        weights.destroy()
    knobs = _spark_knobs(tasks, threads, batch_size, arrow_batch)
    return Outcome(ids, done, feats, n_loads, knobs, extra={"driver_model_builds": 1})


def run_spark_predict(cfg: BenchConfig, input_dir: str, table: pa.Table) -> Outcome:
    """Spark's own predict_batch_udf; make_predict_fn builds the model on the executor from the weights file."""
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql.types import ArrayType, DoubleType, FloatType, StructField, StructType

    from m9 import spark as m9spark

    tasks, threads = _spark_tasks_and_threads(cfg)
    arrow_batch = ARROW_BATCH_BATCHES * cfg.batch_size
    batch_size = cfg.batch_size
    out_type = StructType([StructField("features", ArrayType(FloatType())), StructField("done_at", DoubleType())])
    with m9spark.session("m9-bench") as spark, _arrow_batch(spark, arrow_batch):
        loads = spark.sparkContext.accumulator(0)

        def make_predict_fn():
            from m9 import weights as m9weights
            from m9.model import Embedder

            embedder = Embedder(str(m9weights.fetch()), threads=threads, batch_size=batch_size)
            loads.add(1)

            def predict(contents: np.ndarray) -> dict[str, np.ndarray]:
                features, _ = embedder.embed(list(contents))
                return {"features": features, "done_at": np.full(len(contents), time.time())}

            return predict

        udf = predict_batch_udf(make_predict_fn, return_type=out_type, batch_size=batch_size)
        df = _spark_frame(spark, input_dir, tasks).withColumn("out", udf("content"))
        ids, done, feats, n_loads = _collect(df, loads)
    return Outcome(ids, done, feats, n_loads, _spark_knobs(tasks, threads, batch_size, arrow_batch))


def _ceiling_worker(
    rank: int, threads: int, batch_sizes: list[int], contents: list, measure: int, keep: bool, barrier, queue
) -> None:
    """One ceiling process: load the model, decode its share up front, then time forward passes only."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from m9.model import Embedder, decode_many

    try:
        embedder = Embedder(_weights_path(), threads=threads, batch_size=batch_sizes[0])
        inputs, errors = decode_many(contents)
        for bs in batch_sizes:
            embedder.batch_size = bs
            embedder.forward(inputs[: 2 * bs])  # warm-up: oneDNN primitives are built per batch shape
            part = inputs[:measure]
            barrier.wait()
            started, cpu = time.time(), time.process_time()
            done, feats = [], []
            for i in range(0, len(part), bs):
                feats.append(embedder.forward(part[i : i + bs]))
                done.extend([time.time()] * len(feats[-1]))
            queue.put(
                (
                    "timed",
                    rank,
                    bs,
                    started,
                    time.time(),
                    len(part),
                    (np.concatenate(feats), np.array(done), errors) if keep else None,
                    time.process_time() - cpu,
                )
            )
            barrier.wait()
    except Exception as exc:  # noqa: BLE001 — reported to the parent, which fails the bench with it
        queue.put(("error", rank, repr(exc)))
        barrier.abort()


def _run_processes(
    processes: int, threads: int, batch_sizes: list[int], contents: list, measure: int, keep: bool
) -> dict:
    """Start the ceiling's processes; returns {batch size: (images/s, [per-rank results])}."""
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold TensorFlow or a JVM
    barrier, queue = ctx.Barrier(processes), ctx.Queue()
    shares = [contents[r::processes] for r in range(processes)]
    procs = [
        ctx.Process(
            target=_ceiling_worker,
            args=(r, threads, batch_sizes, shares[r], math.ceil(measure / processes), keep, barrier, queue),
        )
        for r in range(processes)
    ]
    for p in procs:
        p.start()
    results: dict[int, list] = {bs: [] for bs in batch_sizes}
    try:
        for _ in range(processes * len(batch_sizes)):
            msg = queue.get()
            if msg[0] == "error":
                raise RuntimeError(f"ceiling process {msg[1]} failed: {msg[2]}")
            results[msg[2]].append(msg)
    except BaseException:  # an error or Ctrl-C: the processes would wait at the barrier forever
        for p in procs:
            p.kill()
        raise
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    out = {}
    for bs, msgs in results.items():
        span = max(m[4] for m in msgs) - min(m[3] for m in msgs)
        out[bs] = (sum(m[5] for m in msgs) / span, sorted(msgs, key=lambda m: m[1]))
    return out


def ceiling_configs(cores: int) -> list[tuple[int, int]]:
    """(processes, threads) pairs that use every core without oversubscribing: p × t = cores, and 1 × 1."""
    pairs = {(p, cores // p) for p in range(1, cores + 1) if cores % p == 0}
    return sorted(pairs | {(1, 1)})


def run_ceiling(cfg: BenchConfig, input_dir: str, table: pa.Table, progress: Callable[[str], None]) -> Outcome:
    """The bare model: inputs decoded up front, forward passes only; the best of processes × threads × batch."""
    contents = table.column("content").to_pylist()
    sample = contents[: max(cfg.ceiling_images, max(cfg.ceiling_batches) * 2)]
    configs = list(cfg.ceiling_configs or ceiling_configs(os.cpu_count() or 1))
    searching = time.time()
    search, loads = [], 0
    if len(configs) * len(cfg.ceiling_batches) == 1:  # nothing to search: the one configuration is the best
        (processes, threads), bs = configs[0], cfg.ceiling_batches[0]
        search.append({"processes": processes, "threads": threads, "batch_size": bs, "img_per_s": None})
    for processes, threads in configs if len(search) == 0 else []:
        loads += processes
        rates = _run_processes(processes, threads, list(cfg.ceiling_batches), sample, cfg.ceiling_images, False)
        for bs, (rate, _) in rates.items():
            search.append({"processes": processes, "threads": threads, "batch_size": bs, "img_per_s": round(rate, 2)})
            progress(
                f"  ceiling search: {processes} process(es) × {threads} thread(s), batch {bs}: {rate:.1f} images/s"
            )
    best = max(search, key=lambda s: s["img_per_s"] or 0)
    # The best configuration once more over every image: its features are the reference the engines must match.
    search_s = time.time() - searching
    started = time.time()
    final = _run_processes(best["processes"], best["threads"], [best["batch_size"]], contents, len(contents), True)
    rate, msgs = final[best["batch_size"]]
    ids = table.column("image_id").to_pylist()
    shares = [ids[r :: best["processes"]] for r in range(best["processes"])]
    out_ids, feats, done = [], [], []
    for msg in msgs:
        f, d, errors = msg[6]
        good = [i for i, e in zip(shares[msg[1]], errors) if e is None]
        bad = [i for i, e in zip(shares[msg[1]], errors) if e is not None]
        out_ids += good + bad
        feats += [f, np.zeros((len(bad), FEATURE_DIM), np.float32)]
        done += [d, np.full(len(bad), d.max() if len(d) else time.time())]
    # Other work on the machine only ever slows a run down, so the ceiling is the best rate measured for
    # the chosen configuration: its search run or its final run over every image.
    final_rate, rate = rate, max(rate, best["img_per_s"] or 0.0)
    cpu_ms = 1000 * sum(m[7] for m in msgs) / len(contents)
    return Outcome(
        out_ids,
        np.concatenate(done),
        np.concatenate(feats),
        loads + best["processes"],
        {
            "processes": best["processes"],
            "threads_per_process": best["threads"],
            "batch_size": best["batch_size"],
            "arrow_batch_size": None,
        },
        steady=rate,
        started=started,
        extra={
            "search_s": round(search_s, 1),
            "search": search,
            "final_img_per_s": round(final_rate, 2),
            "forward_cpu_ms_per_image": round(cpu_ms, 2),
        },
    )


def _decode_worker(contents: list, barrier, queue) -> None:
    from m9.model import decode_many

    barrier.wait()
    started, cpu = time.time(), time.process_time()
    for i in range(0, len(contents), 16):
        decode_many(contents[i : i + 16])
    queue.put((started, time.time(), len(contents), time.process_time() - cpu))


def run_decode(cfg: BenchConfig, input_dir: str, table: pa.Table) -> Outcome:
    """Decode + preprocess only, one process per core: how fast inputs could be made if nothing else ran."""
    contents = table.column("content").to_pylist()
    processes = os.cpu_count() or 1
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(processes), ctx.Queue()
    procs = [
        ctx.Process(target=_decode_worker, args=(contents[r::processes], barrier, queue)) for r in range(processes)
    ]
    for p in procs:
        p.start()
    msgs = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    span = max(m[1] for m in msgs) - min(m[0] for m in msgs)
    rate = len(contents) / span
    ids = table.column("image_id").to_pylist()
    return Outcome(
        ids,
        np.full(len(ids), max(m[1] for m in msgs)),
        None,
        0,
        {"processes": processes, "batch_size": None, "arrow_batch_size": None},
        steady=rate,
        extra={"decode_cpu_ms_per_image": round(1000 * sum(m[3] for m in msgs) / len(contents), 3)},
    )


# ---------------------------------------------------------------------------------------------------
# The bench
# ---------------------------------------------------------------------------------------------------


def machine_facts() -> dict:
    """CPU model, cores, caches, memory, load and library versions of this machine."""
    import importlib.metadata as md

    import psutil

    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    caches = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
            caches[f"L{level}{'' if kind == 'Unified' else kind[0].lower()}"] = (index / "size").read_text().strip()
        except OSError:
            continue
    versions = {}
    for dist in ("tensorflow", "keras", "ray", "pyspark", "pyarrow", "pandas", "numpy", "pillow", "psutil"):
        for name in (dist, f"{dist}-cpu"):  # TensorFlow may be installed as tensorflow-cpu
            try:
                versions[dist] = md.version(name)
                break
            except md.PackageNotFoundError:
                versions[dist] = None
    versions["python"] = platform.python_version()
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "caches": caches,
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "platform": platform.platform(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "versions": versions,
    }


def _measure(engine: str, cfg: BenchConfig, input_dir: str, table: pa.Table, progress, keep_features=True):
    runners = {
        "ray": lambda: run_ray(cfg, input_dir, table, keep_features),
        "spark-udf": lambda: run_spark_udf(cfg, input_dir, table),
        "spark-udf-defaults": lambda: run_spark_udf(cfg, input_dir, table, defaults=True),
        "spark-predict": lambda: run_spark_predict(cfg, input_dir, table),
        "ceiling": lambda: run_ceiling(cfg, input_dir, table, progress),
        "decode": lambda: run_decode(cfg, input_dir, table),
    }
    with Monitor() as mon:
        outcome = runners[engine]()
    if sorted(outcome.ids) != sorted(table.column("image_id").to_pylist()):
        raise RuntimeError(f"{engine}: returned {len(outcome.ids)} rows for {table.num_rows} images")
    steady = outcome.steady if outcome.steady is not None else steady_rate(outcome.done_at)
    if not steady:  # too few rows for a steady state (all in one batch): the end-to-end rate instead
        steady = len(outcome.ids) / max(float(outcome.done_at.max()) - (outcome.started or mon.started), 1e-9)
    started = outcome.started or mon.started
    result = {
        "steady_img_per_s": round(steady, 2),
        "wall_s": round(mon.wall - (started - mon.started), 2),
        "first_row_s": round(float(outcome.done_at.min()) - started, 2),
        "model_loads": outcome.model_loads,
        "peak_rss_mb": round(mon.peak_rss / 1024**2, 1),
        "cpu_util": round(mon.cpu_seconds / (mon.wall * (os.cpu_count() or 1)), 3),
        "knobs": outcome.knobs,
        "cpu_s": round(mon.cpu_seconds, 1),
        # CPU time per image over the whole run (start-up and model loads included): unlike images/s it
        # hardly moves when other work shares the machine. The ceiling's and decode's are their timed loops'.
        "cpu_ms_per_image": round(
            outcome.extra.get("forward_cpu_ms_per_image")
            or outcome.extra.get("decode_cpu_ms_per_image")
            or 1000 * mon.cpu_seconds / max(1, len(outcome.ids)),
            2,
        ),
        "cpu_s_by_process": mon.cpu_by_process(),
        **outcome.extra,
    }
    return result, outcome


def _ordered(outcome: Outcome, ids: list[str]) -> np.ndarray:
    index = {i: n for n, i in enumerate(outcome.ids)}
    return outcome.features[[index[i] for i in ids]]


def bench(cfg: BenchConfig, progress: Callable[[str], None] = log.info) -> dict:
    """Run every engine over the same rows; write bench.json, bench.md and bench.png to cfg.output."""
    unknown = [e for e in cfg.engines if e not in ENGINES]
    if unknown:
        raise InputError(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    if cfg.repeat < 1 or cfg.actors < 1 or cfg.batch_size < 1:
        raise InputError("--repeat, --actors and --batch-size must be at least 1")
    contract.check_not_a_file(cfg.output)  # before the engines run, not when the report is written
    machine = machine_facts()
    work = Path(tempfile.mkdtemp(prefix="m9-bench-"))
    try:
        table = take(load_rows(cfg.input, work), cfg.limit)
        input_dir = write_input(table, work / "input")
        ids = sorted(table.column("image_id").to_pylist())
        engines, features = {}, {}
        order = [e for e in ENGINES if e in cfg.engines]
        for n, engine in enumerate(order, 1):
            runs = []
            for r in range(cfg.repeat):
                progress(
                    f"[{n}/{len(order)}] {engine}: {table.num_rows} images"
                    + (f" (run {r + 1}/{cfg.repeat})" if cfg.repeat > 1 else "")
                    + " …"
                )
                result, outcome = _measure(engine, cfg, input_dir, table, progress)
                runs.append(result)
                if outcome.features is not None and engine not in features:
                    features[engine] = _ordered(outcome, ids)
                progress(
                    f"[{n}/{len(order)}] {engine}: {result['steady_img_per_s']:.1f} images/s steady, "
                    f"wall {result['wall_s']:.1f} s, first row {result['first_row_s']:.1f} s, "
                    f"{result['model_loads']} model loads, peak RSS {result['peak_rss_mb']:.0f} MB, "
                    f"CPU {100 * result['cpu_util']:.0f} %"
                )
            # The best run: other work on a shared machine only ever slows a run down.
            best = max(runs, key=lambda r: r["steady_img_per_s"])
            engines[engine] = {**best, "runs": runs} if cfg.repeat > 1 else best
    finally:
        shutil.rmtree(work, ignore_errors=True)
    diffs = {}
    if features:
        ref_name = "ceiling" if "ceiling" in features else next(iter(features))
        ref = features[ref_name]
        diffs = {e: float(np.max(np.abs(f - ref))) if len(f) else 0.0 for e, f in features.items()}
    max_diff = max(diffs.values(), default=0.0)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {
        "machine": machine,
        "images": table.num_rows,
        "engines": engines,
        "agree": bool(max_diff <= AGREE_TOLERANCE),
        "max_abs_diff": max_diff,
        "max_abs_diff_by_engine": diffs,
        "tolerance": AGREE_TOLERANCE,
        "config": {k: v for k, v in asdict(cfg).items() if k != "output"},
    }
    write_report(result, cfg.output)
    progress(
        f"engines {'agree' if result['agree'] else 'DISAGREE'}: max |Δ| = {max_diff:.2e} "
        f"(tolerance {AGREE_TOLERANCE:g}) over {table.num_rows} images"
    )
    return result


# ---------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------


def _ratio(value: float, ref: dict | None) -> str:
    if not ref or not ref.get("steady_img_per_s"):
        return "–"
    return f"{value / ref['steady_img_per_s']:.2f}"


def _knobs(knobs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in knobs.items() if v is not None)


def markdown(result: dict) -> str:
    """bench.md: the engine table with ratios to ceiling and spark-udf, and the machine it ran on."""
    m, eng = result["machine"], result["engines"]
    ceiling, udf = eng.get("ceiling"), eng.get("spark-udf")
    lines = [
        f"{result['images']} images; {m['cpu_model']}, {m['cores']} cores, {m['memory_gb']} GB; "
        f"load average {m['loadavg_start'][0]} at start, {m.get('loadavg_end', ['?'])[0]} at end.",
        "",
        "| engine | steady img/s | × ceiling | × spark-udf | wall s | first row s | model loads | peak RSS MB "
        "| CPU % | CPU ms/img | knobs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, e in eng.items():
        lines.append(
            f"| {name} | {e['steady_img_per_s']:.1f} | {_ratio(e['steady_img_per_s'], ceiling)} | "
            f"{_ratio(e['steady_img_per_s'], udf)} | {e['wall_s']:.1f} | {e['first_row_s']:.1f} | "
            f"{e['model_loads']} | {e['peak_rss_mb']:.0f} | {100 * e['cpu_util']:.0f} | "
            f"{e.get('cpu_ms_per_image', float('nan')):.1f} | "
            f"{_knobs(e['knobs'])} |"
        )
    lines += [
        "",
        f"Engines agree: **{'yes' if result['agree'] else 'NO'}** — max |Δ| = "
        f"{result['max_abs_diff']:.2e} per feature (tolerance {result['tolerance']:g}).",
    ]
    if ceiling and any(s["img_per_s"] for s in ceiling.get("search", [])):
        lines += [
            "",
            "Ceiling search (forward pass only, inputs decoded up front):",
            "",
            "| processes | threads | batch | img/s |",
            "|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {s['processes']} | {s['threads']} | {s['batch_size']} | {s['img_per_s']:.1f} |"
            for s in ceiling["search"]
            if s["img_per_s"] is not None
        ]
    v = m["versions"]
    lines += ["", "Versions: " + ", ".join(f"{k} {v[k]}" for k in v if v[k]) + "."]
    return "\n".join(lines) + "\n"


def chart(result: dict, path: str) -> None:
    """bench.png: steady images/s per engine as horizontal bars, the ceiling drawn as a line across.

    decode is left out of the bars (it is ~20× faster than any forward pass and would flatten them) and
    named in the title instead.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eng = result["engines"]
    names = [n for n in eng if n != "decode"][::-1]  # barh draws bottom-up: keep the bench's order top-down
    rates = [eng[n]["steady_img_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
    bars = ax.barh(names, rates, color=["#999999" if n == "ceiling" else "#3b75af" for n in names])
    ax.bar_label(bars, fmt="%.1f", padding=3)
    if "ceiling" in eng:
        ax.axvline(eng["ceiling"]["steady_img_per_s"], color="#c44e52", linestyle="--", linewidth=1, label="ceiling")
        ax.legend(loc="center right")
    ax.set_xlim(0, max(rates, default=1) * 1.35)  # room for the labels and the legend
    ax.set_xlabel("steady images / s")
    title = f"m9 bench: {result['images']} images, {result['machine']['cores']} cores"
    if "decode" in eng:
        title += f" (decode alone: {eng['decode']['steady_img_per_s']:.0f} images/s)"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(result: dict, output: str) -> None:
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / "bench.md").write_text(markdown(result))
    chart(result, str(folder / "bench.png"))


# ---------------------------------------------------------------------------------------------------
# Scaling
# ---------------------------------------------------------------------------------------------------


def scaling(cfg: BenchConfig, sizes: list[int], progress: Callable[[str], None] = log.info) -> dict:
    """The `ray` engine at each size: per-image cost and peak memory, so flatness in N can be seen."""
    if not sizes or min(sizes) < 1:
        raise InputError("--scaling takes positive image counts, e.g. 1000,4000,16000")
    contract.check_not_a_file(cfg.output)
    machine = machine_facts()
    work = Path(tempfile.mkdtemp(prefix="m9-scaling-"))
    rows = []
    try:
        table = load_rows(cfg.input, work)
        for n in sizes:
            part = take(table, n)
            input_dir = write_input(part, work / f"input-{n}")
            progress(f"scaling: ray engine on {n} images …")
            result, _ = _measure("ray", cfg, input_dir, part, progress, keep_features=False)
            rows.append(
                {
                    "images": n,
                    "wall_s": result["wall_s"],
                    "wall_ms_per_image": round(1000 * result["wall_s"] / n, 2),
                    "steady_ms_per_image": round(1000 / result["steady_img_per_s"], 2),
                    "cpu_ms_per_image": round(1000 * result["cpu_s"] / n, 2),
                    "steady_img_per_s": result["steady_img_per_s"],
                    "first_row_s": result["first_row_s"],
                    "peak_rss_mb": result["peak_rss_mb"],
                    "cpu_util": result["cpu_util"],
                }
            )
            progress(
                f"scaling: {n} images: {rows[-1]['steady_ms_per_image']:.2f} ms/image steady, "
                f"{rows[-1]['wall_ms_per_image']:.2f} ms/image end to end, peak RSS "
                f"{result['peak_rss_mb']:.0f} MB"
            )
            shutil.rmtree(input_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    steady = [r["steady_ms_per_image"] for r in rows]
    spread = (max(steady) - min(steady)) / (sum(steady) / len(steady))
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out = {
        "machine": machine,
        "engine": "ray",
        "knobs": {"actors": cfg.actors, "batch_size": cfg.batch_size},
        "sizes": rows,
        "steady_cost_spread": round(spread, 3),
    }
    folder = Path(cfg.output)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scaling.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "| images | steady ms/image | end-to-end ms/image | CPU ms/image | wall s | first row s | peak RSS MB "
        "| CPU % |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['images']} | {r['steady_ms_per_image']:.2f} | {r['wall_ms_per_image']:.2f} | "
        f"{r['cpu_ms_per_image']:.2f} | {r['wall_s']:.1f} | {r['first_row_s']:.1f} | {r['peak_rss_mb']:.0f} "
        f"| {100 * r['cpu_util']:.0f} |"
        for r in rows
    ]
    lines += ["", f"Steady per-image cost spread (max − min) / mean: {100 * spread:.1f} %."]
    (folder / "scaling.md").write_text("\n".join(lines) + "\n")
    return out
