"""Tests for the Fashion-MNIST builder (on Debian's real package) and the bundled fruit sample."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m9.data.datasets import (
    FASHION_MNIST_LABELS,
    FASHION_MNIST_PACKAGE,
    FRUITS360_LICENSE_NAME,
    NOTICE_NAME,
    DatasetError,
    _download_deb,
    _read_idx,
    build_fashion_mnist,
    build_fruits360,
)
from m9.errors import M9Error

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SAMPLE = Path(__file__).resolve().parent.parent / "m9" / "sample"
PER_CLASS = 3


def _jpegs(root: Path) -> list[Path]:
    return sorted(root.rglob("*.jpg"))


# ---------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------------------

needs_package = pytest.mark.skipif(
    not SYSTEM_FASHION_MNIST.is_dir() and not (shutil.which("apt-get") and shutil.which("dpkg-deb")),
    reason="needs /usr/share/datasets/fashion-mnist, or apt-get and dpkg-deb to download it",
)


def _download_or_skip(into: Path) -> Path:
    """Debian's dataset-fashion-mnist .deb, or a skip naming apt-get's reason when it cannot be fetched (no
    network, no mirror, stale package lists): that is this machine's state, not a failure of m9."""
    try:
        return _download_deb(FASHION_MNIST_PACKAGE, into)
    except DatasetError as exc:
        pytest.skip(f"Debian's {FASHION_MNIST_PACKAGE} could not be fetched: {exc}")


@pytest.fixture(scope="module")
def fashion_deb(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """None when the system has the package installed, else its .deb (downloaded once, or skipped)."""
    if SYSTEM_FASHION_MNIST.is_dir():
        return None
    return _download_or_skip(tmp_path_factory.mktemp("fashion-deb"))


@pytest.fixture(scope="module")
def fashion(fashion_deb: Path | None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """Build a per_class=3 tree once, as a user would (no source: the system's package, else apt-get's)."""
    output = tmp_path_factory.mktemp("fashion-mnist")
    counts = build_fashion_mnist(output, per_class=PER_CLASS)
    return output, counts


@pytest.mark.slow
@needs_package
def test_fashion_mnist_counts_and_layout(fashion: tuple[Path, dict[str, int]]) -> None:
    output, counts = fashion
    assert counts == {"Training": 10 * PER_CLASS, "Test": 10 * PER_CLASS}
    assert sorted(p.name for p in output.iterdir()) == sorted(["Training", "Test", NOTICE_NAME])
    for split in ("Training", "Test"):
        assert sorted(p.name for p in (output / split).iterdir()) == sorted(FASHION_MNIST_LABELS)
        for label in FASHION_MNIST_LABELS:
            names = [p.name for p in (output / split / label).iterdir()]
            assert len(names) == PER_CLASS
            assert all(re.fullmatch(r"\d+\.jpg", n) for n in names), names


@pytest.mark.slow
@needs_package
def test_fashion_mnist_images_are_100px_rgb_jpegs(fashion: tuple[Path, dict[str, int]]) -> None:
    output, _ = fashion
    for path in _jpegs(output):
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (100, 100)), path


@pytest.mark.slow
@needs_package
def test_fashion_mnist_labels_follow_the_idx_files(fashion: tuple[Path, dict[str, int]]) -> None:
    # The first labels of Fashion-MNIST: training 9 0 0 3 0 2 7 2 5 5, test 9 2 1 1 6 1 4 6 5 7.
    output, _ = fashion
    assert sorted(p.name for p in (output / "Training" / "t-shirt_top").iterdir()) == [
        "1.jpg",
        "2.jpg",
        "4.jpg",
    ]
    assert (output / "Training" / "ankle_boot" / "0.jpg").is_file()
    assert sorted(p.name for p in (output / "Test" / "trouser").iterdir()) == ["2.jpg", "3.jpg", "5.jpg"]
    # A grey garment on black: the corner is dark, there is a bright garment, the channels agree.
    with Image.open(output / "Training" / "ankle_boot" / "0.jpg") as image:
        pixels = np.asarray(image, dtype=np.int16)
    assert pixels[0, 0].max() < 16
    assert pixels.max() > 200
    assert np.abs(pixels - pixels.mean(axis=2, keepdims=True)).max() < 8


@pytest.mark.slow
@needs_package
def test_fashion_mnist_copies_the_mit_notice(fashion: tuple[Path, dict[str, int]]) -> None:
    output, _ = fashion
    notice = (output / NOTICE_NAME).read_text(encoding="utf-8")
    assert "Zalando SE" in notice
    assert "Permission is hereby granted, free of charge" in notice


@pytest.mark.slow
@needs_package
def test_fashion_mnist_rerun_keeps_existing_images(
    fashion: tuple[Path, dict[str, int]], fashion_deb: Path | None
) -> None:
    output, counts = fashion
    before = {p: p.stat().st_mtime_ns for p in _jpegs(output)}
    # From the .deb file this time (or the installed tree): the --source path, with the same result.
    source = fashion_deb or SYSTEM_FASHION_MNIST
    assert build_fashion_mnist(output, per_class=PER_CLASS, source=source) == counts
    assert {p: p.stat().st_mtime_ns for p in _jpegs(output)} == before


def test_a_package_that_cannot_be_fetched_is_a_skip_with_the_reason(tmp_path: Path, monkeypatch) -> None:
    """What the Fashion-MNIST tests do when apt-get fails: skip, saying why, instead of erroring."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "apt-get"
    fake.write_text("#!/bin/sh\necho 'E: Unable to locate package dataset-fashion-mnist' >&2\nexit 100\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(pytest.skip.Exception, match="could not be fetched: .*Unable to locate package"):
        _download_or_skip(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"per_class": 0}, "per_class must be at least 1"),
        ({"splits": ("Train",)}, "splits must be some of Training, Test"),
        ({"source": Path("/nonexistent/fashion-mnist")}, "does not exist"),
    ],
)
def test_fashion_mnist_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        build_fashion_mnist(tmp_path / "out", **kwargs)


def test_fashion_mnist_source_without_idx_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no Fashion-MNIST idx files"):
        build_fashion_mnist(tmp_path / "out", source=tmp_path)


def test_read_idx_rejects_a_file_that_is_not_idx(tmp_path: Path) -> None:
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(b"<html>not found</html>"))
    with pytest.raises(DatasetError, match="is not an idx file"):
        _read_idx(bad, ndim=1)


def test_read_idx_rejects_a_truncated_file(tmp_path: Path) -> None:
    short = tmp_path / "labels.gz"
    short.write_bytes(gzip.compress(b"\0\0\x08\x01" + (5).to_bytes(4, "big") + b"\1\2"))
    with pytest.raises(DatasetError, match="not \\(5,\\)"):
        _read_idx(short, ndim=1)


# ---------------------------------------------------------------------------------------------------
# The bundled sample
# ---------------------------------------------------------------------------------------------------


def _angles(folder: Path) -> set[int]:
    return {int(re.fullmatch(rf"{folder.name}_r(\d+)\.jpg", p.name).group(1)) for p in folder.iterdir()}


def test_sample_has_both_splits_with_the_same_48_labels() -> None:
    training = sorted(p.name for p in (SAMPLE / "Training").iterdir())
    test = sorted(p.name for p in (SAMPLE / "Test").iterdir())
    assert len(training) == 48
    assert training == test
    assert all(re.fullmatch(r"[a-z0-9_]+", label) for label in training)


def test_sample_views_differ_between_training_and_test() -> None:
    for label_dir in (SAMPLE / "Training").iterdir():
        training = _angles(label_dir)
        test = _angles(SAMPLE / "Test" / label_dir.name)
        assert len(training) >= 2 and test, label_dir.name
        assert not training & test, label_dir.name


def test_sample_images_are_100px_rgb_jpegs() -> None:
    paths = _jpegs(SAMPLE)
    assert len(paths) >= 48 * 2
    for path in paths:
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (100, 100)), path


def test_sample_carries_its_license_and_stays_small() -> None:
    notice = (SAMPLE / "NOTICE.md").read_text(encoding="utf-8")
    assert "tuxpaint-stamps-default" in notice and "scripts/make_sample.py" in notice
    copying = (SAMPLE / "COPYING").read_text(encoding="utf-8")
    assert "License: GPL-2" in copying
    total = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert total < 2 * 1024 * 1024


# ---------------------------------------------------------------------------------------------------
# Fruits-360 (from a local stand-in archive built from the sample: the real one needs internet)
# ---------------------------------------------------------------------------------------------------

# The newer public archives nest the dataset this deep; older ones have fruits-360/ or the repo at the top.
STAND_IN_ROOT = "fruits-360_dataset_100x100/fruits-360/"


def _sample_images() -> dict[str, bytes]:
    """'split/label/name' → bytes of every image in the bundled sample."""
    return {p.relative_to(SAMPLE).as_posix(): p.read_bytes() for p in _jpegs(SAMPLE)}


@pytest.fixture(scope="module")
def fruits_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Fruits-360-shaped zip of the sample, with the extras the real archives carry around the images."""
    path = tmp_path_factory.mktemp("fruits360") / "fruits-360.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(STAND_IN_ROOT, "")  # a directory entry
        for rel, data in _sample_images().items():
            zf.writestr(STAND_IN_ROOT + rel, data)
        zf.writestr(STAND_IN_ROOT + "LICENSE", "CC BY-SA 4.0 stand-in\n")
        zf.writestr(STAND_IN_ROOT + "readme.md", "not an image\n")
        zf.writestr(STAND_IN_ROOT + "test-multiple_fruits/apple_banana.jpg", b"not in a split")
        zf.writestr(STAND_IN_ROOT + "Training/kiwi/.DS_Store", b"hidden")
        zf.writestr(STAND_IN_ROOT + "Training/kiwi/notes.txt", b"not an image")
        zf.writestr("papers/Training/x/fruits.jpg", b"a Training/ without a Test/ beside it")
    return path


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_fruits360_unpacks_only_the_split_images(fruits_zip: Path, tmp_path: Path) -> None:
    sample = _sample_images()
    counts = build_fruits360(str(fruits_zip), str(tmp_path / "out"))
    assert counts == {split: sum(rel.startswith(f"{split}/") for rel in sample) for split in ("Training", "Test")}
    assert sum(counts.values()) == 240
    tree = _tree(tmp_path / "out")
    assert tree.pop(FRUITS360_LICENSE_NAME) == b"CC BY-SA 4.0 stand-in\n"
    assert tree == sample


def test_fruits360_rerun_writes_only_what_is_missing(fruits_zip: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build_fruits360(str(fruits_zip), str(out))
    first, second = sorted(out.rglob("*.jpg"))[:2]
    first.unlink()
    second.write_bytes(b"truncated")
    kept = {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg") if p not in (first, second)}
    build_fruits360(str(fruits_zip), str(out))
    assert _tree(out).keys() >= _sample_images().keys()
    assert first.read_bytes() == (SAMPLE / first.relative_to(out)).read_bytes()
    assert second.read_bytes() == (SAMPLE / second.relative_to(out)).read_bytes()
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in kept.items())


def test_fruits360_cli(fruits_zip: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from m9.cli import main

    result = CliRunner().invoke(main, ["data", "fruits-360", "--archive", str(fruits_zip), "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    training, test = (len(_jpegs(SAMPLE / split)) for split in ("Training", "Test"))
    assert result.output == f"fruits-360: {training} training and {test} test images in {tmp_path}\n"


def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.zip", "does not exist"),
        (lambda d: (d / "a.zip").write_bytes(b"not a zip") and d / "a.zip", "is not a readable zip archive"),
        (lambda d: _zip(d / "b.zip", {"fruits-360/Training/kiwi/1.jpg": b"x"}), "no folder with both Training/"),
        (lambda d: _zip(d / "c.zip", {"Training/1.jpg": b"x", "Test/1.jpg": b"x"}), "no folder with both"),
        (lambda d: "ftp://example.org/fruits.zip", "http(s) URL or a local .zip"),
    ],
    ids=["missing", "not-a-zip", "no-test-split", "no-label-folders", "other-scheme"],
)
def test_fruits360_bad_archives(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(DatasetError, match=re.escape(message)):
        build_fruits360(str(make(tmp_path)), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_fruits360_to_s3(fruits_zip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Straight into a bucket, on moto's S3 server on loopback (never AWS)."""
    import boto3

    from tests.conftest import moto_server, point_aws_at

    with moto_server() as port:
        endpoint = f"http://127.0.0.1:{port}"
        point_aws_at(monkeypatch, endpoint, "fruits", "fruits-secret")
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="m9-fruits")

        counts = build_fruits360(str(fruits_zip), "s3://m9-fruits/inputs/")

        keys = {
            obj["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket="m9-fruits")
            for obj in page.get("Contents", [])
        }
        sample = _sample_images()
        assert counts == {split: len(_jpegs(SAMPLE / split)) for split in ("Training", "Test")}
        assert keys == {f"inputs/{rel}" for rel in sample} | {f"inputs/{FRUITS360_LICENSE_NAME}"}
        rel = sorted(sample)[0]
        assert client.get_object(Bucket="m9-fruits", Key=f"inputs/{rel}")["Body"].read() == sample[rel]
        with pytest.raises(M9Error, match="bucket m9-missing does not exist"):
            build_fruits360(str(fruits_zip), "s3://m9-missing/inputs/")
