"""Planted copies of real images (byte-identical, resized, recompressed, cropped, brightness changed): what the
near-duplicate threshold is measured on, and what the tests plant."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

#: The modifications a near copy gets, one per copy, in turn: what re-uploads, thumbnails and edits do.
NEAR = ("resized", "recompressed", "cropped", "brighter", "darker")

#: How strong each one is: half the size; JPEG quality 30; 5 % off every side; brightness ±15 %.
RESIZE, QUALITY, CROP, BRIGHTNESS = 0.5, 30, 0.05, 0.15


def modify(content: bytes, how: str) -> bytes:
    """A modified copy of an image's bytes (JPEG); "exact" returns the bytes as they are."""
    if how == "exact":
        return content
    with Image.open(io.BytesIO(content)) as opened:
        im = ImageOps.exif_transpose(opened).convert("RGB")
        quality = 90
        if how == "resized":
            im = im.resize(
                (max(1, round(im.width * RESIZE)), max(1, round(im.height * RESIZE))), Image.Resampling.BICUBIC
            )
        elif how == "recompressed":
            quality = QUALITY
        elif how == "cropped":
            dx, dy = round(im.width * CROP), round(im.height * CROP)
            im = im.crop((dx, dy, im.width - dx, im.height - dy))
        elif how in ("brighter", "darker"):
            im = ImageEnhance.Brightness(im).enhance(1 + BRIGHTNESS if how == "brighter" else 1 - BRIGHTNESS)
        else:
            raise ValueError(f"unknown modification {how!r}; expected exact or one of {', '.join(NEAR)}")
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        return buf.getvalue()


def plant(
    originals: list[Path], root: Path, out: Path, kinds: tuple[str, ...] = NEAR, other_split: bool = False
) -> list[dict]:
    """Write one copy of each original (kinds taken in turn) under out, at the original's place relative to
    root (Split/label/), or in the other split with other_split; returns [{original, copy, kind}]."""
    planted = []
    for i, original in enumerate(originals):
        how = kinds[i % len(kinds)]
        relative = original.relative_to(root)
        if other_split and relative.parts[0] in ("Training", "Test"):
            relative = Path("Test" if relative.parts[0] == "Training" else "Training", *relative.parts[1:])
        target = out / relative.parent / f"{original.stem}__{how}{original.suffix if how == 'exact' else '.jpg'}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if how == "exact":
            shutil.copyfile(original, target)
        else:
            target.write_bytes(modify(original.read_bytes(), how))
        planted.append({"original": str(original), "copy": str(target), "kind": how})
    return planted
