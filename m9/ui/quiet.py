"""Keep Spark's, Ray's and TensorFlow's own console lines out of a run unless asked for (`m9 -v`)."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator

#: Whether the running command asked for the engines' own lines (`m9 -v`); set for one command by verbosity().
_verbose: contextvars.ContextVar[bool] = contextvars.ContextVar("m9_verbose", default=False)

#: Environment the engines' native code reads at start-up. Ray's workers, raylet and GCS inherit the
#: driver's environment when m9 starts a local Ray, so setting it once in the driver quiets them all.
QUIET_ENV = {
    # TensorFlow's C++ INFO and WARNING lines (oneDNN notes, CPU instruction sets).
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # Ray's C++ core logs at ERROR, on the driver's stderr, that the embed actors (restartable, the model's
    # bytes in the object store) have "constructor arguments in the object store and max_restarts > 0"
    # (core_worker.cc): Ray keeps those bytes while an actor may restart, which is what m9 wants.
    "RAY_BACKEND_LOG_LEVEL": "fatal",
}

#: Python loggers of the engines, kept to errors unless verbose (m9's own progress and warnings replace them).
NOISY_LOGGERS = ("py4j", "ray", "tensorflow", "absl")


def verbose() -> bool:
    """True when the running command asked for the engines' own log lines (`m9 -v`)."""
    return _verbose.get()


@contextlib.contextmanager
def verbosity(verbose_: bool) -> Iterator[None]:
    """Run the block (one command) verbose or quiet, and configure the engines accordingly; restored on exit."""
    token = _verbose.set(verbose_)
    try:
        configure()
        yield
    finally:
        _verbose.reset(token)


def configure() -> None:
    """Quiet the engines unless verbose(); call before Spark, Ray or TensorFlow start.

    The engines' native code reads its levels from the environment (QUIET_ENV); variables the user set
    themselves are left as they are.
    """
    if verbose():
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def ray_logging_level() -> int:
    """The level ray.init gives its "ray" logger: WARNING when verbose, else ERROR (its token-auth notice
    and similar start-up warnings are Ray's, not the user's, concern on a local cluster)."""
    return logging.WARNING if verbose() else logging.ERROR


def spark_log_level() -> str:
    """The level for SparkContext.setLogLevel."""
    return "WARN" if verbose() else "ERROR"


#: The one line Ray's C++ logging prints (at INFO, on the driver's stderr) whenever RAY_BACKEND_LOG_LEVEL is
#: set, before the level applies; ray.init runs inside native_stderr_without() it.
RAY_LEVEL_NOTICE = re.compile(r"logging\.cc:\d+: Set ray log level from environment variable")


@contextlib.contextmanager
def native_stderr_without(pattern: re.Pattern) -> Iterator[None]:
    """Run the block with file descriptor 2 (where native code writes) going to a temporary file, then
    write back every line of it except those matching pattern. Only for short blocks (ray.init): lines
    the block writes appear when it ends. Does nothing when verbose."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(True) if not pattern.search(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
