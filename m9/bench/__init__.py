"""Bench: the same decode → preprocess → forward under each engine, timed against the bare model's ceiling."""

from __future__ import annotations

import importlib
from typing import Any

from m9.bench.config import AGREE_TOLERANCE, ENGINES, FEATURE_ENGINES, BenchConfig

#: Loaded when first used, so that `m9 --help` (which reads the bench's defaults) does not import the engines'
#: drivers.
_LAZY = {"bench": "m9.bench.run", "steady_rate": "m9.bench.monitor"}
# The scaling driver is m9.bench.scaling.scaling: a lazy name `scaling` here would be shadowed by the
# submodule of that name once it is imported.

__all__ = ["AGREE_TOLERANCE", "ENGINES", "FEATURE_ENGINES", "BenchConfig", "bench", "steady_rate"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
