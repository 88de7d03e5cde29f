"""int8 against FP32 on the user's own images: the cosine between each image's features in the two
precisions, and the kNN accuracy of the label in each (`m9 precision compare`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from m9.config import DEFAULT_BATCH_SIZE, DEFAULT_NEIGHBORS, IMAGE_EXTENSIONS
from m9.errors import InputError

#: Images compared by default: enough for a 1st percentile from ~20 images below it, in about half a minute
#: on 2 cores (both precisions, one process).
DEFAULT_LIMIT = 2000


def _from_parquet(folder: str, limit: int) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    from m9.io import storage

    fs, path = storage.filesystem(folder)
    table = pq.read_table(path, filesystem=fs, columns=["image_id", "label", "split", "content"])
    frame = table.to_pandas().sort_values("image_id").head(limit)
    return list(frame["content"]), frame["label"].to_numpy(object), frame["split"].to_numpy(object)


def _from_folder(folder: Path, limit: int) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """Image files under folder: label = the parent folder's name, split = Training/Test if an ancestor is so named."""
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)[
        :limit
    ]
    labels = np.array([f.parent.name if f.parent != folder else None for f in files], dtype=object)
    parts = [f.relative_to(folder).parts for f in files]
    splits = np.array([next((p for p in ps if p in ("Training", "Test")), None) for ps in parts], dtype=object)
    return [f.read_bytes() for f in files], labels, splits


def read_images(src: str, limit: int = DEFAULT_LIMIT) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """(contents, labels, splits) of the first `limit` images (by image id) of an `m9 ingest` output, of the
    ingested images behind an `m9 embed` output, or of a folder of image files."""
    from m9.io import storage
    from m9.stages import lifecycle

    src = storage.normalize(src)
    manifest = lifecycle.read_manifest(src)
    if manifest and manifest.stage == "embed":
        src = manifest.input
    if storage.list_files(src, ".parquet"):
        return _from_parquet(src, limit)
    if Path(src).is_dir():
        out = _from_folder(Path(src), limit)
        if out[0]:
            return out
    raise InputError(f"{src} holds no images: pass an `m9 ingest` or `m9 embed` output, or a folder of images")


def features(
    model_bytes: bytes, contents: list[bytes], batch_size: int = DEFAULT_BATCH_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """(features of the images that decode, their indices), forwarded with m9's decode and session options."""
    from m9.model import ort
    from m9.model.decode import decode_many

    sess = ort.session(model_bytes)
    out: list[np.ndarray] = []
    kept: list[int] = []
    for start in range(0, len(contents), batch_size):
        inputs, errors = decode_many(contents[start : start + batch_size])
        kept.extend(start + i for i, e in enumerate(errors) if e is None)
        if len(inputs):
            out.append(ort.run(sess, inputs))
    return (np.concatenate(out) if out else np.zeros((0, 1280), np.float32)), np.array(kept, dtype=int)


def knn(x: np.ndarray, labels: np.ndarray, splits: np.ndarray, neighbors: int) -> tuple[str, float] | None:
    """(protocol, accuracy) of `m9 evaluate`'s kNN classifier on x, or None without 2+ labels."""
    from m9.stages.evaluate import _protocol, knn_predict

    has = np.array([lbl is not None for lbl in labels])
    if len(set(labels[has])) < 2:
        return None
    x, labels, splits = x[has], labels[has].astype(str), splits[has]
    try:
        protocol, folds = _protocol(splits, labels)
    except InputError:
        return None
    true, pred = knn_predict(x, labels, folds, neighbors)
    return protocol, float(np.mean(true == pred))


def compare(
    src: str, *, limit: int = DEFAULT_LIMIT, neighbors: int = DEFAULT_NEIGHBORS, cache: Path | None = None
) -> dict:
    """int8 against FP32 on the images of src (read_images): cosine distribution and kNN accuracy of each."""
    from m9.model import quantize
    from m9.model.spec import resolve_model

    if limit < 1:
        raise InputError("--limit must be at least 1")
    contents, labels, splits = read_images(src, limit)
    fp32, int8 = resolve_model(precision="fp32", cache=cache), resolve_model(precision="int8", cache=cache)
    a, kept = features(fp32.data, contents)
    b, _ = features(int8.data, contents)
    if not len(kept):
        raise InputError(f"none of the {len(contents)} images of {src} decode")
    result = {
        "input": src,
        "images": len(contents),
        "rejected": len(contents) - len(kept),
        "fp32_sha256": fp32.sha256,
        "int8_sha256": int8.sha256,
        **quantize.cosine_summary(quantize.cosines(a, b)),
        "bar": {"cosine_mean": quantize.MIN_COSINE_MEAN, "cosine_p1": quantize.MIN_COSINE_P1},
    }
    result["at_bar"] = not quantize.below_bar({"input": result})
    for name, x in (("fp32", a), ("int8", b)):
        scored = knn(x, labels[kept], splits[kept], neighbors)
        if scored:
            result["knn_protocol"], result[f"knn{neighbors}_{name}"] = scored
    return result
