"""The Keras runtime: MobileNetV2 built in TensorFlow/Keras (the reference), its threads, its forward pass,
and the checksum that identifies a set of its weights."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile

import numpy as np

from m9.config import IMAGE_SIZE

log = logging.getLogger(__name__)


def checksum(arrays: list[np.ndarray]) -> str:
    """SHA-256 over the arrays' float32 little-endian bytes, in order: what identifies a set of weights,
    whatever file format holds them."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array, dtype="<f4").tobytes())
    return digest.hexdigest()


def configure_threads(threads: int | None) -> None:
    """Limit TensorFlow's CPU threads in this process (only possible before its runtime starts)."""
    if not threads:
        return
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(threads))
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        # One op at a time: MobileNetV2 is a chain, and inter-op threads would only compete for the cores.
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        log.debug("TensorFlow already initialised; thread settings unchanged")


def build_backbone():
    """Keras MobileNetV2, 224×224, no top, average pooling → 1280, with no weights loaded yet."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    return keras.applications.MobileNetV2(
        input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), include_top=False, weights=None, pooling="avg"
    )


def weights_suffix(name: str) -> str:
    """The file ending Keras needs to read a weights file of this name (.weights.h5, or a legacy .h5)."""
    return ".weights.h5" if name.endswith(".weights.h5") else (os.path.splitext(name)[1] or ".h5")


def load_model(
    weights_path: str | None = None,
    threads: int | None = None,
    arrays: list | None = None,
    data: bytes | None = None,
    name: str = "weights.weights.h5",
):
    """The backbone with its weights from a file, from `arrays` (model.get_weights(), e.g. a Spark
    broadcast) or from a weights file's bytes `data` (whose file was called `name`). Checks nothing: the
    caller compares checksum(model.get_weights()) with what it expects."""
    configure_threads(threads)
    model = build_backbone()
    if arrays is not None:
        model.set_weights(arrays)
    elif data is not None:
        with tempfile.TemporaryDirectory(prefix="m9-weights-") as tmp:
            path = os.path.join(tmp, "model" + weights_suffix(name))
            with open(path, "wb") as f:
                f.write(data)
            model.load_weights(path)
    else:
        model.load_weights(str(weights_path))
    return model


def keras_function(model):
    """The model's inference forward pass as a tf.function over float32 (None, 224, 224, 3), and its input
    signature: what the Keras runtime runs and what the ONNX conversion converts, so both are the same graph."""
    import tensorflow as tf

    signature = [tf.TensorSpec((None, IMAGE_SIZE, IMAGE_SIZE, 3), tf.float32, name="input")]
    forward = tf.function(lambda x: model(x, training=False), input_signature=signature, reduce_retracing=True)
    return forward, signature
