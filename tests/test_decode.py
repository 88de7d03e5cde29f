"""m9.model.decode: decode to size (JPEG draft, Image.reduce), the memory budget, and the formats m9 reads."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from m9.config import IMAGE_SIZE
from m9.model.decode import DECODE_TARGET, DecodeError, _open_to_size, _to_rgb, decode, decode_bytes
from tests.conftest import SAMPLE

ROOT = Path(__file__).resolve().parent.parent


def full_decode(content: bytes) -> np.ndarray:
    """PREPROCESS_VERSION 1: every pixel decoded, then the bilinear resize (the reference for small images)."""
    im = Image.open(io.BytesIO(content))
    im.load()
    im = _to_rgb(ImageOps.exif_transpose(im)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return np.asarray(im, dtype=np.float32) / 127.5 - 1.0


def _photo(size: tuple[int, int]) -> Image.Image:
    """A sample fruit photo stretched to size: real texture, any size."""
    return Image.open(next(SAMPLE.glob("Training/*/*.jpg"))).convert("RGB").resize(size, Image.BICUBIC)


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("size", [(100, 100), (640, 480), (895, 1200), (1200, 895)])
def test_images_below_twice_the_target_decode_exactly_as_before(size):
    """Short side < 2 × DECODE_TARGET (896 px): no draft, no reduce, the very same input as a full decode."""
    for fmt in ("JPEG", "PNG"):
        content = _encoded(_photo(size), fmt)
        assert np.array_equal(decode(content), full_decode(content)), (fmt, size)


@pytest.mark.parametrize("progressive", [False, True])
def test_big_jpegs_decode_at_a_dct_scale_close_to_the_full_decode(progressive):
    content = _encoded(_photo((4032, 3024)), "JPEG", quality=90, progressive=progressive)
    im = _open_to_size(content, 2048)
    # 3024 // 448 = 6 → scale 1/4: both sides stay >= DECODE_TARGET, and far fewer pixels are decoded.
    assert im.size == (1008, 756) and min(im.size) >= DECODE_TARGET
    got, want = decode(content), full_decode(content)
    assert np.abs(got - want).mean() < 0.01 and np.abs(got - want).max() < 0.2


def test_big_pngs_are_reduced_before_the_resize():
    content = _encoded(_photo((2000, 1500)), "PNG")
    assert _open_to_size(content, 2048).size == (667, 500)  # 1500 // 448 = 3, rounded up
    got, want = decode(content), full_decode(content)
    assert np.abs(got - want).mean() < 0.01


def test_transparency_and_palettes_survive_the_reduce():
    """A big palette image with a transparent index, and an RGBA one: composited onto white as before."""
    rgba = Image.new("RGBA", (1800, 1800), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).ellipse((300, 300, 1500, 1500), fill=(200, 30, 40, 255))
    for im in (rgba, rgba.convert("RGB").quantize(8)):
        kw = {"transparency": 0} if im.mode == "P" else {}
        content = _encoded(im, "PNG", **kw)
        got, want = decode(content), full_decode(content)
        assert np.abs(got - want).max() < 0.1, im.mode
        if im.mode == "RGBA":
            assert got[0, 0].tolist() == [1.0, 1.0, 1.0]  # a transparent corner is white


def test_the_budget_is_read_from_the_header_and_names_the_option():
    header_only = _encoded(_photo((64, 64)), "PNG")
    im = Image.open(io.BytesIO(header_only))
    assert decode_bytes(im) == 64 * 64 * 4
    from tests.test_robustness import _png_declaring

    bomb = _png_declaring(60_000, 60_000)
    started = time.perf_counter()
    with pytest.raises(DecodeError, match=r"^too large: 60000x60000 pixels .* above --decode-memory 2048"):
        decode(bomb)
    assert time.perf_counter() - started < 5  # refused from the header; decoding would take minutes
    small = _encoded(_photo((1000, 1000)), "PNG")
    with pytest.raises(DecodeError, match="--decode-memory 1"):
        decode(small, memory_mb=1)
    assert decode(small, memory_mb=8).shape == (IMAGE_SIZE, IMAGE_SIZE, 3)


@pytest.mark.parametrize(
    "fmt,kw",
    [("WEBP", {"quality": 95}), ("WEBP", {"lossless": True}), ("TIFF", {}), ("BMP", {}), ("GIF", {})],
)
def test_webp_tiff_bmp_gif_read_like_jpeg_and_png(fmt, kw):
    photo = _photo((300, 200))
    got = decode(_encoded(photo, fmt, **kw))
    reference = full_decode(_encoded(photo, "PNG"))
    tolerance = 0.35 if fmt == "GIF" else 0.1  # a GIF holds 256 colours
    assert np.abs(got - reference).mean() < tolerance / 4 and got.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)


def test_a_gif_is_read_from_its_first_frame():
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    got = decode(buf.getvalue())
    assert got[..., 0].min() > 0.9 and got[..., 2].max() < -0.9  # red, not blue


@pytest.mark.slow  # 1.4 GB and ~10-20 s: a real 13,000² drawing, encoded and decoded in a fresh process
def test_a_13000_pixel_png_is_embedded_within_the_budget(tmp_path):
    """The default budget admits an honest 13,000×13,000 RGBA drawing; the worker's peak RSS stays under it."""
    path = tmp_path / "drawing.png"
    im = Image.new("RGBA", (13_000, 13_000), (0, 0, 0, 0))
    draw = ImageDraw.Draw(im)
    for i in range(0, 13_000, 1_000):
        draw.ellipse((i, i, i + 3000, i + 2000), fill=(200, 30, 40, 255))
    im.save(path, compress_level=1)
    del im, draw
    script = f"""
from m9.model.decode import decode
x = decode(open({str(path)!r}, "rb").read())
assert x.shape == (224, 224, 3) and x.min() < 0 and x.max() == 1.0
print(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM:")))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout) < 2048 * 1024  # KiB: within --decode-memory's default


def test_work_items_cover_every_row_once_in_full_items_across_row_groups(tmp_path):
    """plan_slices: max_rows consecutive rows per item (the file's last item shorter), naming the row groups
    they overlap; every row exactly once, in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from m9.stages.embed import plan_slices

    shard = tmp_path / "part-0.parquet"
    with pq.ParquetWriter(shard, pa.schema([("image_id", pa.string())])) as writer:
        for size in (4, 4, 4, 70, 4, 30, 30):
            writer.write_table(pa.table({"image_id": [f"{size}-{i}" for i in range(size)]}))
    items = plan_slices([str(shard)], 32)
    assert [(it["row_groups"], it["start"], it["stop"]) for it in items] == [
        ([0, 1, 2, 3], 0, 32),  # three small groups and the start of a large one
        ([3], 20, 52),  # inside the large group
        ([3, 4, 5], 52, 84),  # its end, a small group, the start of the next
        ([5, 6], 10, 42),
        ([6], 12, 30),  # the file's last rows
    ]
    table = pq.ParquetFile(shard)
    covered = [
        i
        for it in items
        for i in table.read_row_groups(it["row_groups"]).column("image_id").to_pylist()[it["start"] : it["stop"]]
    ]
    assert covered == pq.read_table(shard).column("image_id").to_pylist()


def test_the_grey_decode_is_embeds_decode_made_grey_and_small():
    from m9.model.decode import decode_grey

    bicubic = Image.Resampling.BICUBIC
    thumb = next(iter(sorted(SAMPLE.rglob("*.jpg")))).read_bytes()
    expected = np.asarray(Image.open(io.BytesIO(thumb)).convert("L").resize((28, 28), bicubic))
    assert np.array_equal(decode_grey(thumb, 28, bicubic), expected)
    # Transparency onto white, as embed composites it: a transparent image is white.
    buf = io.BytesIO()
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(buf, "PNG")
    assert (decode_grey(buf.getvalue(), 28, bicubic) == 255).all()
    # The same budget as embed's: refused from the header, one line.
    buf = io.BytesIO()
    _photo((4000, 3000)).save(buf, "JPEG")
    with pytest.raises(DecodeError, match="too large"):
        decode_grey(buf.getvalue(), 28, bicubic, memory_mb=1)
    with pytest.raises(DecodeError, match="empty file"):
        decode_grey(b"", 28, bicubic)
