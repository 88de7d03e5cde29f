"""The int8 model: made once per cache from the cached FP32 ONNX model by static quantisation, kept only if its
features stay close to FP32's on the check sets, and refused when loaded unless its bytes and its recorded
quality still hold."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import numpy as np

from m9.config import cache_dir
from m9.errors import WeightsError, first_line

log = logging.getLogger(__name__)

#: The int8 model, cached beside the FP32 conversion it is made from; its sidecar (same name + ".json")
#: records the recipe, the calibration set, the quality measured on the check sets, sha256 and versions.
INT8_CACHE_NAME = "mobilenet_v2_imagenet_no_top.int8.onnx"

#: The quality bar: per check set, the mean and the 1st percentile of the cosine between an image's int8
#: and FP32 features. Below either, the model is not cached (and a cached one is refused). The recipe
#: below measured 0.992 / 0.987 on the sample's Test images, 0.983 / 0.971 on its thumbnails and 0.988 /
#: 0.977 on 400 Fashion-MNIST images; the rejected variants measured below (docs/model.md).
MIN_COSINE_MEAN = 0.98
MIN_COSINE_P1 = 0.95

#: The recipe, by name: what the sidecar records and what a cached model must have been made with.
METHOD = "static-qoperator-u8s8-per-channel"

#: Conv nodes (in graph order) kept in float: Conv1 and blocks 0–2 (at 112×112 and 56×56), where 8 bits
#: lose the most. With int8 weights fewer do not meet the bar (6: thumbnails cosine mean 0.974, p1 0.936;
#: docs/model.md, scripts/int8_frontier.py).
FLOAT_CONVS = 9

#: Operator format: QOperator (QLinearConv nodes in the file). The QDQ file of the same recipe measured
#: below the bar (thumbnails cosine mean 0.9797) and no faster.
FORMAT = "QOperator"

#: Weight type: signed int8 (U8S8), which ONNX Runtime's x86 kernels run with VNNI; with uint8 weights
#: (U8U8) its int8 convs took 3× as long (per-node profile, docs/model.md), and U8U8 with 6 float Conv ran
#: 1.11× FP32 where this recipe runs 1.56× (1 thread, batch 8). ORT's QOperator writes int8 weights anyway.
WEIGHT_TYPE = "QInt8"

#: A weight channel whose largest |w| is below this is dead (the ImageNet weights have a few): it is set to
#: exactly 0 before quantising, else its tiny per-channel scale makes the int32 bias scale overflow.
DEAD_CHANNEL = 1e-8

#: Calibration: ONNX Runtime's MinMax over the bundled sample's Training images (its Test images are a
#: check set). Measured against it (docs/model.md, scripts/int8_calibration.py): Entropy as quantize_static
#: runs it (MinMax's model again), Entropy over 2048 bins (below the bar), Percentile 99.99 and 99.999
#: (better on one check set, worse on the other); the histogram methods also need 9 GB against 2 GB.
CALIBRATION = "MinMax"
CALIBRATION_SPLIT = "Training"
CALIBRATION_BATCH = 16

#: Side of the thumbnail check set: the bundled sample's 240 images reduced to 28×28 grey and back, the
#: look of Fashion-MNIST-sized inputs, made offline and the same on every machine.
THUMBNAIL_SIDE = 28


def int8_path(cache: Path | None = None) -> Path:
    return Path(cache or cache_dir()) / INT8_CACHE_NAME


def _sample_files(split: str | None = None) -> list[Path]:
    # m9 is installed as a directory (package_data in setup.cfg): its resources are files on disk.
    files = sorted(Path(str(resources.files("m9") / "sample")).rglob("*.jpg"), key=str)
    return [f for f in files if split is None or f"/{split}/" in str(f)]


def _decode(contents: list[bytes]) -> np.ndarray:
    from m9.model.decode import decode_many

    inputs, errors = decode_many(contents)
    if any(errors):
        raise WeightsError(f"the bundled sample has images m9 cannot decode: {next(e for e in errors if e)}")
    return inputs


def calibration_inputs() -> np.ndarray:
    """The calibration images: the bundled sample's Training split, decoded exactly as m9 embeds."""
    return _decode([f.read_bytes() for f in _sample_files(CALIBRATION_SPLIT)])


def _thumbnail(content: bytes) -> bytes:
    import io

    from PIL import Image

    bilinear = Image.Resampling.BILINEAR
    im = Image.open(io.BytesIO(content)).convert("L").resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), bilinear)
    out = io.BytesIO()
    im.resize((100, 100), bilinear).save(out, format="JPEG", quality=95)
    return out.getvalue()


def check_sets() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The sets the int8 model is checked on, name → (inputs, labels, scored): the cosine is taken over the
    scored rows; kNN is fitted on the other rows and scores the scored ones (leave-one-out if all are scored).
    "sample-test": the sample's Test images (not calibrated on), kNN from its Training images, as `m9
    evaluate` does; "sample-thumbnails": the whole sample as 28×28 grey thumbnails, leave-one-out."""
    files = _sample_files()
    labels = np.array([f.parent.name for f in files])
    test = np.array(["/Test/" in str(f) for f in files])
    return {
        "sample-test": (_decode([f.read_bytes() for f in files]), labels, test),
        "sample-thumbnails": (_decode([_thumbnail(f.read_bytes()) for f in files]), labels, np.ones(len(files), bool)),
    }


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine between two feature matrices (a zero row gives 0)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, (a * b).sum(axis=1) / np.where(norms > 0, norms, 1.0), 0.0)


def cosine_summary(values: np.ndarray) -> dict:
    return {
        "images": int(len(values)),
        "cosine_mean": round(float(np.mean(values)), 4),
        "cosine_p1": round(float(np.percentile(values, 1)), 4),
        "cosine_min": round(float(np.min(values)), 4),
    }


def knn_accuracy(features: np.ndarray, labels: np.ndarray, scored: np.ndarray, neighbors: int = 5) -> float:
    """kNN accuracy (cosine, majority vote) of the scored rows, their neighbours taken among the other rows, or
    leave-one-out among all rows when every row is scored."""
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    refs = ~scored if not scored.all() else np.ones(len(x), bool)
    sims = x[scored] @ x[refs].T
    if scored.all():
        np.fill_diagonal(sims, -np.inf)
    ref_labels, truth = labels[refs], labels[scored]
    nearest = np.argsort(-sims, axis=1)[:, : min(neighbors, refs.sum() - scored.all())]
    right = 0
    for i, row in enumerate(nearest):
        names, counts = np.unique(ref_labels[row], return_counts=True)
        right += names[np.argmax(counts)] == truth[i]
    return round(right / len(truth), 4)


def forward(model_bytes: bytes, inputs: np.ndarray, batch: int = 16) -> np.ndarray:
    from m9.model import ort

    sess = ort.session(model_bytes)
    return np.concatenate([ort.run(sess, inputs[i : i + batch]) for i in range(0, len(inputs), batch)])


def measure(fp32: bytes, int8: bytes, sets: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict:
    """Per check set: the int8-vs-FP32 cosine summary over its scored rows and both precisions' 5-NN accuracy."""
    out = {}
    for name, (inputs, labels, scored) in sets.items():
        a, b = forward(fp32, inputs), forward(int8, inputs)
        out[name] = {
            **cosine_summary(cosines(a[scored], b[scored])),
            "knn5_fp32": knn_accuracy(a, labels, scored),
            "knn5_int8": knn_accuracy(b, labels, scored),
        }
    return out


def below_bar(quality: dict) -> list[str]:
    """The check sets whose recorded quality is below the bar, in words (empty: the model passes)."""
    bad = []
    for name, q in quality.items():
        mean, p1 = q.get("cosine_mean", -1.0), q.get("cosine_p1", -1.0)
        if not (mean >= MIN_COSINE_MEAN and p1 >= MIN_COSINE_P1):
            bad.append(f"{name}: cosine mean {mean:.4f}, p1 {p1:.4f}")
    return bad


def _zero_dead_channels(model) -> int:
    """Set every Conv weight's dead output channels (|w| < DEAD_CHANNEL throughout) to exactly 0, in place."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    zeroed = 0
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[1] not in inits:
            continue
        init = inits[node.input[1]]
        w = numpy_helper.to_array(init).copy()
        dead = np.abs(w.reshape(w.shape[0], -1)).max(axis=1) < DEAD_CHANNEL
        if dead.any():
            w[dead] = 0.0
            init.CopyFrom(numpy_helper.from_array(w, init.name))
            zeroed += int(dead.sum())
    return zeroed


def quantise(
    fp32: bytes,
    calibration: np.ndarray,
    method: str = CALIBRATION,
    percentile: float | None = None,
    float_convs: Sequence[int] | None = None,
    quant_format: str = FORMAT,
    weight_type: str = WEIGHT_TYPE,
) -> bytes:
    """The int8 model's bytes: pre-processed (shape inference, BatchNorm folded), dead channels zeroed, then
    statically quantised (`quant_format` "QDQ" or "QOperator"; U8 activations; `weight_type` "QUInt8" or
    "QInt8" weights, per channel) with the Conv nodes at the positions `float_convs` (in graph order; None:
    the first FLOAT_CONVS) kept in float, calibrated with `method` ("MinMax", "Entropy", "Percentile") on
    `calibration`; `percentile` is Percentile's (ONNX Runtime's CalibPercentile; None: its default, 99.999).
    The defaults make m9's recipe."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        """The calibration inputs, in batches."""

        def __init__(self, name: str, inputs: np.ndarray):
            self._batches = iter(
                [{name: inputs[i : i + CALIBRATION_BATCH]} for i in range(0, len(inputs), CALIBRATION_BATCH)]
            )

        def get_next(self):
            return next(self._batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(fp32)
        quant_pre_process(str(src), str(pre))
        model = onnx.load(str(pre))
        zeroed = _zero_dead_channels(model)
        onnx.save(model, str(pre))
        convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
        keep = [convs[i] for i in (range(FLOAT_CONVS) if float_convs is None else float_convs)]
        log.info(
            "quantising: %d dead weight channels zeroed, %d of %d Conv kept in float", zeroed, len(keep), len(convs)
        )
        quantize_static(
            str(pre),
            str(out),
            Reader(model.graph.input[0].name, calibration),
            quant_format=getattr(QuantFormat, quant_format),
            activation_type=QuantType.QUInt8,
            weight_type=getattr(QuantType, weight_type),
            per_channel=True,
            nodes_to_exclude=keep,
            calibrate_method=getattr(CalibrationMethod, method),
            extra_options={} if percentile is None else {"CalibPercentile": percentile},
        )
        return out.read_bytes()


def make_int8(fp32_path: Path, fp32: bytes, target: Path) -> Path:
    """Quantise the FP32 model at fp32_path (its checked bytes `fp32`) to target with its sidecar, if (and only
    if) the int8 features meet the bar on every check set; else WeightsError, caching nothing."""
    import onnxruntime

    log.info("making the int8 model from %s (once per cache; about a minute)", fp32_path.name)
    calibration = calibration_inputs()
    try:
        data = quantise(fp32, calibration)
    except Exception as exc:  # ORT's quantiser raises many types for a graph it cannot handle
        raise WeightsError(f"quantising {fp32_path.name} to int8 failed: {first_line(exc, named=True)}") from None
    quality = measure(fp32, data, check_sets())
    bad = below_bar(quality)
    if bad:
        raise WeightsError(
            f"the int8 model is below the quality bar (cosine to FP32 mean ≥ {MIN_COSINE_MEAN}, p1 ≥ "
            f"{MIN_COSINE_P1}) on {'; '.join(bad)}: not cached"
        )
    meta = {
        "file": target.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "source": fp32_path.name,
        "source_sha256": hashlib.sha256(fp32).hexdigest(),
        "method": METHOD,
        "recipe": {
            "pre_process": "onnxruntime.quantization.shape_inference.quant_pre_process",
            "dead_channels_zeroed_below": DEAD_CHANNEL,
            "float_convs": FLOAT_CONVS,
            "format": FORMAT,
            "activations": "QUInt8",
            "weights": WEIGHT_TYPE,
            "per_channel": True,
        },
        "calibration": {
            "method": CALIBRATION,
            "set": f"bundled sample {CALIBRATION_SPLIT}",
            "images": len(calibration),
        },
        "bar": {"cosine_mean": MIN_COSINE_MEAN, "cosine_p1": MIN_COSINE_P1},
        "quality": quality,
        "versions": {"onnxruntime": onnxruntime.__version__},
        "made_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    # The record first, the model last (as for the FP32 conversion): a model file only appears beside its record.
    for path, payload in ((sidecar(target), json.dumps(meta, indent=2).encode() + b"\n"), (target, data)):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    log.info(
        "cached the int8 model at %s (%s)",
        target,
        "; ".join(f"{k} cosine {v['cosine_mean']}" for k, v in quality.items()),
    )
    return target


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def load_int8(path: Path, fp32_sha256: str | None = None) -> tuple[bytes, dict]:
    """The bytes of a cached int8 model and its record, refused (WeightsError) unless its sidecar exists, was
    made by this recipe (from the FP32 model with sha256 fp32_sha256, when given), records quality at the bar
    on every check set, and its sha256 matches the file's bytes."""
    path = Path(path)
    try:
        meta = json.loads(sidecar(path).read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path.name}: no readable record of how it was made ({first_line(exc)}): refused") from None
    if meta.get("method") != METHOD or not meta.get("quality"):
        raise WeightsError(f"{path.name} was not made by m9's int8 recipe ({METHOD}): refused")
    if fp32_sha256 and meta.get("source_sha256") != fp32_sha256:
        raise WeightsError(f"{path.name} was made from another FP32 model than the cached one: refused")
    bad = below_bar(meta["quality"])
    if bad:
        raise WeightsError(f"{path.name} records quality below the bar ({'; '.join(bad)}): refused")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta.get("sha256"):
        raise WeightsError(
            f"{path.name} has sha256 {digest[:12]}…, not the {str(meta.get('sha256'))[:12]}… recorded when it was "
            f"made: refused"
        )
    return data, meta


def cached_int8(cache: Path | None = None) -> tuple[Path, bytes, dict]:
    """The int8 model in the cache (file, checked bytes, record), made once from the cached FP32 model. A cached
    file that fails load_int8's checks is made again, once; if the new one fails too, WeightsError."""
    from m9.model import weights as w

    fp32_path, fp32, _ = w.cached_onnx(cache)
    target = int8_path(cache)
    fp32_sha = hashlib.sha256(fp32).hexdigest()
    if target.exists():
        try:
            data, meta = load_int8(target, fp32_sha)
            return target, data, meta
        except WeightsError as exc:
            log.warning("%s; making it again", exc)
            target.unlink()
    make_int8(fp32_path, fp32, target)
    data, meta = load_int8(target, fp32_sha)
    return target, data, meta
