"""What a bench measures: the engines, their knobs' named defaults, BenchConfig and one run's Outcome."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from m9.config import DEFAULT_ACTORS, DEFAULT_BATCH_SIZE, DEFAULT_RUNTIME, PRECISIONS
from m9.stages import contract

if TYPE_CHECKING:
    import numpy as np

#: Every engine, in the order a bench runs them: the references first (decode alone, the bare model on
#: each runtime, and `ceiling`, the better of the two, which is picked, not run), then the distributions.
#: `ray` runs on BenchConfig.runtime (`m9 embed`'s default path), every other engine's runtime is fixed by
#: its name: a `-keras` or `-onnx` suffix, and the seed's UDF (`spark-udf`, `spark-udf-defaults`) on Keras.
ENGINES = (
    "decode",
    "ceiling-keras",
    "ceiling-onnx",
    "ceiling",
    "ceiling-int8",
    "ray",
    "ray-keras",
    "ray-int8",
    "spark-udf",
    "spark-udf-onnx",
    "spark-udf-defaults",
    "spark-predict",
)

#: The engines on the int8 model (ONNX Runtime): the bare model searched like ceiling-onnx, and `ray` on int8.
#: Their features are held to the int8 model's bar against the reference (m9.model.quantize: cosine mean and
#: 1st percentile), not to AGREE_TOLERANCE.
INT8_ENGINES = ("ceiling-int8", "ray-int8")

#: Engines whose features must agree within AGREE_TOLERANCE (decode produces none; int8 differs by design).
FEATURE_ENGINES = tuple(e for e in ENGINES if e != "decode" and e not in INT8_ENGINES)

#: The team's bar for the int8 model's speed: ray-int8's steady rate over ray's (both m9 embed's pipeline).
INT8_TARGET = ("ray-int8", "ray", 1.8)

#: The bare model on one runtime: the ceiling's search for that runtime. `ceiling` needs both.
CEILINGS = {"ceiling-keras": "keras", "ceiling-onnx": "onnx"}

#: What `m9 bench` runs by default: every engine, the two bare-model searches through `ceiling` (which runs
#: both and keeps the faster).
DEFAULT_ENGINES = tuple(e for e in ENGINES if e not in CEILINGS)

#: The engine whose features the others are compared with: the bare Keras model, m9's reference runtime.
REFERENCE_ENGINE = "ceiling-keras"

#: The issue's bar for "the engines produced the same features": max |Δ| per feature value.
AGREE_TOLERANCE = 1e-4

#: Steady state is the rate between these fractions of rows done: it leaves out start-up, model loads and
#: the first batch's graph tracing (before) and the tail where some workers have already run dry (after).
STEADY_FROM, STEADY_TO = 0.2, 0.9

#: Seconds between samples of the process tree's memory and CPU: fine enough to catch a model load's
#: peak (seconds long), coarse enough that the sampler costs well under 1 % of a core.
SAMPLE_EVERY_S = 0.25

#: Batch sizes the ceiling tries: around the default, from where per-call overhead shows to where the
#: activations of one batch (~2.4 MB per image in MobileNetV2's first blocks) are far beyond any cache.
CEILING_BATCHES = (8, 16, 32, 64)

#: Rounds of the knobs check: m9's default setting and the best one the ceiling found, timed alternately
#: this many times each (the median kept), so a change in the machine's load hits both alike.
KNOBS_ROUNDS = 3

#: The bar for "fixed defaults are right on this machine": the default setting's rate over the best's.
KNOBS_TOLERANCE = 0.05

#: Images each ceiling configuration is timed over (after warm-up): ~4 s at 75 images/s, enough for a
#: rate within a few percent, small enough that the whole search stays around a minute.
CEILING_IMAGES = 256

#: Rows per Arrow batch for the Spark engines (spark.sql.execution.arrow.maxRecordsPerBatch, default
#: 10,000): a few forward batches, like the Ray engine's work items, so a task streams rather than holding
#: thousands of images' bytes and features at once.
ARROW_BATCH_BATCHES = 4

#: The knobs a notebook running the seed's UDF leaves alone (engine spark-udf-defaults): Keras
#: `model.predict`'s default batch, Spark's default spark.sql.execution.arrow.maxRecordsPerBatch, and
#: TensorFlow's own thread pools (None: as many intra- and inter-op threads as cores, in every task).
DEFAULT_KNOBS_BATCH_SIZE = 32
DEFAULT_KNOBS_ARROW_BATCH = 10_000
DEFAULT_KNOBS_THREADS = None


@dataclass(frozen=True)
class BenchConfig:
    """What `m9 bench` measures and where it writes."""

    input: str | None = None
    output: str = contract.default_output(contract.BENCH_DIR)
    engines: tuple[str, ...] = ENGINES
    actors: int = DEFAULT_ACTORS
    batch_size: int = DEFAULT_BATCH_SIZE
    limit: int | None = None
    repeat: int = 1
    ceiling_batches: tuple[int, ...] = CEILING_BATCHES
    ceiling_images: int = CEILING_IMAGES
    #: (processes, threads) pairs the ceiling tries; None: every way to split the cores (ceiling_configs).
    ceiling_configs: tuple[tuple[int, int], ...] | None = None
    #: The runtime of `m9 embed`'s default path, which the `ray` engine and the knobs check use.
    runtime: str = DEFAULT_RUNTIME
    #: The precision the `ray` engine runs at (m9 embed's --precision); the other engines' is fixed by name.
    precision: str = PRECISIONS[0]
    #: Also time ONNX Runtime's other session options (spinning, graph optimisation) at the best layout.
    ceiling_sessions: bool = True
    #: Rounds of the knobs check (0: none, the knobs section then reports the search's own rates).
    knobs_rounds: int = KNOBS_ROUNDS


@dataclass
class Outcome:
    """What one engine run produced: per-row ids, features and the wall-clock second each row was done."""

    ids: list[str]
    done_at: np.ndarray
    features: np.ndarray | None
    model_loads: int
    knobs: dict
    steady: float | None = None  # engines that time their own steady state (ceiling, decode)
    started: float | None = None  # when the timed run began, if not when the engine was called (ceiling)
    extra: dict = field(default_factory=dict)
