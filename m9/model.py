"""The one model core every engine calls: decode → preprocess → MobileNetV2 forward pass → 1280 floats."""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

from m9.config import DEFAULT_RUNTIME, FEATURE_DIM, IMAGE_SIZE, MAX_IMAGE_PIXELS, RUNTIMES

log = logging.getLogger(__name__)

#: White, the background alpha is composited onto (Fruits-360 photographs fruit on white).
BACKGROUND = (255, 255, 255)


class DecodeError(ValueError):
    """An image that cannot become a model input; its message is the reason stored in errors/."""


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto white; 16-bit and float greys scaled, not clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I") and arr.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        im.mode in ("P", "L", "RGB") and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return im.convert("RGB")


def decode(content: bytes | None) -> np.ndarray:
    """Image bytes → float32 array (224, 224, 3) in [-1, 1], exactly as m9 feeds MobileNetV2.

    Pillow decode, EXIF orientation applied, RGB (alpha onto white), bilinear resize to 224×224,
    float32, x / 127.5 - 1. Raises DecodeError with a one-line reason.
    """
    if not content:
        raise DecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(content))
            width, height = im.size
            if width * height > MAX_IMAGE_PIXELS:
                raise DecodeError(f"too large: {width}x{height} pixels exceeds the {MAX_IMAGE_PIXELS:,} limit")
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Image.open itself checks the size: above 2× the limit it raises the error, between 1× and 2× it
        # warns, which the filter above turns into an exception; both are the same "too large" rejection.
        raise DecodeError(f"too large: {exc}") from None
    except Image.UnidentifiedImageError:
        # Pillow's own message names an in-memory buffer by address, which would differ on every run.
        raise DecodeError("cannot decode: UnidentifiedImageError: not an image format Pillow recognises") from None
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError …) for bad bytes
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise DecodeError(f"cannot decode: {type(exc).__name__}: {first_line}") from None
    return np.asarray(im, dtype=np.float32) / 127.5 - 1.0


def decode_many(contents: Sequence[bytes | None]) -> tuple[np.ndarray, list[str | None]]:
    """Decode a batch: the stacked inputs of the good images, and per image None or the reason it failed."""
    arrays, errors = [], []
    for content in contents:
        try:
            arrays.append(decode(content))
            errors.append(None)
        except DecodeError as exc:
            errors.append(str(exc))
    stacked = np.stack(arrays) if arrays else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    return stacked, errors


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
        from m9 import weights

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
        from m9 import ort
        from m9 import weights as m9weights

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
            from m9 import weights as m9weights

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
