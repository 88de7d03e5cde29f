"""`m9 data photos`: the photo set's sizes, layout, licence and sources, from a stand-in package tree."""

from __future__ import annotations

from PIL import Image

from m9.data.photos import PHOTOS, PHOTOS_COPYRIGHT, PHOTOS_DIR, PHOTOS_PACKAGE, build_photos
from tests.conftest import SAMPLE


def test_photos_are_cut_to_size_with_their_licence_and_sources(tmp_path):
    root = tmp_path / "pkg"
    photo = Image.open(next(SAMPLE.glob("Training/*/*.jpg"))).convert("RGB").resize((640, 400))
    for rel in PHOTOS:
        (root / PHOTOS_DIR / rel).parent.mkdir(parents=True, exist_ok=True)
        photo.save(root / PHOTOS_DIR / rel)
    (root / PHOTOS_COPYRIGHT).parent.mkdir(parents=True)
    (root / PHOTOS_COPYRIGHT).write_text("License: GPL-2+\n")
    out = tmp_path / "photos"
    counts = build_photos(out, count=len(PHOTOS) + 2, megapixels=0.3, source=root, workers=1)
    files = sorted(out.glob("*/*.jpg"))
    assert counts["files"] == len(files) == len(PHOTOS) + 2
    for f in files:
        width, height = Image.open(f).size
        assert abs(width * height - 0.3e6) < 0.01e6 and f.parent.name == f.name.split("-")[0]
    assert (out / f"COPYRIGHT.{PHOTOS_PACKAGE}").read_text() == "License: GPL-2+\n"
    sources = (out / "SOURCES.tsv").read_text().splitlines()
    assert sources[0] == "file\tpackage\tsource" and len(sources) == len(files) + 1
