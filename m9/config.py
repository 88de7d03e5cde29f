"""Frozen per-stage configuration with named defaults, each with the reason for its value."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: Where `m9` writes when no output is given: a folder in the working directory, easy to find and delete.
DEFAULT_WORKDIR = "m9-out"

#: About 1,000 images per Parquet file: a few MB of JPEG bytes, big enough that per-file overhead is
#: negligible, small enough that a 2-actor machine still gets several blocks to share, and the unit of resume.
DEFAULT_IMAGES_PER_FILE = 1000

#: Extensions the ingest admits by default (any case; `--extensions` changes them); everything else in the
#: tree is ignored and counted as ignored. Every format Pillow decodes to what the model needs: camera and
#: web formats (WebP is what img2dataset writes and GNOME ships its wallpapers as), scans (TIFF), BMP, GIF
#: (its first frame).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "gif")

#: Bytes of images per Parquet file at most (beside --images-per-file, whichever gives more files): a file
#: is embed's unit of resume and of Spark's write tasks; 128 MB keeps 12-MP photos (~1 MB each) in files
#: Spark writes without spilling, where 1,000 of them made 1 GB files.
DEFAULT_BYTES_PER_FILE = 128 * 2**20

#: MobileNetV2's ImageNet input size; the weights were trained at this resolution.
IMAGE_SIZE = 224

#: Width of MobileNetV2's pooled feature vector (the last 1×1 conv has 1280 channels).
FEATURE_DIM = 1280

#: Actors in the embed pool: one per core keeps every core busy without oversubscribing them.
DEFAULT_ACTORS = max(1, os.cpu_count() or 1)

#: Images per forward pass. `m9 bench`'s ceiling search on a 2-core EPYC, ONNX Runtime, 2 processes ×
#: 1 thread: batch 8 → 422, 16 → 382, 32 → 335, 64 → 326 images/s (Keras: 8 → 76.9, 16 → 76.5, 32 → 62.6);
#: past 8 a batch's activations fall out of cache. On a 2-core Xeon (AVX-512, AMX) the best was also
#: 2 × 1, batch 8. `m9 bench`'s knobs check re-measures it against the best on the machine that runs it.
DEFAULT_BATCH_SIZE = 8

#: Runtimes that can run the forward pass. "onnx": ONNX Runtime on the ONNX conversion of the verified
#: weights (checked equal to Keras within 1e-4 when converted); "keras": TensorFlow/Keras, the reference.
RUNTIMES = ("onnx", "keras")

#: ONNX Runtime: the same features (max abs diff 2.5e-5 on the check inputs, 4.7e-5 on the bundled sample) at
#: 1.5x Keras's images per CPU-second on a 2-core EPYC, a tenth of its start-up and a quarter of its memory per
#: actor, without TensorFlow in the actors (README, Runtimes).
DEFAULT_RUNTIME = "onnx"

#: Number formats the model can run in, the default first. "fp32": the weights as trained, on every
#: runtime (the features every runtime agrees on within 1e-4). "int8": the FP32 ONNX model statically
#: quantised (m9.model.quantize; onnx runtime only), kept only if its features are within cosine 0.98 (mean)
#: and 0.95 (1st percentile) of FP32's on its check sets (docs/model.md gives quality and speed).
PRECISIONS = ("fp32", "int8")

#: Components kept by `m9 reduce`: the seed's choice. It keeps 83.7 % of the variance on the bundled sample
#: (240 images) and 67.3 % on 10,000 Fashion-MNIST images, not 90 %; variance.json names the smallest k that
#: reaches each of VARIANCE_THRESHOLDS, so a run says what k a threshold would need.
DEFAULT_K = 50

#: What `m9 reduce` does with the basis (mean and components) already in its output when its input
#: changed, the default first. "refit": fit PCA on the new input (the components follow the data). "keep":
#: project the new input onto the stored basis, so the coordinates of images that did not change stay
#: exactly where they were (a basis fitted once, the way faiss trains an index once and adds to it).
BASES = ("refit", "keep")

#: Neighbours that vote in `m9 evaluate`'s kNN classifier: 5 is scikit-learn's default and the usual first
#: look (with 5 votes two labels can still tie 2-2; the first label in sorted order wins, as in scikit-learn).
DEFAULT_NEIGHBORS = 5

#: Variance thresholds for which variance.json reports the smallest k that reaches them.
VARIANCE_THRESHOLDS = (0.90, 0.95, 0.99)

#: Version of the decode → preprocess step (m9.model.decode). Part of embed's fingerprint: bump it whenever
#: any image's model input changes, so finished embed outputs made the old way are reported stale.
#: 1: full decode, bilinear resize. 2: decode to size (JPEG DCT scaling, Image.reduce) when the short side
#: is >= 896 px; smaller images are unchanged.
PREPROCESS_VERSION = 2

#: MB one image's decode may take (m9.model.decode.decode_bytes estimates it from the header); an image above it
#: is rejected before any pixel is decoded. 2 GiB embeds a 13,000×13,000 RGBA drawing (1.35 GB: the decoded
#: pixels and the premultiplied copy Image.reduce makes) and a 16,383² WebP, and rejects a 30,000² PNG
#: (3.6 GB) or a 60,000² JPEG header (14.4 GB) at once; 2 actors × 2 GiB stay far below a 16 GB EMR node.
DEFAULT_DECODE_MEMORY = 2048  # MB

#: The share of the variance `--k auto` aims for when no share is given: the middle of the thresholds above,
#: the usual choice for a PCA meant to keep the data's structure while dropping most dimensions.
AUTO_VARIANCE_TARGET = 0.95


def parse_k(text: str) -> tuple[int | None, float | None]:
    """`--k` as a number of components (`50` → (50, None)) or a share of the variance to reach
    (`auto:0.95` → (None, 0.95); `auto` alone means AUTO_VARIANCE_TARGET)."""
    text = text.strip().lower()
    if text == "auto":
        return None, AUTO_VARIANCE_TARGET
    if text.startswith("auto:"):
        try:
            target = float(text[5:])
        except ValueError:
            target = -1.0
        if not 0 < target <= 1:
            raise ValueError(f"--k {text}: the share after auto: must be above 0 and at most 1, e.g. auto:0.95")
        return None, target
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise ValueError(f"--k {text}: expected a number of components like 50, or auto:0.95")
    return k, None


def parse_max_errors(text: str) -> int | float:
    """`--max-errors` as a count of images (`10`) or a fraction of the images (`0.05`, at most 1)."""
    fraction = any(c in text for c in ".eE")
    try:
        value = float(text) if fraction else int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= (1 if fraction else float("inf")):
        raise ValueError(f"--max-errors {text}: expected a count like 10 or a fraction like 0.05")
    return value


def cache_dir() -> Path:
    """m9's cache folder (weights, jars): $M9_CACHE_DIR, else $XDG_CACHE_HOME/m9, else ~/.cache/m9."""
    if os.environ.get("M9_CACHE_DIR"):
        return Path(os.environ["M9_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "m9"


@dataclass(frozen=True, kw_only=True)
class IngestConfig:
    """What `m9 ingest` reads and writes."""

    input: str
    output: str
    images_per_file: int = DEFAULT_IMAGES_PER_FILE
    overwrite: bool = False
    #: Image bytes per Parquet file at most (how rows are split into files; the rows are the same).
    bytes_per_file: int = DEFAULT_BYTES_PER_FILE
    #: Extensions taken (lower case, no dot); other files are counted as ignored (changes the output).
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """What `m9 embed` reads, writes and how it distributes the model."""

    input: str
    output: str
    actors: int = DEFAULT_ACTORS
    batch_size: int = DEFAULT_BATCH_SIZE
    ray_address: str | None = None
    weights: str | None = None
    overwrite: bool = False
    #: Rejected images tolerated before the run fails (after writing everything): a count (int) or a
    #: fraction of the images (float); None tolerates any number.
    max_errors: int | float | None = None
    #: Which runtime runs the forward pass (RUNTIMES); features agree within 1e-4 on photographs.
    runtime: str = DEFAULT_RUNTIME
    #: The number format the model runs in (PRECISIONS); part of the model's identity.
    precision: str = PRECISIONS[0]
    #: MB one image's decode may take; a larger image is rejected with a reason (changes the output).
    decode_memory_mb: int = DEFAULT_DECODE_MEMORY
    #: Feature store (m9.store) asked before the model runs and given what it computes: "auto" (m9.stages.reuse),
    #: a folder or s3:// URI, or "none". Not part of the output (the features are the same either way).
    store: str = "auto"


@dataclass(frozen=True, kw_only=True)
class ReduceConfig:
    """What `m9 reduce` reads and writes, and how many components it keeps."""

    input: str
    output: str
    #: Components to keep; None with variance_target set: as many as reach that share of the variance.
    k: int | None = DEFAULT_K
    overwrite: bool = False
    #: `--k auto:T`: keep the smallest k whose components explain at least T of the variance, chosen
    #: from one PCA fit with as many components as the data allows. Only used when k is None.
    variance_target: float | None = None
    #: BASES: refit PCA on a changed input, or keep the basis the output holds and project onto it.
    basis: str = BASES[0]


#: Cosine similarity of the features at or above which `m9 duplicates` calls two images near duplicates.
#: Measured on planted copies (resized to half, JPEG quality 30, 5 % cropped off each side, brightness ±15 %)
#: of 2,253 real images (Fashion-MNIST, photographs, the sample): docs/neighbors.md gives precision and
#: recall per threshold.
DEFAULT_THRESHOLD = 0.92

#: Index kinds `m9 index` builds: auto (exact up to m9.neighbors.index.EXACT_MAX vectors, else IVF), exact, ivf.
INDEX_KINDS = ("auto", "exact", "ivf")

#: Neighbours `m9 search` prints: a screenful, and what recall@10 is measured at.
DEFAULT_TOP = 10
