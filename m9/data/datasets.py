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
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from m9.errors import M9Error
from m9.io import storage

log = logging.getLogger(__name__)

__all__ = ["FASHION_MNIST_LABELS", "FRUITS360_URL", "SPLITS", "DatasetError", "build_fashion_mnist", "build_fruits360"]

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
        grey = Image.fromarray(pixels, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), resample=Image.Resampling.BILINEAR)
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


# ---------------------------------------------------------------------------------------------------
# Fruits-360
# ---------------------------------------------------------------------------------------------------

#: The public Fruits-360 repository (Horea94/Fruit-Images-Dataset, CC BY-SA 4.0) as one zip, with
#: Training/ and Test/ at its top. Downloading it needs internet.
FRUITS360_URL = "https://github.com/Horea94/Fruit-Images-Dataset/archive/refs/heads/master.zip"
FRUITS360_SUFFIXES = (".jpg", ".jpeg", ".png")
FRUITS360_LICENSE_NAME = "LICENSE-fruits-360.txt"
#: Parallel writes. An S3 PUT of a ~5 KB image is all latency (tens of ms), so throughput comes from
#: concurrency; 16 is far below S3's 3,500 PUT/s per prefix and pyarrow's connection pool.
FRUITS360_WRITERS = 16
#: Images read ahead per writer: enough to keep the writers busy, while memory stays a few MB.
_READ_AHEAD_PER_WRITER = 4
DOWNLOAD_TIMEOUT_S = 60  # Per socket operation, not for the whole download.


@contextmanager
def _archive_file(archive: str) -> Iterator[Path]:
    """Yield a local path of the archive, downloading an http(s) URL to a temporary file first."""
    scheme = urlparse(archive).scheme
    if scheme in ("http", "https"):
        with tempfile.TemporaryDirectory(prefix="m9-fruits360-") as tmp:
            path = Path(tmp) / "archive.zip"
            log.info("downloading %s", archive)
            try:
                with urllib.request.urlopen(archive, timeout=DOWNLOAD_TIMEOUT_S) as response, open(path, "wb") as f:
                    shutil.copyfileobj(response, f, length=1 << 20)
            except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors
                raise DatasetError(
                    f"cannot download {archive}: {e}; this needs internet access, or pass a downloaded copy "
                    "with --archive PATH"
                ) from e
            yield path
        return
    if "://" in archive:
        raise DatasetError(f"archive must be an http(s) URL or a local .zip file, not {archive}")
    path = Path(archive).expanduser()
    if not path.is_file():
        raise DatasetError(f"archive {archive} does not exist")
    yield path


def _fruits360_root(names: Sequence[str], archive: str) -> str:
    """The zip prefix ('' or 'a/b/') of the folder holding Training/<label>/<image> and Test/<label>/<image>."""
    splits_under: dict[str, set[str]] = {}
    for name in names:
        parts = name.split("/")
        if len(parts) >= 3 and parts[-3] in SPLITS and parts[-1]:
            splits_under.setdefault("".join(f"{p}/" for p in parts[:-3]), set()).add(parts[-3])
    roots = [root for root, splits in splits_under.items() if splits == set(SPLITS)]
    if not roots:
        raise DatasetError(
            f"{archive} holds no folder with both Training/<label>/<image> and Test/<label>/<image>; "
            "is it a Fruits-360 archive?"
        )
    # Kaggle's archive also carries the original-size photos; the 100×100 set is the one m9 expects.
    roots.sort(key=lambda r: ("100x100" not in r, r.count("/"), r))
    if len(roots) > 1:
        log.info("archive has %d Fruits-360 folders (%s); using %s", len(roots), ", ".join(roots), roots[0])
    return roots[0]


def _fruits360_members(infos: Sequence[zipfile.ZipInfo], root: str) -> list[tuple[zipfile.ZipInfo, str]]:
    """(entry, output path 'split/label/name') of each image under root; paths are rebuilt from checked
    parts, so an entry can never write outside the output folder."""
    members = []
    for info in infos:
        if info.is_dir() or not info.filename.startswith(root):
            continue
        parts = info.filename[len(root) :].split("/")
        if len(parts) != 3 or parts[0] not in SPLITS:
            continue
        _, label, name = parts
        if not label or label.startswith((".", "_")) or name.startswith((".", "_")):
            continue
        if name.lower().endswith(FRUITS360_SUFFIXES):
            members.append((info, "/".join(parts)))
    return members


def _existing_sizes(output: str) -> dict[str, int]:
    """Size of every file already under output, by path relative to it (for resuming)."""
    fs, path = storage.filesystem(output)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as e:
        raise DatasetError(f"cannot list {output}: {e}") from e
    return {i.path[len(path) :].lstrip("/"): i.size for i in infos if i.type == pafs.FileType.File}


def _put(uri: str, data: bytes) -> None:
    try:
        storage.write_bytes_atomic(uri, data)
    except OSError as e:
        raise DatasetError(f"cannot write {uri}: {e}") from e


def _write_members(zf: zipfile.ZipFile, todo: Sequence[tuple[zipfile.ZipInfo, str]], output: str, workers: int) -> None:
    """Decompress in this thread (ZipFile reads share one file handle) and write on a bounded thread pool."""
    done, last_report = 0, time.monotonic()
    pending: set[Future] = set()

    def settle(futures: set[Future]) -> None:
        nonlocal done, last_report
        for future in futures:
            future.result()
            done += 1
        if time.monotonic() - last_report >= PROGRESS_EVERY_S:
            log.info("fruits-360: %d / %d images written", done, len(todo))
            last_report = time.monotonic()

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="m9-fruits360") as pool:
        for info, rel in todo:
            if len(pending) >= workers * _READ_AHEAD_PER_WRITER:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                settle(finished)
            try:
                data = zf.read(info)
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise DatasetError(f"cannot read {info.filename} from the archive: {e}") from e
            pending.add(pool.submit(_put, storage.join(output, rel), data))
        settle(wait(pending).done)


def build_fruits360(
    archive: str = FRUITS360_URL, output: str = "data/fruits-360", workers: int = FRUITS360_WRITERS
) -> dict[str, int]:
    """Unpack a Fruits-360 zip into <output>/<split>/<label>/<image> and return the image count per split.

    archive is an http(s) URL (downloaded to a temporary file; needs internet) or a local .zip. Inside
    it, the folder holding Training/ and Test/ is found wherever it sits (fruits-360/, or
    fruits-360_dataset_100x100/fruits-360/ in newer archives); only the images below those two are
    written, to a local folder or an s3:// prefix. Images already in output with the same size are
    kept, so a re-run after an interruption only writes what is missing.
    """
    if workers < 1:
        raise DatasetError(f"workers must be at least 1, not {workers}")
    output = storage.normalize(output)
    started = time.monotonic()
    storage.check_access(write=output)  # a missing bucket or refused credentials fail before the download
    with _archive_file(str(archive)) as path:
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise DatasetError(f"{archive} is not a readable zip archive: {e}") from e
        with zf:
            names = zf.namelist()
            root = _fruits360_root(names, str(archive))
            members = _fruits360_members(zf.infolist(), root)
            existing = _existing_sizes(output)
            todo = [(info, rel) for info, rel in members if existing.get(rel) != info.file_size]
            log.info("fruits-360: %d images under %s, %d to write", len(members), root or "the top", len(todo))
            storage.makedirs(output)
            _write_members(zf, todo, output, workers)
            license_name = f"{root}LICENSE"
            if license_name in names:
                _put(storage.join(output, FRUITS360_LICENSE_NAME), zf.read(license_name))
    counts = Counter(rel.split("/", 1)[0] for _, rel in members)
    result = {split: counts.get(split, 0) for split in SPLITS}
    log.info("wrote Fruits-360 %s into %s in %.1f s", result, output, time.monotonic() - started)
    return result
