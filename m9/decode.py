"""The image half of the model core: image bytes → the (224, 224, 3) float input MobileNetV2 takes."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from m9.config import IMAGE_SIZE, MAX_IMAGE_PIXELS

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
