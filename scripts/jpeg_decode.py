"""m9's JPEG decode (Pillow: draft, reduce, bilinear resize to 224×224) against the same steps with simplejpeg
(libjpeg-turbo through numpy) doing the JPEG decode, on one thread, the ways timed in turns in one process (so
a change in the machine's load hits them alike). Per folder: CPU ms per image of each way (less moved by
other load than wall time; the order of the ways turns each round), Pillow's time over each way's (per round,
then the median), whether the final 224×224 pixels are the same, and the steps apart on the first 10 images
(the JPEG decode alone at m9's scale and at full scale, simplejpeg's hand-over to Pillow, the resize).
simplejpeg decodes at the scale Pillow's draft picks (so the pixels can match); "simplejpeg" also opens the
file's header with Pillow for its EXIF orientation (as m9 must, to turn the image upright), "-no-exif" does
not, "-reused-buffer" decodes into one buffer kept across images. Prints one JSON line per folder.

Usage: .venv/bin/python scripts/jpeg_decode.py DIR [DIR …] [--rounds 5] [--limit 200]
(simplejpeg is not an m9 dependency: `.venv/bin/pip install simplejpeg==1.9.0` first.)
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from m9.config import IMAGE_SIZE
from m9.model.decode import DECODE_TARGET, decode_pixels


def _draft_factor(width: int, height: int) -> int:
    """The 1/N scale Pillow's draft picks for m9 (the largest of 1/2, 1/4, 1/8 keeping both sides >= 448)."""
    if min(width, height) // DECODE_TARGET < 2:
        return 1
    return max(
        n for n in (1, 2, 4, 8) if math.ceil(width / n) >= DECODE_TARGET and math.ceil(height / n) >= DECODE_TARGET
    )


def _decoded_bytes(content: bytes) -> int:
    """Bytes of the RGB array simplejpeg decodes `content` to at m9's scale."""
    import simplejpeg

    height, width, _, _ = simplejpeg.decode_jpeg_header(content)
    n = _draft_factor(width, height)
    return math.ceil(width / n) * math.ceil(height / n) * 3


def simplejpeg_pixels(content: bytes, exif: bool = True, buffer: bytearray | None = None) -> np.ndarray:
    """m9's decode_pixels for an RGB JPEG, the JPEG decoded by simplejpeg (exif: the orientation read and
    applied as m9 does; the sets measured here are all upright), into `buffer` if given (reused: no new pages
    to fault in for every image, as Pillow's own block cache avoids)."""
    import simplejpeg
    from PIL import ImageOps

    height, width, _, _ = simplejpeg.decode_jpeg_header(content)
    n = _draft_factor(width, height)
    arr = simplejpeg.decode_jpeg(
        content,
        "RGB",
        min_width=math.ceil(width / n),
        min_height=math.ceil(height / n),
        min_factor=n,
        **({} if buffer is None else {"buffer": buffer}),
    )
    im = Image.fromarray(arr, "RGB")
    if exif:
        header = Image.open(io.BytesIO(content))  # the header only: Pillow reads the EXIF, decodes nothing
        if header.getexif().get(0x0112, 1) != 1:
            im.info["exif"] = header.info.get("exif")
            im = ImageOps.exif_transpose(im)
    factor = min(im.size) // DECODE_TARGET
    if factor >= 2:
        im = im.reduce(factor)
    return np.asarray(im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR), dtype=np.uint8)


def _timed(fn, contents: list[bytes]) -> float:
    started = time.process_time()
    for c in contents:
        fn(c)
    return 1000 * (time.process_time() - started) / len(contents)


def steps(contents: list[bytes], rounds: int = 3) -> dict:
    """CPU ms per image of each step apart, the median of `rounds` passes over the images."""
    import simplejpeg

    def pil_decode(c, full=False):
        im = Image.open(io.BytesIO(c))
        if not full and _draft_factor(*im.size) > 1:
            im.draft(im.mode, (DECODE_TARGET, DECODE_TARGET))
        im.load()
        return im

    def sj_decode(c, full=False):
        height, width, _, _ = simplejpeg.decode_jpeg_header(c)
        n = 1 if full else _draft_factor(width, height)
        return simplejpeg.decode_jpeg(
            c, "RGB", min_width=math.ceil(width / n), min_height=math.ceil(height / n), min_factor=n
        )

    arrays = [sj_decode(c) for c in contents]
    images = [pil_decode(c) for c in contents]
    parts = {
        "pillow_decode": lambda: [pil_decode(c) for c in contents],
        "simplejpeg_decode": lambda: [sj_decode(c) for c in contents],
        "pillow_decode_full": lambda: [pil_decode(c, True) for c in contents],
        "simplejpeg_decode_full": lambda: [sj_decode(c, True) for c in contents],
        "simplejpeg_fromarray": lambda: [Image.fromarray(a, "RGB") for a in arrays],
        "resize_pillow_decoded": lambda: [im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR) for im in images],
    }
    out = {}
    for name, run in parts.items():
        times = []
        for _ in range(rounds):
            started = time.process_time()
            run()
            times.append(1000 * (time.process_time() - started) / len(contents))
        out[name] = round(sorted(times)[rounds // 2], 2)
    return out


def measure(folder: Path, rounds: int, limit: int) -> dict:
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in (".jpg", ".jpeg"))[:limit]
    contents = [f.read_bytes() for f in files]
    buffer = bytearray(max(_decoded_bytes(c) for c in contents))
    ways = {
        "pillow (m9)": decode_pixels,
        "simplejpeg": simplejpeg_pixels,
        "simplejpeg-no-exif": lambda c: simplejpeg_pixels(c, exif=False),
        "simplejpeg-no-exif-reused-buffer": lambda c: simplejpeg_pixels(c, exif=False, buffer=buffer),
    }
    m9 = [decode_pixels(c) for c in contents]
    same = {}
    for name, fn in list(ways.items())[1:]:
        diffs = [np.abs(fn(c).astype(np.int16) - ref).max() for c, ref in zip(contents, m9)]
        same[name] = {"identical_images": int(sum(d == 0 for d in diffs)), "max_abs_diff_u8": int(max(diffs))}
    ms = {name: [] for name in ways}
    names = list(ways)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            ms[name].append(round(_timed(ways[name], contents), 3))
    med = {name: sorted(v)[len(v) // 2] for name, v in ms.items()}
    ratios = {name: sorted(a / b for a, b in zip(ms["pillow (m9)"], ms[name]))[rounds // 2] for name in names[1:]}
    with Image.open(io.BytesIO(contents[0])) as im:
        size = im.size
    return {
        "folder": str(folder),
        "images": len(contents),
        "first_size": list(size),
        "cpu_ms_per_image": ms,
        "cpu_ms_median": med,
        "pillow_over_each_median_of_rounds": {k: round(v, 3) for k, v in ratios.items()},
        "pixels_vs_m9": same,
        "steps_cpu_ms": steps(contents[:10]),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--limit", type=int, default=200)
    args = parser.parse_args()
    for folder in args.folders:
        print(json.dumps(measure(folder, args.rounds, args.limit)), flush=True)


if __name__ == "__main__":
    main()
