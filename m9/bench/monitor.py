"""Measuring: a sampler of the process tree's memory and CPU, and the steady rate of an engine's rows."""

from __future__ import annotations

import math
import threading
import time

import numpy as np

from m9.bench.config import SAMPLE_EVERY_S, STEADY_FROM, STEADY_TO


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
                role = _role(proc)
                if role != "?" or proc.pid not in self._names:  # an exited process keeps its name
                    self._names[proc.pid] = role
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
