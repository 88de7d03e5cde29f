"""The one model core every engine calls: decode → preprocess → MobileNetV2 forward pass → 1280 floats."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np

from m9.config import DEFAULT_BATCH_SIZE, FEATURE_DIM
from m9.errors import WeightsError
from m9.model.decode import BACKGROUND, DecodeError, _to_rgb, decode, decode_many  # noqa: F401 (re-exported)
from m9.model.spec import ModelSpec

log = logging.getLogger(__name__)


class Embedder:
    """Holds one loaded model (a resolved ModelSpec, m9.model.spec.resolve_model); turns a batch of image
    bytes into features and per-image errors. It never locates or fetches a model itself.

    runtime "onnx": an ONNX Runtime session over the spec's bytes, refused unless they hash to its sha256;
    TensorFlow is never imported. runtime "keras": TensorFlow/Keras with the spec's weights file (or
    `arrays`, model.get_weights(), e.g. a Spark broadcast), refused unless the loaded arrays have the
    checksum the spec names.
    """

    def __init__(
        self,
        model: ModelSpec,
        threads: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        arrays: list | None = None,
    ):
        self.model, self.batch_size = model, batch_size
        if model.runtime == "onnx":
            from m9.model import ort

            sess = ort.session(model.checked_data(), ort.SessionSettings(threads=threads))
            self._forward = lambda x: ort.run(sess, x)
        else:
            from m9.model import keras_model

            if arrays is None:
                loaded = keras_model.load_model(threads=threads, data=model.checked_data(), name=model.source)
            else:
                loaded = keras_model.load_model(threads=threads, arrays=arrays)
            got = keras_model.checksum(loaded.get_weights())
            if got != model.weights:
                raise WeightsError(
                    f"the Keras weights loaded from {model.source} have checksum {got[:12]}…, not the "
                    f"{model.weights[:12]}… resolved on the driver: refused"
                )
            forward, _ = keras_model.keras_function(loaded)
            self._forward = lambda x: forward(x).numpy()

    def forward_slices(self, inputs: np.ndarray) -> Iterator[np.ndarray]:
        """forward one batch_size slice at a time: features (≤ batch_size, 1280) float32 per slice."""
        for i in range(0, len(inputs), self.batch_size):
            yield np.asarray(self._forward(inputs[i : i + self.batch_size]), dtype=np.float32)

    def forward(self, inputs: np.ndarray) -> np.ndarray:
        """Preprocessed inputs (n, 224, 224, 3) → features (n, 1280) float32, in slices of batch_size."""
        if len(inputs) == 0:
            return np.zeros((0, FEATURE_DIM), np.float32)
        return np.concatenate(list(self.forward_slices(inputs)))

    def decode(self, contents: Sequence[bytes | None]) -> tuple[np.ndarray, list[str | None]]:
        """Image bytes → model inputs of the good images and per-image errors, within the spec's decode budget."""
        return decode_many(contents, self.model.decode_memory_mb)

    def embed(self, contents: Sequence[bytes | None]) -> tuple[np.ndarray, list[str | None]]:
        """Image bytes → (features (n, 1280) with zeros where an image failed, per-image error or None)."""
        inputs, errors = self.decode(contents)
        return place(self.forward(inputs), errors), errors


def place(values: np.ndarray, errors: Sequence[str | None], fill=0) -> np.ndarray:
    """The values of the good images (errors[i] is None), in order, put at their rows among all of them;
    `fill` in the rows of the images that failed."""
    out = np.full((len(errors), *values.shape[1:]), fill, values.dtype)
    out[[i for i, e in enumerate(errors) if e is None]] = values
    return out
