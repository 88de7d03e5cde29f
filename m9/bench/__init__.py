"""Bench: the same decode → preprocess → forward under each engine, timed against the bare model's ceiling."""

from m9.bench.config import AGREE_TOLERANCE, ENGINES, FEATURE_ENGINES, BenchConfig
from m9.bench.monitor import steady_rate
from m9.bench.run import bench
from m9.bench.scaling import scaling

__all__ = ["AGREE_TOLERANCE", "ENGINES", "FEATURE_ENGINES", "BenchConfig", "bench", "scaling", "steady_rate"]
