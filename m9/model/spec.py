"""The model a run uses, resolved once on the driver into one frozen value: which runtime and precision, the
model file's bytes and sha256, what identifies its weights, and the checks it passed. The fingerprint, the
actor pool, the bench and every Embedder take this value; nothing downstream locates or checks the model
file again (a worker only confirms the bytes it was handed hash to `sha256`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m9.config import (
    DEFAULT_DECODE_MEMORY,
    DEFAULT_RUNTIME,
    PRECISIONS,
    PREPROCESS_VERSION,
    RUNTIMES,
)
from m9.errors import InputError, WeightsError


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One resolved model. `data` is the file the runtime loads: an .onnx model (runtime "onnx") or a Keras
    weights file (runtime "keras"); it travels to the workers (Ray's object store, a Spark broadcast, a
    spawned process) so no worker needs a cache, TensorFlow for ONNX, or the network."""

    runtime: str
    precision: str
    #: The model file's bytes (not part of equality or repr: `sha256` stands for them).
    data: bytes = field(repr=False, compare=False)
    #: sha256 of `data`, taken when the file was checked on the driver.
    sha256: str
    #: Where `data` was read from (for messages, and the Keras file's format by its name).
    source: str
    #: What identifies the weights: the checksum of the Keras arrays (the verified ImageNet checksum for
    #: m9's own weights), or "sha256:…" of a converted .onnx file handed in as --weights.
    weights: str
    #: The model input's preprocessing (m9.config.PREPROCESS_VERSION) and decode budget (MB per image).
    preprocess_version: int = PREPROCESS_VERSION
    decode_memory_mb: int = DEFAULT_DECODE_MEMORY
    #: What was checked when this value was made, in words (the manifest records them).
    checks: tuple[str, ...] = ()

    def identity(self) -> dict:
        """What makes this model's features differ from another's: weights, runtime, precision,
        preprocessing and decode budget (and a quantised model's own sha256, which its calibration
        determines). Embed's fingerprint holds it, and stores of features key on it."""
        out = {
            "weights": self.weights,
            "runtime": self.runtime,
            "precision": self.precision,
            "preprocess": self.preprocess_version,
            "decode_memory_mb": self.decode_memory_mb,
        }
        if self.precision != "fp32":
            out["model_sha256"] = self.sha256
        return out

    def checked_data(self) -> bytes:
        """The model bytes, refused (WeightsError) unless they hash to the sha256 checked on the driver."""
        digest = hashlib.sha256(self.data).hexdigest()
        if digest != self.sha256:
            raise WeightsError(
                f"the model handed to this worker ({Path(self.source).name}) has sha256 {digest[:12]}…, not the "
                f"{self.sha256[:12]}… checked on the driver: refused"
            )
        return self.data

    def describe(self) -> dict:
        """The value as a manifest records it (no bytes)."""
        return {
            "runtime": self.runtime,
            "precision": self.precision,
            "file": Path(self.source).name,
            "sha256": self.sha256,
            "weights": self.weights,
            "checks": list(self.checks),
        }


def resolve_model(
    *,
    runtime: str = DEFAULT_RUNTIME,
    weights: str | None = None,
    precision: str = PRECISIONS[0],
    decode_memory_mb: int = DEFAULT_DECODE_MEMORY,
    cache: Path | None = None,
) -> ModelSpec:
    """Locate, make (once per cache) and check the model for a run, on the driver, once.

    runtime "onnx": the ONNX conversion of the verified weights (weights None), of a Keras weights file
    (converted once, cached by its sha256), or an .onnx file m9 converted (with the record of its check).
    runtime "keras": the verified weights file (weights None) or a Keras weights file, loaded here once
    to take its checksum (a file Keras cannot load is a WeightsError before any worker starts)."""
    from m9.model import weights as w

    if runtime not in RUNTIMES:
        raise InputError(f"--runtime {runtime}: expected one of {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    common: dict[str, Any] = {"precision": precision, "decode_memory_mb": decode_memory_mb}
    if precision == "int8":
        return _int8(runtime, weights, cache, common)
    checks: tuple[str, ...]
    if runtime == "onnx":
        if weights is None:
            path, data, meta = w.cached_onnx(cache)
            identity = w.EXPECTED_CHECKSUM
            checks = ("converted from the verified ImageNet weights",)
        elif str(weights).endswith(".onnx"):
            path = w.resolve_path(weights)
            data, meta = w.load_onnx(path)
            identity, checks = "sha256:" + meta["sha256"], ()
        else:
            path = w.convert_file(weights, cache)
            data, meta = w.load_onnx(path)
            identity, checks = w.identity(weights), ()
        checks = (
            *checks,
            f"sha256 is the one recorded at conversion ({meta['sha256'][:12]}…)",
            f"features within {meta.get('tolerance', w.ONNX_MAX_ABS_DIFF):g} of Keras on the check inputs "
            f"(max |Δ| {meta.get('max_abs_diff', float('nan')):.2g})",
        )
        return ModelSpec(
            runtime=runtime,
            data=data,
            sha256=meta["sha256"],
            source=str(path),
            weights=identity,
            checks=checks,
            **common,
        )
    if weights is None:
        path = w.fetch(cache)
        identity = w.EXPECTED_CHECKSUM
        checks = ("the weights' checksum is checked where they are loaded",)
    else:
        path = w.resolve_path(weights)
        identity = w.identity(weights)  # loads the file once (a WeightsError if Keras cannot)
        checks = (f"loaded by Keras on the driver (checksum {identity[:12]}…)",)
    data = Path(path).read_bytes()
    return ModelSpec(
        runtime=runtime,
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        source=str(path),
        weights=identity,
        checks=checks,
        **common,
    )


def _int8(runtime: str, weights: str | None, cache: Path | None, common: dict[str, Any]) -> ModelSpec:
    """The int8 model: the verified weights' FP32 ONNX model quantised once per cache (m9.model.quantize)."""
    from m9.model import quantize
    from m9.model import weights as w

    if runtime != "onnx":
        raise InputError(f"--precision int8 runs on --runtime onnx only, not --runtime {runtime}")
    if weights is not None:
        raise InputError("--precision int8 is made from m9's verified weights only; leave out --weights")
    path, data, meta = quantize.cached_int8(cache)
    quality = "; ".join(
        f"{name} cosine mean {q['cosine_mean']:.4f}, p1 {q['cosine_p1']:.4f}" for name, q in meta["quality"].items()
    )
    return ModelSpec(
        runtime=runtime,
        data=data,
        sha256=meta["sha256"],
        source=str(path),
        weights=w.EXPECTED_CHECKSUM,
        checks=(
            "quantised from the ONNX conversion of the verified ImageNet weights "
            f"({meta['method']}, {meta['calibration']['method']} calibration)",
            f"sha256 is the one recorded when it was made ({meta['sha256'][:12]}…)",
            f"features to FP32 at or above the bar (cosine mean {quantize.MIN_COSINE_MEAN}, p1 "
            f"{quantize.MIN_COSINE_P1}): {quality}",
        ),
        **common,
    )
