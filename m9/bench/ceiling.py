"""Engines `ceiling-keras` and `ceiling-onnx`: the bare model on inputs decoded up front, forward passes only,
searched over processes × threads × batch size (and, on ONNX, Runtime's session options)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from m9.bench.config import BenchConfig, Outcome
from m9.bench.protocol import Timed, run_workers, span_rate
from m9.config import FEATURE_DIM
from m9.model.spec import ModelSpec

if TYPE_CHECKING:
    from m9.model.ort import SessionSettings


@dataclass(frozen=True)
class Setting:
    """One way to run the bare model (a resolved ModelSpec): processes × threads each, a batch size, and on
    ONNX the session options (whose own thread count is always `threads`)."""

    model: ModelSpec
    processes: int
    threads: int
    batch_size: int
    session: SessionSettings | None = None  # None on "keras"

    def row(self) -> dict:
        """The setting as bench.json shows it."""
        return {
            "runtime": self.model.runtime,
            "precision": self.model.precision,
            "processes": self.processes,
            "threads": self.threads,
            "batch_size": self.batch_size,
            "session": self.session.name() if self.session is not None else None,
        }


def default_session(runtime: str, threads: int) -> SessionSettings | None:
    """The session options m9's Embedder uses for this many threads (None on Keras, which has none)."""
    if runtime != "onnx":
        return None
    from m9.model import ort

    return ort.SessionSettings(threads=threads)


def session_candidates(threads: int) -> list[SessionSettings]:
    """ONNX Runtime session options worth timing at a thread count, m9's default first (m9.model.ort.candidates)."""
    from m9.model import ort

    return list(ort.candidates(threads).values())


def ceiling_configs(cores: int) -> list[tuple[int, int]]:
    """(processes, threads) pairs that use every core without oversubscribing: p × t = cores, and 1 × 1."""
    pairs = {(p, cores // p) for p in range(1, cores + 1) if cores % p == 0}
    return sorted(pairs | {(1, 1)})


def _forwards(model: ModelSpec, threads: int, points: list[tuple[int, SessionSettings | None]]) -> list[Callable]:
    """One forward function (a batch of inputs → features) per point, models built once per process."""
    if model.runtime == "keras":
        from m9.model.embedder import Embedder

        # One call per slice the worker hands over: the largest batch, so forward never cuts a slice again.
        embedder = Embedder(model, threads=threads, batch_size=max(bs for bs, _ in points))
        return [embedder.forward for _ in points]
    from m9.model import ort

    model_bytes = model.checked_data()
    sessions: dict = {}
    for _, settings in points:
        if settings not in sessions:
            sessions[settings] = ort.session(model_bytes, settings)
    return [lambda x, sess=sessions[settings]: ort.run(sess, x) for _, settings in points]


def _ceiling_worker(
    rank: int,
    model: ModelSpec,
    threads: int,
    points: list[tuple[int, SessionSettings | None]],
    contents: list,
    measure: int,
    keep: bool,
    with_decode: bool,
    barrier,
    queue,
) -> None:
    """One ceiling process: build the model, decode its share up front, then time forward passes only, one
    pass per point (batch size, session options), all processes released together by the barrier. With
    with_decode, each batch is decoded inside the timed loop, just before its forward pass, as an embed
    actor does."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from m9.bench.protocol import Failed
    from m9.model.decode import decode_many

    try:
        forwards = _forwards(model, threads, points)
        inputs, errors = decode_many(contents, model.decode_memory_mb)
        part = inputs[:measure]
        for n, ((bs, _), forward) in enumerate(zip(points, forwards)):
            for i in range(0, min(2 * bs, len(inputs)), bs):  # warm-up: kernels are planned per batch shape
                forward(inputs[i : i + bs])
            barrier.wait()
            started, cpu = time.time(), time.process_time()
            done, feats = [], []
            for i in range(0, min(measure, len(contents)) if with_decode else len(part), bs):
                if with_decode:
                    batch = decode_many(contents[i : i + bs], model.decode_memory_mb)[0]
                else:
                    batch = part[i : i + bs]
                feats.append(np.asarray(forward(batch), dtype=np.float32))
                done.extend([time.time()] * len(feats[-1]))
            ended, cpu_s = time.time(), time.process_time() - cpu
            timed = Timed(rank, n, started, ended, len(done), cpu_s)
            if keep:
                features = np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM), np.float32)
                timed = replace(timed, features=features, done_at=np.array(done), errors=errors)
            queue.put(timed)
            barrier.wait()
    except Exception as exc:  # noqa: BLE001 — reported to the parent, which fails the bench with it
        queue.put(Failed(rank, repr(exc)))
        barrier.abort()


def time_group(
    model: ModelSpec,
    processes: int,
    threads: int,
    points: list[tuple[int, SessionSettings | None]],
    contents: list,
    measure: int,
    keep: bool = False,
    with_decode: bool = False,
) -> list[tuple[float, list[Timed]]]:
    """Time each point in `processes` processes of `threads` threads sharing `contents`: per point, the
    images/s over all processes and their reports by rank. with_decode: decode in the timed loop."""
    shares = [contents[r::processes] for r in range(processes)]
    share = math.ceil(measure / processes)
    args = [(model, threads, points, shares[r], share, keep, with_decode) for r in range(processes)]
    what = f"ceiling-{model.runtime}"
    return [(span_rate(msgs), msgs) for msgs in run_workers(_ceiling_worker, args, len(points), what)]


def time_setting(setting: Setting, contents: list, measure: int, with_decode: bool = False) -> float:
    """Images per second of one setting over `measure` of the contents (with_decode: decode included)."""
    ((rate, _),) = time_group(
        setting.model,
        setting.processes,
        setting.threads,
        [(setting.batch_size, setting.session)],
        contents,
        measure,
        with_decode=with_decode,
    )
    return rate


def search(cfg: BenchConfig, model: ModelSpec, sample: list, progress: Callable[[str], None]) -> tuple[list[dict], int]:
    """Every (processes, threads) × batch size with m9's session options; then, on ONNX, every other session
    option at the best of those. Returns the search's rows (a setting and its images/s) and the model loads."""
    configs = list(cfg.ceiling_configs or ceiling_configs(os.cpu_count() or 1))
    rows, loads, runtime = [], 0, model.runtime

    def record(setting: Setting, rate: float | None, stage: str) -> None:
        rows.append({**setting.row(), "stage": stage, "img_per_s": None if rate is None else round(rate, 2)})
        if rate is not None:
            s = setting
            progress(
                f"  ceiling-{runtime} search: {s.processes} process(es) × {s.threads} thread(s), batch "
                f"{s.batch_size}{f', {s.session.name()}' if s.session is not None else ''}: {rate:.1f} images/s"
            )

    if len(configs) * len(cfg.ceiling_batches) == 1:  # nothing to search: the one layout is the best
        (processes, threads), bs = configs[0], cfg.ceiling_batches[0]
        best = Setting(model, processes, threads, bs, default_session(runtime, threads))
        record(best, None, "layout")
    else:
        for processes, threads in configs:
            loads += processes
            session = default_session(runtime, threads)
            points = [(bs, session) for bs in cfg.ceiling_batches]
            for (bs, _), (rate, _) in zip(points, time_group(model, processes, threads, points, sample, len(sample))):
                record(Setting(model, processes, threads, bs, session), rate, "layout")
        best_row = max(rows, key=lambda r: r["img_per_s"] or 0)
        best = Setting(model, best_row["processes"], best_row["threads"], best_row["batch_size"])
        best = replace(best, session=default_session(runtime, best.threads))
    if runtime == "onnx" and cfg.ceiling_sessions:
        # The default options are timed again beside the others, so the options compare within one group.
        points = [(best.batch_size, s) for s in session_candidates(best.threads)]
        loads += best.processes
        timed = time_group(model, best.processes, best.threads, points, sample, len(sample))
        for (_, session), (rate, _) in zip(points, timed):
            record(replace(best, session=session), rate, "session")
    return rows, loads


def setting_of(row: dict, model: ModelSpec) -> Setting:
    """The Setting a search row of this model describes (its session options rebuilt from the candidates)."""
    threads = row["threads"]
    session = None
    if model.runtime == "onnx":
        session = next(s for s in session_candidates(threads) if s.name() == row["session"])
    return Setting(model, row["processes"], threads, row["batch_size"], session)


def run_ceiling(
    cfg: BenchConfig, input_dir: str, table: pa.Table, progress: Callable[[str], None], model: ModelSpec
) -> Outcome:
    """The bare model on one runtime: the best setting of the search, run once more over every image (its
    features are a reference the engines must match)."""
    contents = table.column("content").to_pylist()
    sample = contents[: max(cfg.ceiling_images, max(cfg.ceiling_batches) * 2)]
    searching = time.time()
    rows, loads = search(cfg, model, sample, progress)
    best_row = max(rows, key=lambda r: r["img_per_s"] or 0)
    best = setting_of(best_row, model)
    search_s = time.time() - searching
    started = time.time()
    ((rate, msgs),) = time_group(
        model, best.processes, best.threads, [(best.batch_size, best.session)], contents, len(contents), keep=True
    )
    ids = table.column("image_id").to_pylist()
    shares = [ids[r :: best.processes] for r in range(best.processes)]
    out_ids, feats, done = [], [], []
    for msg in msgs:
        # keep=True: every report carries its features, finish times and decode errors
        assert msg.features is not None and msg.done_at is not None and msg.errors is not None
        good = [i for i, e in zip(shares[msg.rank], msg.errors) if e is None]
        bad = [i for i, e in zip(shares[msg.rank], msg.errors) if e is not None]
        out_ids += good + bad
        feats += [msg.features, np.zeros((len(bad), FEATURE_DIM), np.float32)]
        done += [msg.done_at, np.full(len(bad), msg.done_at.max() if len(msg.done_at) else time.time())]
    # Other work on the machine only ever slows a run down, so the ceiling is the best rate measured for
    # the chosen setting: its search run or its final run over every image.
    final_rate, rate = rate, max(rate, best_row["img_per_s"] or 0.0)
    cpu_ms = 1000 * sum(m.cpu_s for m in msgs) / len(contents)
    return Outcome(
        out_ids,
        np.concatenate(done),
        np.concatenate(feats),
        loads + best.processes,
        {
            "runtime": model.runtime,
            "precision": model.precision,
            "processes": best.processes,
            "threads_per_process": best.threads,
            "batch_size": best.batch_size,
            "session": best_row["session"],
            "arrow_batch_size": None,
        },
        steady=rate,
        started=started,
        extra={
            "search_s": round(search_s, 1),
            "search": rows,
            "final_img_per_s": round(final_rate, 2),
            "forward_cpu_ms_per_image": round(cpu_ms, 2),
        },
    )
