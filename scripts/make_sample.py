"""Build the bundled Fruits-360-style sample in m9/sample from Debian's tuxpaint-stamps-default photos."""

from __future__ import annotations

import argparse
import gzip
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

log = logging.getLogger("make_sample")

PACKAGE = "tuxpaint-stamps-default"
# The photo stamps of single fruits, vegetables and nuts; food/fruit/cartoon/ holds drawings, and the
# other food folders hold dishes, so only these three folders (not their subfolders) are taken.
STAMP_DIRS = ("food/fruit", "food/nuts", "food/vegetables")
STAMPS_ROOT = Path("usr/share/tuxpaint/stamps")
DOC_DIR = Path("usr/share/doc") / PACKAGE

SIZE = 100  # Fruits-360 images are 100x100 RGB with the object on a white background.
# Fruits-360 holds rotated views of each fruit, with different views in Training and Test; these
# angles (degrees, counter-clockwise) are disjoint so Test never repeats a Training view.
TRAINING_ANGLES = (0, 120, 240)
TEST_ANGLES = (60, 180)
JPEG_QUALITY = 90
# Where Debian keeps the full GPL-2 text that the package's copyright file points at.
GPL2_TEXT = Path("/usr/share/common-licenses/GPL-2")
REPO = Path(__file__).resolve().parent.parent


def normalize_label(stem: str) -> str:
    """Return a lowercase label of letters, digits and underscores for a file stem."""
    return re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_")


def render_view(photo: Image.Image, angle: int) -> Image.Image:
    """Rotate a transparent photo, fit it into SIZE x SIZE keeping aspect, and put it on white."""
    # Premultiplied alpha keeps the transparent pixels' (often black) colour out of the edges when
    # rotating and resampling.
    rgba = photo.convert("RGBA").convert("RGBa")
    rotated = rgba.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    bbox = rotated.getchannel("a").getbbox()
    if bbox is not None:
        rotated = rotated.crop(bbox)
    scale = SIZE / max(rotated.size)
    fitted_size = (max(1, round(rotated.width * scale)), max(1, round(rotated.height * scale)))
    fitted = rotated.resize(fitted_size, resample=Image.Resampling.LANCZOS).convert("RGBA")
    canvas = Image.new("RGBA", (SIZE, SIZE), (255, 255, 255, 255))
    offset = ((SIZE - fitted.width) // 2, (SIZE - fitted.height) // 2)
    canvas.alpha_composite(fitted, offset)
    return canvas.convert("RGB")


def find_photos(tree: Path) -> list[Path]:
    """Return the photo stamps under an extracted package tree, sorted by label."""
    photos = [p for d in STAMP_DIRS for p in (tree / STAMPS_ROOT / d).glob("*.png")]
    if not photos:
        raise SystemExit(f"no photos under {tree / STAMPS_ROOT}; is this an extracted {PACKAGE}?")
    photos.sort(key=lambda p: normalize_label(p.stem))
    labels = [normalize_label(p.stem) for p in photos]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise SystemExit(f"photos normalize to the same label: {', '.join(duplicates)}")
    return photos


def package_version(tree: Path) -> str:
    """Return the Debian version of the extracted package, read from its changelog."""
    changelog = tree / DOC_DIR / "changelog.Debian.gz"
    with gzip.open(changelog, "rt", encoding="utf-8") as f:
        first = f.readline()
    match = re.match(r"\S+ \(([^)]+)\)", first)
    if not match:
        raise SystemExit(f"cannot read the version from {changelog}")
    return match.group(1)


def extract_deb(deb: Path, into: Path) -> Path:
    """Extract a .deb with dpkg-deb (no root needed) and return the tree."""
    if shutil.which("dpkg-deb") is None:
        raise SystemExit("dpkg-deb is needed to extract the .deb; install dpkg or pass an extracted tree")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
    return into


def download_deb(into: Path) -> Path:
    """Download the package's .deb into a folder with apt-get download (no root needed)."""
    if shutil.which("apt-get") is None:
        raise SystemExit("apt-get is needed to download the package; pass a .deb or an extracted tree")
    log.info("downloading %s with apt-get download", PACKAGE)
    subprocess.run(["apt-get", "download", PACKAGE], cwd=into, check=True)
    debs = sorted(into.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise SystemExit(f"apt-get download left no {PACKAGE}_*.deb in {into}")
    return debs[0]


def write_notice(tree: Path, output: Path, version: str, photos: list[Path]) -> None:
    """Write COPYING (the package's copyright file and the GPL-2) and NOTICE.md (provenance)."""
    copyright_text = (tree / DOC_DIR / "copyright").read_text(encoding="utf-8")
    copying = copyright_text
    if GPL2_TEXT.is_file():
        copying += "\n" + "=" * 72 + "\n\n" + GPL2_TEXT.read_text(encoding="utf-8")
    else:
        log.warning("%s not found; COPYING holds only the package's copyright file", GPL2_TEXT)
    (output / "COPYING").write_text(copying, encoding="utf-8")

    holder = next(
        (line.split(":", 1)[1].strip() for line in copyright_text.splitlines() if line.startswith("Copyright:")),
        "see COPYING",
    )
    training = ", ".join(map(str, TRAINING_ANGLES))
    test = ", ".join(map(str, TEST_ANGLES))
    rows = "\n".join(f"| `{p.relative_to(tree).as_posix()}` | `{normalize_label(p.stem)}` |" for p in photos)
    notice = f"""# Sample images: source and license

The images under `Training/` and `Test/` are derived from photo stamps in the Debian binary package
`{PACKAGE}`, version `{version}` (source package `tuxpaint-stamps`, upstream Tux Paint,
https://tuxpaint.org/). They are licensed under the GNU General Public License, version 2 or (at your
option) any later version; see `COPYING` beside this file, which holds the package's copyright file
(`{DOC_DIR.as_posix()}/copyright`) followed by the full GPL-2 text.

Copyright: {holder} (the packaging's holders are in `COPYING`).

The images were modified by `scripts/make_sample.py` in the m9 repository: each transparent PNG was
rotated counter-clockwise by the angle in the file name (`<label>_r<angle>.jpg`; Training {training},
Test {test} degrees), fitted into {SIZE}x{SIZE} pixels keeping its aspect ratio, composited onto a
white background, and saved as JPEG (quality {JPEG_QUALITY}). The preferred form for modification is
the original PNGs in the package; to rebuild them:

    python scripts/make_sample.py            # downloads the .deb with apt-get download
    python scripts/make_sample.py PATH       # an extracted tree or the .deb

| source file in the package | label |
| --- | --- |
{rows}
"""
    (output / "NOTICE.md").write_text(notice, encoding="utf-8")


def build_sample(tree: Path, output: Path) -> int:
    """Write the sample from an extracted package tree into output and return the image count."""
    photos = find_photos(tree)
    version = package_version(tree)
    for split in ("Training", "Test"):
        if (output / split).exists():
            shutil.rmtree(output / split)
    count = 0
    for photo_path in photos:
        label = normalize_label(photo_path.stem)
        with Image.open(photo_path) as photo:
            photo.load()
            for split, angles in (("Training", TRAINING_ANGLES), ("Test", TEST_ANGLES)):
                folder = output / split / label
                folder.mkdir(parents=True, exist_ok=True)
                for angle in angles:
                    view = render_view(photo, angle)
                    view.save(folder / f"{label}_r{angle:03d}.jpg", "JPEG", quality=JPEG_QUALITY, optimize=True)
                    count += 1
    write_notice(tree, output, version, photos)
    log.info("wrote %d images of %d labels from %s %s into %s", count, len(photos), PACKAGE, version, output)
    return count


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, find or fetch the package, and build the sample."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "source",
        nargs="?",
        type=Path,
        help=f"extracted {PACKAGE} tree or its .deb; downloaded with apt-get download when omitted",
    )
    parser.add_argument("--output", type=Path, default=REPO / "m9" / "sample", help="default: %(default)s")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    with tempfile.TemporaryDirectory(prefix="m9-sample-") as tmp:
        tmp_path = Path(tmp)
        if args.source is None:
            tree = extract_deb(download_deb(tmp_path), tmp_path / "tree")
        elif args.source.is_file():
            tree = extract_deb(args.source, tmp_path / "tree")
        else:
            tree = args.source
        args.output.mkdir(parents=True, exist_ok=True)
        build_sample(tree, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
