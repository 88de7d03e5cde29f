"""The image half of the model core: image bytes → the (224, 224, 3) float input MobileNetV2 takes."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from m9.config import DEFAULT_DECODE_MEMORY, IMAGE_SIZE
from m9.errors import first_line

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
    return im if im.mode == "RGB" else im.convert("RGB")  # convert() would copy an RGB image for nothing


#: The smallest side m9 decodes to before the final resize: twice the model's input. Shrinking by a
#: power of two (JPEG's DCT scaling, Image.reduce's box filter) down to this leaves the bilinear resize at
#: least a 2× reduction, so it still averages every pixel; images whose short side is below 2× this size
#: (~900 px) are decoded in full exactly as before.
DECODE_TARGET = 2 * IMAGE_SIZE

#: Modes Image.reduce takes as they are; others are converted to RGB(A) at full size first.
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "I", "F", "CMYK")

# m9 applies its own budget (decode_bytes) from the header; Pillow's fixed 89 Mpx "bomb" limit would
# refuse an honest 13,000² drawing, and its 1×–2× band only warns. Set once for every decoding process.
Image.MAX_IMAGE_PIXELS = None


def _pixel_bytes(mode: str) -> int:
    """Bytes Pillow stores per pixel of a mode: 1 for 1/L/P, 2 for 16-bit greys, 4 for everything else."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def decode_bytes(im: Image.Image, draft_size: tuple[int, int] | None = None) -> int:
    """What decoding an opened (not yet loaded) image costs in memory, from its header alone.

    A JPEG counts at its full size whatever scale it decodes at: libjpeg holds every DCT coefficient of a
    progressive JPEG (2 bytes each), and reads every one of a baseline JPEG, so a giant header is refused
    rather than trusted. Other formats decode in full (PNG, WebP, TIFF cannot scale while decoding), plus
    the full-size RGBA copy a mode Image.reduce cannot take as it is (or a premultiplied RGBA) needs.
    """
    width, height = im.size
    pixels = width * height
    if im.format == "JPEG":
        return pixels * 4
    total = pixels * _pixel_bytes(im.mode)
    if min(width, height) >= 2 * DECODE_TARGET and im.mode not in ("L", "RGB", "I", "F", "CMYK"):
        # _to_rgb scales a 16-bit grey through float64 (8 bytes a pixel, twice) before it can be reduced.
        total += pixels * (17 if im.mode.startswith("I;16") else 4)
    return total


def _open_to_size(content: bytes, memory_mb: int) -> Image.Image:
    """Open, check the budget, and load the image at the smallest size whose short side is >= DECODE_TARGET
    that the format reaches cheaply: JPEG by DCT scaling (draft), others by Image.reduce after decoding."""
    im: Image.Image = Image.open(io.BytesIO(content))  # reduce() below returns a plain Image
    need = decode_bytes(im)
    if need > memory_mb * 2**20:
        width, height = im.size
        raise DecodeError(
            f"too large: {width}x{height} pixels would take {need / 2**20:,.0f} MB to decode, above "
            f"--decode-memory {memory_mb} (MB)"
        )
    factor = min(im.size) // DECODE_TARGET
    if im.format == "JPEG" and factor >= 2:
        # Pillow picks the largest of 1/2, 1/4, 1/8 that keeps both sides >= DECODE_TARGET.
        im.draft(im.mode, (DECODE_TARGET, DECODE_TARGET))
    im.load()
    factor = min(im.size) // DECODE_TARGET
    if factor >= 2:
        if im.mode not in _REDUCIBLE:
            im = _to_rgb(im)  # a palette's indices, or 1-bit or 16-bit pixels, cannot be box-averaged
        im = im.reduce(factor)
    return im


def decode_pixels(content: bytes | None, memory_mb: int = DEFAULT_DECODE_MEMORY) -> np.ndarray:
    """Image bytes → uint8 RGB array (224, 224, 3): what decode() scales, 4× smaller to send between processes.

    Pillow decode to about 2× the model's input (decode to size, above), EXIF orientation applied, RGB
    (alpha onto white), bilinear resize to 224×224. An image whose decode would take more than memory_mb MB
    is refused from its header. Raises DecodeError with a one-line reason.
    """
    return _decoded(content, memory_mb, _to_model_input)


def _to_model_input(im: Image.Image) -> Image.Image:
    """A decoded image as the model's 224×224 RGB (bilinear)."""
    if im.mode == "L" and "transparency" not in im.info:
        # A grey image resized before it becomes RGB: the same pixels (RGB's three channels are the
        # grey, resized alike) for a third of the resize.
        return im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR).convert("RGB")
    return _to_rgb(im).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)


def decode_grey(
    content: bytes | None, side: int, resample: Image.Resampling, memory_mb: int = DEFAULT_DECODE_MEMORY
) -> np.ndarray:
    """Image bytes → uint8 grey array (side, side): decoded as decode_pixels decodes (the same budget, EXIF
    orientation, alpha onto white, decode to size), then grey and resized straight to side × side."""

    def to_grey(im: Image.Image) -> Image.Image:
        grey = im if im.mode == "L" and "transparency" not in im.info else _to_rgb(im).convert("L")
        return grey.resize((side, side), resample)

    return _decoded(content, memory_mb, to_grey)


def _decoded(content: bytes | None, memory_mb: int, finish) -> np.ndarray:
    """The budgeted, upright decode of content, finished by finish (Image → Image), as a uint8 array.
    Raises DecodeError with a one-line reason."""
    if not content:
        raise DecodeError("empty file")
    try:
        im = _open_to_size(content, memory_mb)
        ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of the (usual) upright image
        im = finish(im)
    except DecodeError:
        raise
    except Image.UnidentifiedImageError:
        # Pillow's own message names an in-memory buffer by address, which would differ on every run.
        raise DecodeError("cannot decode: UnidentifiedImageError: not an image format Pillow recognises") from None
    except MemoryError:
        raise DecodeError(f"cannot decode: MemoryError: not enough memory (--decode-memory {memory_mb})") from None
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError …) for bad bytes
        raise DecodeError(f"cannot decode: {first_line(exc, named=True)}") from None
    return np.asarray(im, dtype=np.uint8)


def to_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels (…, 224, 224, 3) → MobileNetV2's float32 input in [-1, 1]: x / 127.5 - 1."""
    # The same float32 values as pixels.astype(np.float32) / 127.5 - 1.0, in one buffer instead of three.
    out = np.divide(pixels, np.float32(127.5), dtype=np.float32)
    return np.subtract(out, np.float32(1.0), out=out)


def decode(content: bytes | None, memory_mb: int = DEFAULT_DECODE_MEMORY) -> np.ndarray:
    """Image bytes → float32 array (224, 224, 3) in [-1, 1], exactly as m9 feeds MobileNetV2 (decode_pixels,
    then to_input). Raises DecodeError with a one-line reason."""
    return to_input(decode_pixels(content, memory_mb))


def decode_many_pixels(
    contents: Sequence[bytes | None], memory_mb: int = DEFAULT_DECODE_MEMORY
) -> tuple[np.ndarray, list[str | None]]:
    """Decode a batch: the stacked uint8 pixels of the good images, and per image None or why it failed."""
    stacked = np.empty((len(contents), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)  # filled in place: no stack copy
    errors: list[str | None] = []
    good = 0
    for content in contents:
        try:
            stacked[good] = decode_pixels(content, memory_mb)
            good += 1
            errors.append(None)
        except DecodeError as exc:
            errors.append(str(exc))
    return stacked[:good], errors


def decode_many(
    contents: Sequence[bytes | None], memory_mb: int = DEFAULT_DECODE_MEMORY
) -> tuple[np.ndarray, list[str | None]]:
    """Decode a batch: the stacked model inputs of the good images, and per image None or why it failed."""
    pixels, errors = decode_many_pixels(contents, memory_mb)
    return to_input(pixels), errors
