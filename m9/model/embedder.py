"""The one model core every engine calls: decode → preprocess → MobileNetV2 forward pass → 1280 floats."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence

import numpy as np

from m9.config import DEFAULT_RUNTIME, FEATURE_DIM, IMAGE_SIZE, RUNTIMES
from m9.model.decode import BACKGROUND, DecodeError, _to_rgb, decode, decode_many  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


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


def load_model(weights_path: str | None, threads: int | None = None, verify: bool = True, arrays: list | None = None):
    """The backbone with weights from a file, or from `arrays` (model.get_weights(), e.g. a Spark broadcast);
    verified against the ImageNet checksum unless told not to."""
    configure_threads(threads)
    model = build_backbone()
    if arrays is not None:
        model.set_weights(arrays)
    else:
        model.load_weights(str(weights_path))
    if verify:
        from m9.model import weights

        weights.verify(model)
    return model


def keras_function(model):
    """The model's inference forward pass as a tf.function over float32 (None, 224, 224, 3), and its input
    signature: what the Keras runtime runs and what the ONNX conversion converts, so both are the same graph."""
    import tensorflow as tf

    signature = [tf.TensorSpec((None, IMAGE_SIZE, IMAGE_SIZE, 3), tf.float32, name="input")]
    forward = tf.function(lambda x: model(x, training=False), input_signature=signature, reduce_retracing=True)
    return forward, signature


class Embedder:
    """Holds one loaded model; turns a batch of image bytes into features and per-image errors.

    runtime "onnx" (the default) runs ONNX Runtime on a converted model: `weights_path` is an .onnx file
    (None: the verified cache, m9 weights fetch_onnx) or `model_bytes` its bytes (e.g. from a Spark broadcast
    or Ray's object store); with verify, the bytes must hash to `expected_sha256`, or to the sha256 recorded
    beside the file when it was converted and checked. TensorFlow is never imported on this path.
    runtime "keras" runs TensorFlow/Keras on a Keras weights file (None: the verified cache), or on `arrays`
    (model.get_weights()); with verify, the weights must have the ImageNet checksum.
    """

    def __init__(
        self,
        weights_path: str | None = None,
        runtime: str = DEFAULT_RUNTIME,
        threads: int | None = None,
        batch_size: int = 16,
        verify: bool = True,
        arrays: list | None = None,
        model_bytes: bytes | None = None,
        expected_sha256: str | None = None,
    ):
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
        self.runtime, self.batch_size = runtime, batch_size
        if runtime == "onnx":
            if arrays is not None:
                raise ValueError("arrays are Keras weights; the onnx runtime takes model_bytes")
            self._forward = self._onnx(weights_path, threads, verify, model_bytes, expected_sha256)
        else:
            if model_bytes is not None:
                raise ValueError("model_bytes are an ONNX model; the keras runtime takes arrays")
            self._forward = self._keras(weights_path, threads, verify, arrays)

    @staticmethod
    def _onnx(weights_path, threads, verify, model_bytes, expected_sha256):
        from m9.model import ort
        from m9.model import weights as m9weights

        if model_bytes is None:
            path = weights_path or m9weights.fetch_onnx()
            with open(path, "rb") as f:
                model_bytes = f.read()
            what = str(path)
        else:
            path, what = None, "the ONNX model handed to this worker"
        if verify:
            m9weights.check_bytes(model_bytes, expected_sha256 or m9weights.onnx_sha256(path), what)
        sess = ort.session(model_bytes, ort.SessionSettings(threads=threads))
        return lambda x: ort.run(sess, x)

    @staticmethod
    def _keras(weights_path, threads, verify, arrays):
        if weights_path is None and arrays is None:
            from m9.model import weights as m9weights

            weights_path = str(m9weights.fetch())
        model = load_model(weights_path, threads, verify=verify, arrays=arrays)
        forward, _ = keras_function(model)
        return lambda x: forward(x).numpy()

    def forward_slices(self, inputs: np.ndarray) -> Iterator[np.ndarray]:
        """forward one batch_size slice at a time: features (≤ batch_size, 1280) float32 per slice."""
        for i in range(0, len(inputs), self.batch_size):
            yield np.asarray(self._forward(inputs[i : i + self.batch_size]), dtype=np.float32)

    def forward(self, inputs: np.ndarray) -> np.ndarray:
        """Preprocessed inputs (n, 224, 224, 3) → features (n, 1280) float32, in slices of batch_size."""
        if len(inputs) == 0:
            return np.zeros((0, FEATURE_DIM), np.float32)
        return np.concatenate(list(self.forward_slices(inputs)))

    def embed(self, contents: Sequence[bytes | None]) -> tuple[np.ndarray, list[str | None]]:
        """Image bytes → (features (n, 1280) with zeros where an image failed, per-image error or None)."""
        inputs, errors = decode_many(contents)
        return place(self.forward(inputs), errors), errors


def place(values: np.ndarray, errors: Sequence[str | None], fill=0) -> np.ndarray:
    """The values of the good images (errors[i] is None), in order, put at their rows among all of them;
    `fill` in the rows of the images that failed."""
    out = np.full((len(errors), *values.shape[1:]), fill, values.dtype)
    out[[i for i, e in enumerate(errors) if e is None]] = values
    return out
