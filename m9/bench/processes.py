"""Engines `ceiling` and `decode`: worker processes released together by a barrier, reporting named messages."""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from m9.bench.config import BenchConfig, Outcome
from m9.config import FEATURE_DIM


@dataclass(frozen=True)
class Timed:
    """A worker's report for one timed pass: its share of the images, from the barrier's release to its end.

    Features, per-row finish times and per-image decode errors come back only when the caller asked to keep
    them (the ceiling's final run, whose features are the reference every engine must match).
    """

    rank: int
    batch_size: int | None
    started: float
    ended: float
    images: int
    cpu_s: float
    features: np.ndarray | None = None
    done_at: np.ndarray | None = None
    errors: list[str | None] | None = None


@dataclass(frozen=True)
class Failed:
    """A worker's report that it could not go on; the parent fails the bench with it."""

    rank: int
    error: str


def _span_rate(msgs: list[Timed]) -> float:
    """Images per second over all workers' shares, from the first worker's start to the last one's end."""
    return sum(m.images for m in msgs) / (max(m.ended for m in msgs) - min(m.started for m in msgs))


def _ceiling_worker(
    rank: int, threads: int, batch_sizes: list[int], contents: list, measure: int, keep: bool, barrier, queue
) -> None:
    """One ceiling process: load the model, decode its share up front, then time forward passes only."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from m9 import weights as m9weights
    from m9.model import Embedder, decode_many

    try:
        embedder = Embedder(str(m9weights.fetch()), threads=threads, batch_size=batch_sizes[0])
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
            ended, cpu_s = time.time(), time.process_time() - cpu
            kept = {"features": np.concatenate(feats), "done_at": np.array(done), "errors": errors} if keep else {}
            queue.put(Timed(rank, bs, started, ended, len(part), cpu_s, **kept))
            barrier.wait()
    except Exception as exc:  # noqa: BLE001 — reported to the parent, which fails the bench with it
        queue.put(Failed(rank, repr(exc)))
        barrier.abort()


def _run_processes(
    processes: int, threads: int, batch_sizes: list[int], contents: list, measure: int, keep: bool
) -> dict[int, tuple[float, list[Timed]]]:
    """Start the ceiling's processes; returns {batch size: (images/s, the workers' reports by rank)}."""
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
    results: dict[int, list[Timed]] = {bs: [] for bs in batch_sizes}
    try:
        for _ in range(processes * len(batch_sizes)):
            msg = queue.get()
            if isinstance(msg, Failed):
                raise RuntimeError(f"ceiling process {msg.rank} failed: {msg.error}")
            results[msg.batch_size].append(msg)
    except BaseException:  # an error or Ctrl-C: the processes would wait at the barrier forever
        for p in procs:
            p.kill()
        raise
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return {bs: (_span_rate(msgs), sorted(msgs, key=lambda m: m.rank)) for bs, msgs in results.items()}


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
        good = [i for i, e in zip(shares[msg.rank], msg.errors) if e is None]
        bad = [i for i, e in zip(shares[msg.rank], msg.errors) if e is not None]
        out_ids += good + bad
        feats += [msg.features, np.zeros((len(bad), FEATURE_DIM), np.float32)]
        done += [msg.done_at, np.full(len(bad), msg.done_at.max() if len(msg.done_at) else time.time())]
    # Other work on the machine only ever slows a run down, so the ceiling is the best rate measured for
    # the chosen configuration: its search run or its final run over every image.
    final_rate, rate = rate, max(rate, best["img_per_s"] or 0.0)
    cpu_ms = 1000 * sum(m.cpu_s for m in msgs) / len(contents)
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


def _decode_worker(rank: int, contents: list, barrier, queue) -> None:
    """One decode process: decode + preprocess its share in batches of 16, timed from the barrier's release."""
    from m9.model import decode_many

    barrier.wait()
    started, cpu = time.time(), time.process_time()
    for i in range(0, len(contents), 16):
        decode_many(contents[i : i + 16])
    queue.put(Timed(rank, None, started, time.time(), len(contents), time.process_time() - cpu))


def run_decode(cfg: BenchConfig, input_dir: str, table: pa.Table) -> Outcome:
    """Decode + preprocess only, one process per core: how fast inputs could be made if nothing else ran."""
    contents = table.column("content").to_pylist()
    processes = os.cpu_count() or 1
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(processes), ctx.Queue()
    procs = [
        ctx.Process(target=_decode_worker, args=(r, contents[r::processes], barrier, queue)) for r in range(processes)
    ]
    for p in procs:
        p.start()
    msgs = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    rate = _span_rate(msgs)
    ids = table.column("image_id").to_pylist()
    return Outcome(
        ids,
        np.full(len(ids), max(m.ended for m in msgs)),
        None,
        0,
        {"processes": processes, "batch_size": None, "arrow_batch_size": None},
        steady=rate,
        extra={"decode_cpu_ms_per_image": round(1000 * sum(m.cpu_s for m in msgs) / len(contents), 3)},
    )
