"""What a user sees: `m9 run` prints only m9's own lines; progress off a terminal is a periodic log line."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from m9.ui.progress import StageProgress

#: m9's log lines (cli.py's format: time, an m9 logger, the message) ...
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d m9(\.\w+)*: \S")
#: ... and the summary `m9 run` ends with: its title, then indented lines.
SUMMARY_TITLE, SUMMARY_LINE = "m9 run finished", re.compile(r"^  \S")


def own_lines_only(output: str) -> list[str]:
    """The lines of output that are not m9's own."""
    foreign, in_summary = [], False
    for line in output.splitlines():
        in_summary = in_summary or line == SUMMARY_TITLE
        if line == SUMMARY_TITLE or LOG_LINE.match(line) or (in_summary and SUMMARY_LINE.match(line)):
            continue
        foreign.append(line)
    return foreign


def test_the_line_check_catches_engine_chatter():
    chatter = [
        'Setting default log level to "WARN".',
        "2026-11-29 10:01:57,196\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled",
        "[2026-11-29 10:02:04,305 E 5242 5242] core_worker.cc:2465: Actor with class name: 'MapWorker'",
        "2026-11-29 10:02:04,310\tWARNING __init__.py:28 -- Progress bars disabled.",
    ]
    own = ["10:01:56 m9.stages.ingest: ingest: 240 images", SUMMARY_TITLE, "  embedded          240"]
    assert own_lines_only("\n".join(own + chatter)) == chatter


@pytest.mark.slow
def test_m9_run_prints_only_its_own_lines(tmp_path):
    """The whole pipeline on the sample in a fresh process, as a user starts it (no terminal)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_BACKEND_LOG_LEVEL"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run(
        [sys.executable, "-m", "m9.cli", "run", "--workdir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert SUMMARY_TITLE in done.stdout
    assert own_lines_only(output) == [], output


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_off_a_terminal_logs_one_line_per_interval(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="m9.ui.progress")
    with StageProgress(
        "embed", "embedding", 240, counters={"shards": 3}, live=False, interval=10, clock=clock, heartbeat=False
    ) as p:
        for step in range(24):  # 10 images a second for 24 s
            clock.now += 1
            p.update(10, shards=step // 8)
    lines = [r.getMessage() for r in caplog.records if r.name == "m9.ui.progress"]
    assert lines == [
        "embed: embedding 100/240 images (42 %), 10.0 images/s, ETA 0:14, 1/3 shards",
        "embed: embedding 200/240 images (83 %), 10.0 images/s, ETA 0:04, 2/3 shards",
    ]


def test_progress_with_an_unknown_total_says_so(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="m9.ui.progress")
    p = StageProgress("reduce", "PCA", None, unit="Spark tasks", live=False, interval=5, clock=clock, heartbeat=False)
    clock.now = 6
    p.update(done=3)
    clock.now = 12
    p.update(done=7, total=9)
    assert [r.getMessage() for r in caplog.records] == [
        "reduce: PCA 3/? Spark tasks",  # no rate yet: it is measured from the first result on
        "reduce: PCA 7/9 Spark tasks (78 %), 0.67 Spark tasks/s, ETA 0:03",
    ]


def test_progress_on_a_terminal_draws_instead_of_logging(caplog):
    caplog.set_level(logging.INFO, logger="m9.ui.progress")
    clock = FakeClock()
    with StageProgress("embed", "embedding", 10, live=True, interval=0, clock=clock) as p:
        clock.now = 1
        p.update(5)
    assert caplog.records == []


def test_progress_off_a_terminal_beats_while_nothing_finishes(caplog):
    """A stage waiting for its first result (models loading) still says so every interval."""
    caplog.set_level(logging.INFO, logger="m9.ui.progress")
    with StageProgress("embed", "embedding", 10, live=False, interval=0.05):
        deadline = time.monotonic() + 30
        while not caplog.records and time.monotonic() < deadline:
            time.sleep(0.01)
    assert caplog.records[0].getMessage() == "embed: embedding 0/10 images (0 %)"


def test_quiet_sets_the_engines_levels_unless_verbose(monkeypatch):
    from m9.ui import quiet

    for key in quiet.QUIET_ENV:
        monkeypatch.setenv(key, "")  # records the key's state, so what configure() sets is undone after
        monkeypatch.delenv(key)
    for name in quiet.NOISY_LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # the user's own choice stays
    with quiet.verbosity(True):
        assert quiet.verbose() and "RAY_BACKEND_LOG_LEVEL" not in os.environ
        assert (quiet.ray_logging_level(), quiet.spark_log_level()) == (logging.WARNING, "WARN")
    assert not quiet.verbose()  # only for the block
    with quiet.verbosity(False):
        assert os.environ["RAY_BACKEND_LOG_LEVEL"] == "fatal" and os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
        assert (quiet.ray_logging_level(), quiet.spark_log_level()) == (logging.ERROR, "ERROR")
    assert logging.getLogger("ray").level == logging.ERROR


def test_native_stderr_without_drops_only_the_matching_lines(monkeypatch, capfd):
    from m9.ui import quiet

    with quiet.native_stderr_without(quiet.RAY_LEVEL_NOTICE):
        os.write(
            2,
            b"[2026-11-29 10:14:24,151 I 1997 1997] logging.cc:303: Set ray log level from environment "
            b"variable RAY_BACKEND_LOG_LEVEL to 3\n",
        )
        os.write(2, b"a native error that matters\n")
    assert capfd.readouterr().err == "a native error that matters\n"


def test_spark_is_given_a_log4j_file_that_exists():
    """Spark's JVM reads its logging settings from the file m9 ships; a wrong path means Spark's own lines."""
    from m9.engines.spark import LOG4J_CONFIG

    assert LOG4J_CONFIG.is_file() and "m9.spark.console.level" in LOG4J_CONFIG.read_text()
