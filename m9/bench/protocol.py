"""The barrier protocol of the bench's own processes: workers released together, reporting named messages."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Timed:
    """A worker's report for one timed pass over its share of the images, from the barrier's release to its end.

    `point` is the index of the setting timed (the ceiling times several per process group, in order).
    Features, per-row finish times and per-image decode errors come back only when the caller asked to keep
    them (the ceiling's final run, whose features are the reference every engine must match).
    """

    rank: int
    point: int
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


def span_rate(msgs: Sequence[Timed]) -> float:
    """Images per second over all workers' shares, from the first worker's start to the last one's end."""
    return sum(m.images for m in msgs) / max(max(m.ended for m in msgs) - min(m.started for m in msgs), 1e-9)


def run_workers(target: Callable, args: Sequence[tuple], points: int, what: str) -> list[list[Timed]]:
    """Start one process per args tuple, calling target(rank, *args, barrier, queue); each reports one
    Timed per point and waits at the barrier before and after each. Returns the reports per point, by rank.

    Processes are spawned, never forked: the parent may hold TensorFlow, a JVM or Ray's threads.
    """
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(len(args)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, *a, barrier, queue)) for rank, a in enumerate(args)]
    for p in procs:
        p.start()
    results: list[list[Timed]] = [[] for _ in range(points)]
    try:
        for _ in range(len(procs) * points):
            msg = queue.get()
            if isinstance(msg, Failed):
                raise RuntimeError(f"{what} process {msg.rank} failed: {msg.error}")
            results[msg.point].append(msg)
    except BaseException:  # an error or Ctrl-C: the other processes would wait at the barrier forever
        for p in procs:
            p.kill()
        raise
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return [sorted(msgs, key=lambda m: m.rank) for msgs in results]
