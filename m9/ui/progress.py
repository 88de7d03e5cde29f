"""Progress of a stage: one live rich display on a terminal, a plain log line every LOG_INTERVAL_S elsewhere."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

log = logging.getLogger(__name__)

#: Seconds between progress lines off a terminal: a CI or an EMR step log shows a stage is moving without
#: one line per batch (a 90,000-image embed at ~75 images/s is 20 minutes: about 120 lines).
LOG_INTERVAL_S = 10.0

#: Seconds between polls of Spark's status tracker: cheap calls, and often enough for a live display.
SPARK_POLL_S = 0.5


def _rate(rate: float) -> str:
    return f"{rate:.1f}" if rate >= 1 else f"{rate:.2f}"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return (
        f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else (f"{seconds // 60}:{seconds % 60:02d}")
    )


class StageProgress:
    """What one stage is doing, how far it is (done/total `unit`), its rate and ETA, plus named counters
    with their own totals (embed's committed shards).

    On a terminal it is a rich progress display; elsewhere (a pipe, a CI log, a notebook kernel's stderr)
    a log line at most every `interval` seconds. `live` and `clock` are for tests.
    """

    def __init__(
        self,
        stage: str,
        what: str,
        total: int | None,
        unit: str = "images",
        counters: dict[str, int] | None = None,
        *,
        live: bool | None = None,
        interval: float = LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        heartbeat: bool = True,
    ):
        self.stage, self.what, self.total, self.unit = stage, what, total, unit
        self.totals = dict(counters or {})
        self.counts = dict.fromkeys(self.totals, 0)
        self.done = 0
        self.interval, self.clock = interval, clock
        self.started = self.last_line = clock()
        #: (time, done) of the first update that did something: the rate is measured from there, so the
        #: seconds before the first result (a JVM or a model loading) do not make the ETA hours long.
        self._first: tuple[float, int] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        #: The rich display and its one task, on a terminal.
        self._rich: tuple[Progress, TaskID] | None = None
        if live is None:
            from rich.console import Console

            live = Console(stderr=True).is_terminal
        if live:
            self._start_rich()
        elif heartbeat:  # a line every interval even while nothing finishes (models loading, a long task)
            threading.Thread(target=self._beat, name=f"m9-progress-{stage}", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval / 2):
            self.update(0)

    def _start_rich(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[counters]}"),
            console=Console(stderr=True),
            transient=False,
        )
        progress.start()
        task = progress.add_task(
            f"{self.stage}: {self.what}", total=self.total, unit=self.unit, rate="", counters=self._counters()
        )
        self._rich = (progress, task)

    def _counters(self) -> str:
        return ", ".join(f"{self.counts[k]}/{self.totals[k]} {k}" for k in self.totals)

    def rate(self) -> float | None:
        """Units per second since the first update that did something, or None before there is a rate."""
        if self._first is None:
            return None
        elapsed = self.clock() - self._first[0]
        return (self.done - self._first[1]) / elapsed if self.done > self._first[1] and elapsed > 0 else None

    def line(self) -> str:
        """The facts in one line, e.g. `embed: embedding 120/240 images (50 %), 8.0 images/s, ETA 0:15,
        0/1 shards`."""
        rate = self.rate()
        parts = [f"{self.stage}: {self.what} {self.done}/{self.total if self.total is not None else '?'} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f} %)"
        if rate:
            parts.append(f"{_rate(rate)} {self.unit}/s")
            if self.total:
                parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        if self.totals:
            parts.append(self._counters())
        return ", ".join(parts)

    def update(self, advance: int = 0, *, done: int | None = None, total: int | None = None, **counters: int) -> None:
        """Add `advance` (or set `done`), change the total, set named counters; show or log as due."""
        with self._lock:
            self.done = done if done is not None else self.done + advance
            if self._first is None and self.done:
                self._first = (self.clock(), self.done)
            if total is not None:
                self.total = total
            self.counts.update(counters)
            if self._rich is not None:
                rate = self.rate()
                progress, task = self._rich
                progress.update(
                    task,
                    completed=self.done,
                    total=self.total,
                    rate=f"{_rate(rate)}/s" if rate else "",
                    counters=self._counters(),
                )
            elif self.clock() - self.last_line >= self.interval:
                self.last_line = self.clock()
                log.info("%s", self.line())

    def close(self) -> None:
        self._stop.set()
        if self._rich is not None:
            self._rich[0].stop()
            self._rich = None

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def spark_tasks(spark, stage: str, what: str, interval: float = SPARK_POLL_S) -> Iterator[StageProgress]:
    """A StageProgress of the Spark tasks the block runs: done/total over the stages of every job the
    block started, polled from Spark's status tracker on a background thread. The block's jobs are
    found by a job group set for it; Spark plans a job's stages when the job starts, so the total grows
    while the block runs (reduce is a row of small jobs)."""
    sc = spark.sparkContext
    tracker = sc.statusTracker()
    group = f"m9-{stage}-{uuid.uuid4().hex[:8]}"
    previous = sc.getLocalProperty("spark.jobGroup.id")
    sc.setLocalProperty("spark.jobGroup.id", group)  # this thread's jobs only
    stop = threading.Event()

    def poll() -> None:
        total = done = 0
        for job in tracker.getJobIdsForGroup(group):
            info = tracker.getJobInfo(job)
            for sid in info.stageIds if info else ():
                stage_info = tracker.getStageInfo(sid)
                if stage_info is not None:  # None: skipped (its output was already computed)
                    total += stage_info.numTasks
                    done += stage_info.numCompletedTasks
        if total:
            progress.update(done=done, total=total)

    def loop() -> None:
        while not stop.wait(interval):
            with contextlib.suppress(Exception):  # a poll racing the session's end is no error
                poll()

    with StageProgress(stage, what, None, unit="Spark tasks") as progress:
        thread = threading.Thread(target=loop, name=f"m9-progress-{stage}", daemon=True)
        thread.start()
        try:
            yield progress
        finally:
            stop.set()
            thread.join()
            sc.setLocalProperty("spark.jobGroup.id", previous)
