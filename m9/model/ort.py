"""ONNX Runtime sessions for m9's model: the session options m9 uses, each with its measured why, and a
timer of the alternatives, so `m9 bench` can show on any machine that the defaults are near the best."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np

log = logging.getLogger(__name__)

#: Threads for running independent graph nodes side by side. MobileNetV2 is a chain: nothing can run
#: beside anything else, and a second pool would only compete with the intra-op threads for the cores.
INTER_OP_THREADS = 1

#: Sequential execution, for the same reason: ORT_PARALLEL only helps graphs with parallel branches.
PARALLEL_EXECUTION = False

#: Graph optimisation level ("basic", "extended", "all"). "all" adds the layout transformations (NCHWc
#: blocked convolutions) on top of the fusions (Conv+BatchNorm+Relu6); timed by
#: time_settings below (`m9 bench`'s knobs check, docs/benchmarks.md).
GRAPH_OPTIMIZATION = "all"

#: Whether idle intra-op threads spin waiting for work. Only matters with 2+ threads in one session (one
#: thread has no pool). Off: m9 runs an actor per core beside Ray's and Spark's own processes, and a
#: spinning pool burns the cores the other actors and the readers need; timed by
#: time_settings below (`m9 bench`'s knobs check, docs/benchmarks.md).
ALLOW_SPINNING = False

_LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


@dataclass(frozen=True)
class SessionSettings:
    """The knobs of one ONNX Runtime session; the defaults are m9's choice."""

    #: Intra-op threads: the threads the actor (or task) was given; None lets ORT use every physical core.
    threads: int | None = None
    spinning: bool = ALLOW_SPINNING
    optimization: str = GRAPH_OPTIMIZATION
    parallel: bool = PARALLEL_EXECUTION
    inter_op_threads: int = INTER_OP_THREADS

    def name(self) -> str:
        return (
            f"threads={self.threads or 'auto'} spinning={'on' if self.spinning else 'off'} "
            f"opt={self.optimization}{' parallel' if self.parallel else ''}"
        )


def session_options(settings: SessionSettings):
    """onnxruntime.SessionOptions for these settings."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = settings.threads or 0
    opts.inter_op_num_threads = settings.inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL if settings.parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[settings.optimization])
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.spinning else "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "1" if settings.spinning else "0")
    opts.log_severity_level = 3  # errors only: ORT's warnings name graph nodes and mean nothing to a user
    return opts


def session(model_bytes: bytes, settings: SessionSettings | None = None):
    """An ONNX Runtime CPU session over the model's bytes."""
    import onnxruntime as ort

    return ort.InferenceSession(
        model_bytes, session_options(settings or SessionSettings()), providers=["CPUExecutionProvider"]
    )


def run(sess, inputs: np.ndarray) -> np.ndarray:
    """Forward one batch through a session: (n, 224, 224, 3) float32 → (n, 1280) float32."""
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: np.ascontiguousarray(inputs, dtype=np.float32)})[0]


def candidates(threads: int | None) -> dict[str, SessionSettings]:
    """The settings worth timing against m9's defaults at a given thread count: spinning on/off and each
    optimisation level. The first entry is the default."""
    default = SessionSettings(threads=threads)
    out = {"default": default}
    for spinning in (False, True):
        for level in _LEVELS:
            s = replace(default, spinning=spinning, optimization=level)
            if s != default:
                out[s.name()] = s
    return out


def time_settings(
    model_bytes: bytes,
    settings: dict[str, SessionSettings],
    inputs: np.ndarray,
    batch_size: int,
    rounds: int = 3,
    seconds: float = 2.0,
) -> dict[str, float]:
    """Images per second of each setting's session (median over `rounds`), forwarding `inputs` in slices
    of batch_size for `seconds` per round. Rounds are interleaved so that a change in the machine's load
    affects every setting alike; the sessions run one at a time in this process."""
    sessions = {name: session(model_bytes, s) for name, s in settings.items()}
    slices = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
    for sess in sessions.values():
        run(sess, slices[0])  # the first run allocates and plans; not timed
    rates: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, sess in sessions.items():
            done, started = 0, time.perf_counter()
            while True:
                for part in slices:
                    run(sess, part)
                    done += len(part)
                elapsed = time.perf_counter() - started
                if elapsed >= seconds:
                    break
            rates[name].append(done / elapsed)
    return {name: float(np.median(r)) for name, r in rates.items()}


def defaults_vs_best(
    model_bytes: bytes, threads: int | None, inputs: np.ndarray, batch_size: int, rounds: int = 3, seconds: float = 2.0
) -> dict:
    """m9's default session against every candidate at this thread count, timed on this machine: the rates,
    the best setting, and default ÷ best (the bench's check that the fixed defaults are within 5 % of the
    best measured setting)."""
    rates = time_settings(model_bytes, candidates(threads), inputs, batch_size, rounds, seconds)
    best = max(rates, key=rates.__getitem__)
    return {
        "threads": threads,
        "batch_size": batch_size,
        "images_per_s": {name: round(rate, 1) for name, rate in rates.items()},
        "best": best,
        "default_over_best": round(rates["default"] / rates[best], 3),
    }
