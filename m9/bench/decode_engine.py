"""Engine `decode`: decode + preprocess only, one process per core, to show what inputs cost without a model."""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa

from m9.bench.config import BenchConfig, Outcome
from m9.bench.protocol import Timed, run_workers, span_rate

#: Images per decode_many call: the batch size the engines decode in.
DECODE_BATCH = 16


def _decode_worker(rank: int, contents: list, barrier, queue) -> None:
    """One decode process: decode + preprocess its share, timed from the barrier's release."""
    from m9.model.decode import decode_many

    barrier.wait()
    started, cpu = time.time(), time.process_time()
    for i in range(0, len(contents), DECODE_BATCH):
        decode_many(contents[i : i + DECODE_BATCH])
    queue.put(Timed(rank, 0, started, time.time(), len(contents), time.process_time() - cpu))
    barrier.wait()


def run_decode(cfg: BenchConfig, input_dir: str, table: pa.Table) -> Outcome:
    """Decode + preprocess only, one process per core: how fast inputs could be made if nothing else ran."""
    contents = table.column("content").to_pylist()
    processes = os.cpu_count() or 1
    (msgs,) = run_workers(_decode_worker, [(contents[r::processes],) for r in range(processes)], 1, "decode")
    ids = table.column("image_id").to_pylist()
    return Outcome(
        ids,
        np.full(len(ids), max(m.ended for m in msgs)),
        None,
        0,
        {"processes": processes, "batch_size": None, "arrow_batch_size": None},
        steady=span_rate(msgs),
        extra={"decode_cpu_ms_per_image": round(1000 * sum(m.cpu_s for m in msgs) / len(contents), 3)},
    )
