"""Dataset builders: write public image data sets as Fruits-360-style folders of JPEGs."""

from __future__ import annotations

import gzip
import logging
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from m9.errors import M9Error

log = logging.getLogger(__name__)

__all__ = ["FASHION_MNIST_LABELS", "SPLITS", "DatasetError", "build_fashion_mnist"]

SPLITS = ("Training", "Test")

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
# Where Debian's package installs the idx files, both on the system and inside an extracted .deb.
FASHION_MNIST_DIR = Path("usr/share/datasets/fashion-mnist")
FASHION_MNIST_COPYRIGHT = Path("usr/share/doc") / FASHION_MNIST_PACKAGE / "copyright"
# Class names in label order, from the Fashion-MNIST README, lowercased with "/" and " " as "_".
FASHION_MNIST_LABELS = (
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
FASHION_MNIST_FILES = {
    "Training": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "Test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
NOTICE_NAME = "NOTICE-fashion-mnist.txt"

IMAGE_SIZE = 100  # Fruits-360's size, so every m9 input folder looks the same to the pipeline.
JPEG_QUALITY = 95  # Upscaled 28x28 greys are smooth; 95 keeps them near-lossless at ~3 KB each.
# Images per worker task: large enough that pickling and scheduling cost little against ~0.2 ms of
# resize + encode per image, small enough that two workers finish close together.
CHUNK = 2000
PROGRESS_EVERY_S = 10.0  # Seconds between progress log lines on long builds.


class DatasetError(M9Error):
    """A problem the user can fix: a missing tool, package or file, or a bad argument."""


# ---------------------------------------------------------------------------------------------------
# Getting the package
# ---------------------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path) -> None:
    """Run a command, turning a failure into a DatasetError that quotes its output."""
    result = subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip() or "no output"
        raise DatasetError(f"`{' '.join(cmd)}` failed (exit {result.returncode}): {output}")


def _extract_deb(deb: Path, into: Path) -> Path:
    """Extract a .deb with dpkg-deb (no root needed) and return the extracted tree."""
    if shutil.which("dpkg-deb") is None:
        raise DatasetError(f"dpkg-deb is needed to extract {deb.name}; install dpkg or pass --source DIR")
    _run(["dpkg-deb", "-x", str(deb), str(into)], cwd=into.parent)
    return into


def _download_deb(package: str, into: Path) -> Path:
    """Download a package's .deb with apt-get download (no root needed) and return its path."""
    if shutil.which("apt-get") is None:
        raise DatasetError(
            f"neither /{FASHION_MNIST_DIR} nor apt-get is available: install the Debian package "
            f"{package}, or pass its .deb or extracted tree as the source"
        )
    log.info("downloading the Debian package %s with apt-get download", package)
    try:
        _run(["apt-get", "download", package], cwd=into)
    except DatasetError as e:
        raise DatasetError(f"{e}; if apt-get cannot find {package}, run `apt-get update` first") from e
    debs = sorted(into.glob(f"{package}_*.deb"))
    if not debs:
        raise DatasetError(f"apt-get download left no {package}_*.deb in {into}")
    return debs[0]


@dataclass(frozen=True)
class _Source:
    """Where the idx files are, and the copyright file to copy beside the output if there is one."""

    data_dir: Path
    copyright: Path | None


def _source_from_tree(root: Path) -> _Source:
    """Find the idx files in a folder: the data folder itself, or a root it is installed under."""
    for data_dir in (root, root / FASHION_MNIST_DIR):
        if (data_dir / FASHION_MNIST_FILES["Training"][0]).is_file():
            # The doc folder sits beside datasets/ in both / and an extracted .deb.
            copyright_file = data_dir.parent.parent / "doc" / FASHION_MNIST_PACKAGE / "copyright"
            return _Source(data_dir, copyright_file if copyright_file.is_file() else None)
    raise DatasetError(f"no Fashion-MNIST idx files in {root} or {root / FASHION_MNIST_DIR}")


@contextmanager
def _fashion_mnist_source(source: Path | None) -> Iterator[_Source]:
    """Yield the Fashion-MNIST files from source, the system, or a downloaded .deb, cleaning up after."""
    if source is not None:
        source = Path(source)
        if not source.exists():
            raise DatasetError(f"source {source} does not exist")
        if source.is_dir():
            yield _source_from_tree(source)
            return
        with tempfile.TemporaryDirectory(prefix="m9-fashion-mnist-") as tmp:
            yield _source_from_tree(_extract_deb(source, Path(tmp) / "tree"))
        return
    system = Path("/") / FASHION_MNIST_DIR
    if (system / FASHION_MNIST_FILES["Training"][0]).is_file():
        yield _source_from_tree(system)
        return
    with tempfile.TemporaryDirectory(prefix="m9-fashion-mnist-") as tmp:
        tmp_path = Path(tmp)
        # Check for dpkg-deb before downloading 30 MB that could not be unpacked.
        if shutil.which("dpkg-deb") is None and shutil.which("apt-get") is not None:
            raise DatasetError(
                f"/{FASHION_MNIST_DIR} is missing and dpkg-deb, needed to unpack the downloaded "
                f"{FASHION_MNIST_PACKAGE} .deb, is not installed"
            )
        deb = _download_deb(FASHION_MNIST_PACKAGE, tmp_path)
        yield _source_from_tree(_extract_deb(deb, tmp_path / "tree"))


# ---------------------------------------------------------------------------------------------------
# Reading idx files
# ---------------------------------------------------------------------------------------------------

_IDX_UBYTE = 0x08  # The idx type code for unsigned bytes, the only one Fashion-MNIST uses.


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read a gzipped idx file of unsigned bytes with the given number of dimensions."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    header = 4 + 4 * ndim
    if len(data) < header or data[0:2] != b"\0\0" or data[2] != _IDX_UBYTE or data[3] != ndim:
        raise DatasetError(f"{path} is not an idx file of unsigned bytes with {ndim} dimension(s)")
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if len(data) - header != int(np.prod(shape)):
        raise DatasetError(f"{path} holds {len(data) - header} bytes of data, not {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _read_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the (n, 28, 28) images and (n,) labels of one split."""
    images_name, labels_name = FASHION_MNIST_FILES[split]
    images = _read_idx(data_dir / images_name, ndim=3)
    labels = _read_idx(data_dir / labels_name, ndim=1)
    if len(images) != len(labels):
        raise DatasetError(f"{split}: {len(images)} images but {len(labels)} labels in {data_dir}")
    if labels.size and labels.max() >= len(FASHION_MNIST_LABELS):
        raise DatasetError(f"{split}: label {labels.max()} is out of range in {data_dir}")
    return images, labels


def _select(labels: np.ndarray, per_class: int | None) -> np.ndarray:
    """Return the indices to write: all, or the first per_class of each class, in file order."""
    if per_class is None:
        return np.arange(len(labels))
    keep = [np.flatnonzero(labels == c)[:per_class] for c in range(len(FASHION_MNIST_LABELS))]
    return np.sort(np.concatenate(keep))


# ---------------------------------------------------------------------------------------------------
# Writing JPEGs
# ---------------------------------------------------------------------------------------------------


def _write_images(task: tuple[np.ndarray, list[str]]) -> int:
    """Upscale greys to IMAGE_SIZE RGB and write each as a JPEG; return how many were written."""
    images, paths = task
    for pixels, path in zip(images, paths):
        grey = Image.fromarray(pixels, mode="L").resize(
            (IMAGE_SIZE, IMAGE_SIZE), resample=Image.Resampling.BILINEAR
        )
        # Write then rename, so an interrupted build never leaves a truncated JPEG that a re-run
        # would take as done.
        tmp = f"{path}.tmp"
        grey.convert("RGB").save(tmp, "JPEG", quality=JPEG_QUALITY)
        os.replace(tmp, path)
    return len(paths)


def _tasks(
    images: np.ndarray, labels: np.ndarray, indices: np.ndarray, split_dir: Path
) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Yield chunks of (images, output paths), leaving out images already on disk."""
    todo: list[int] = []
    paths: list[str] = []
    for i in indices.tolist():
        path = str(split_dir / FASHION_MNIST_LABELS[labels[i]] / f"{i}.jpg")
        if os.path.exists(path):
            continue
        todo.append(i)
        paths.append(path)
    for start in range(0, len(todo), CHUNK):
        chunk = todo[start : start + CHUNK]
        yield images[chunk], paths[start : start + CHUNK]


def build_fashion_mnist(
    output: str | Path,
    per_class: int | None = None,
    splits: Sequence[str] = SPLITS,
    source: Path | None = None,
    workers: int | None = None,
) -> dict[str, int]:
    """Write Fashion-MNIST as <output>/<split>/<label>/<index>.jpg and return the image count per split.

    source is a folder holding the idx .gz files, a tree they are installed under (such as an
    extracted .deb), or the dataset-fashion-mnist .deb; when None, /usr/share/datasets/fashion-mnist
    is used if present, else the .deb is fetched with `apt-get download`. Images already in output
    are kept, so a re-run after an interruption only writes what is missing. <index> is the image's
    position in Debian's idx file, so the same image always gets the same name.
    """
    if per_class is not None and per_class < 1:
        raise DatasetError(f"per_class must be at least 1, not {per_class}")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise DatasetError(f"splits must be some of {', '.join(SPLITS)}, not {', '.join(splits) or 'none'}")
    workers = workers or os.cpu_count() or 1
    output = Path(output)
    started = time.monotonic()
    counts: dict[str, int] = {}

    with _fashion_mnist_source(source) as found:
        output.mkdir(parents=True, exist_ok=True)
        if found.copyright is not None:
            shutil.copyfile(found.copyright, output / NOTICE_NAME)
        else:
            log.warning("no %s copyright file found beside %s to copy", FASHION_MNIST_PACKAGE, found.data_dir)
        for split in dict.fromkeys(splits):
            images, labels = _read_split(found.data_dir, split)
            indices = _select(labels, per_class)
            split_dir = output / split
            for name in FASHION_MNIST_LABELS:
                (split_dir / name).mkdir(parents=True, exist_ok=True)
            tasks = list(_tasks(images, labels, indices, split_dir))
            todo = sum(len(paths) for _, paths in tasks)
            log.info("%s: %d images, %d to write", split, len(indices), todo)
            _run_tasks(tasks, workers, split)
            counts[split] = len(indices)

    log.info("wrote Fashion-MNIST %s into %s in %.1f s", counts, output, time.monotonic() - started)
    return counts


def _run_tasks(tasks: list[tuple[np.ndarray, list[str]]], workers: int, split: str) -> None:
    """Run the write tasks in a process pool, or inline when one worker or one task is enough."""
    total = sum(len(paths) for _, paths in tasks)
    if workers == 1 or len(tasks) <= 1:
        for task in tasks:
            _write_images(task)
        return
    done = 0
    last_report = time.monotonic()
    # Writing is CPU-bound (resize + JPEG encode) and holds the GIL, hence processes, not threads.
    with multiprocessing.get_context().Pool(min(workers, len(tasks))) as pool:
        for written in pool.imap_unordered(_write_images, tasks):
            done += written
            if time.monotonic() - last_report >= PROGRESS_EVERY_S:
                log.info("%s: %d / %d images written", split, done, total)
                last_report = time.monotonic()
