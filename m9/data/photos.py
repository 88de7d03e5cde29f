"""`m9 data photos`: a photo set of camera-sized JPEGs cut from the photographs in Debian's mate-backgrounds."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from m9.data.datasets import DatasetError, _download_deb, _extract_deb

log = logging.getLogger(__name__)

PHOTOS_PACKAGE = "mate-backgrounds"
#: The package's photographs (its other JPEGs and PNGs are drawings); Elephants comes in three sizes, the
#: largest (5640×3172) is taken.
PHOTOS_DIR = Path("usr/share/backgrounds/mate")
PHOTOS = (
    "nature/Aqua.jpg",
    "nature/Blinds.jpg",
    "nature/Dune.jpg",
    "nature/FreshFlower.jpg",
    "nature/Garden.jpg",
    "nature/GreenMeadow.jpg",
    "nature/LadyBird.jpg",
    "nature/RainDrops.jpg",
    "nature/Storm.jpg",
    "nature/TwoWings.jpg",
    "nature/Wood.jpg",
    "nature/YellowFlower.jpg",
    "abstract/Elephants_5640x3172.jpg",
)
PHOTOS_COPYRIGHT = Path("usr/share/doc") / PHOTOS_PACKAGE / "copyright"

#: Sizes the set cycles through, in megapixels: from a small phone shot to a 16-MP camera.
MEGAPIXELS = (1, 2, 4, 8, 12, 16)
#: Aspect ratios (width:height) the set cycles through: camera landscape and portrait, 16:9, 3:2.
ASPECTS = ((4, 3), (3, 4), (16, 9), (3, 2))
#: What phones and cameras write: ~0.25 bytes a pixel of detailed scenes at quality 90.
JPEG_QUALITY = 90
#: Default number of files: a few hundred, enough for a steady rate on 2 actors without an hour-long build.
DEFAULT_COUNT = 300
#: Seed of the crops, so two builds give the same files.
SEED = 13


def _plan(count: int, megapixels: float | None) -> list[tuple[int, str, float, tuple[int, int]]]:
    """(index, source photo, megapixels, aspect) for each output file: photos, sizes and aspects cycled."""
    plan = []
    for i in range(count):
        mp = megapixels if megapixels else MEGAPIXELS[(i // len(PHOTOS)) % len(MEGAPIXELS)]
        aspect = ASPECTS[(i // (len(PHOTOS) * len(MEGAPIXELS))) % len(ASPECTS)]
        plan.append((i, PHOTOS[i % len(PHOTOS)], mp, aspect))
    return plan


def _make(task: tuple[int, str, float, tuple[int, int], str, str]) -> tuple[str, str]:
    """Write one photo: a seeded crop of the source at the aspect, resized to the megapixels (Lanczos)."""
    index, rel, mp, (aw, ah), src_dir, out_dir = task
    rng = np.random.default_rng([SEED, index])
    with Image.open(Path(src_dir) / rel) as opened:
        src = opened.convert("RGB")
        sw, sh = src.size
        # The largest crop of this aspect, shrunk to 60-100 % and placed anywhere: each file differs.
        cw = min(sw, sh * aw / ah) * rng.uniform(0.6, 1.0)
        ch = cw * ah / aw
        x, y = rng.uniform(0, sw - cw), rng.uniform(0, sh - ch)
        width = round((mp * 1e6 * aw / ah) ** 0.5)
        height = round(width * ah / aw)
        out = src.resize((width, height), Image.Resampling.LANCZOS, box=(x, y, x + cw, y + ch))
    name = Path(rel).stem.split("_")[0]
    target = Path(out_dir) / name / f"{name}-{index:04d}-{width}x{height}.jpg"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    out.save(tmp, "JPEG", quality=JPEG_QUALITY)
    os.replace(tmp, target)
    return str(target.relative_to(out_dir)), rel


@contextmanager
def _source(source: Path | None) -> Iterator[Path]:
    """The root holding usr/share/backgrounds/mate: the system's, a given tree or .deb, or a download."""
    if source is None and (Path("/") / PHOTOS_DIR / PHOTOS[0]).exists():
        yield Path("/")
        return
    if source is not None and source.is_dir():
        if not (source / PHOTOS_DIR / PHOTOS[0]).exists():
            raise DatasetError(f"{source} holds no {PHOTOS_DIR}/{PHOTOS[0]}; pass the extracted {PHOTOS_PACKAGE}")
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="m9-photos-") as tmp:
        deb = source.resolve() if source is not None else _download_deb(PHOTOS_PACKAGE, Path(tmp))
        yield _extract_deb(deb, Path(tmp) / "tree")


def build_photos(
    output: str | os.PathLike,
    count: int = DEFAULT_COUNT,
    megapixels: float | None = None,
    source: Path | None = None,
    workers: int | None = None,
) -> dict:
    """Write `count` JPEGs of 1-16 MP (or all of `megapixels`) cut from mate-backgrounds' photographs into
    output/<photo>/, with the package's copyright file and SOURCES.tsv beside them; returns counts."""
    if count < 1:
        raise DatasetError("--count must be at least 1")
    if megapixels is not None and not 0.01 <= megapixels <= 100:
        raise DatasetError("--megapixels must be between 0.01 and 100")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    with _source(source) as root:
        src_dir = root / PHOTOS_DIR
        tasks = [(*t, str(src_dir), str(out)) for t in _plan(count, megapixels)]
        workers = workers or os.cpu_count() or 1
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            made = list(pool.imap(_make, tasks, chunksize=4))
        copyright_file = root / PHOTOS_COPYRIGHT
        if copyright_file.exists():
            shutil.copyfile(copyright_file, out / f"COPYRIGHT.{PHOTOS_PACKAGE}")
    _write_sources(out, made)
    sizes = [(out / rel).stat().st_size for rel, _ in made]
    log.info("photos: %d JPEGs, %.0f MB, in %s", len(made), sum(sizes) / 1e6, out)
    return {"files": len(made), "bytes": sum(sizes)}


def _write_sources(out: Path, made: Sequence[tuple[str, str]]) -> None:
    lines = ["file\tpackage\tsource"] + [f"{rel}\t{PHOTOS_PACKAGE}\t/{PHOTOS_DIR / src}" for rel, src in made]
    (out / "SOURCES.tsv").write_text("\n".join(lines) + "\n")
