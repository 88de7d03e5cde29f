"""Evaluate: are the features any good? k-nearest-neighbour classification of the label in the PCA space,
the full feature space and raw pixels of the same images."""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from m9.config import DEFAULT_DECODE_MEMORY, DEFAULT_NEIGHBORS
from m9.errors import InputError
from m9.io import lease, storage
from m9.stages import contract, lifecycle
from m9.stages.contract import EVALUATE
from m9.stages.lifecycle import Manifest

log = logging.getLogger(__name__)

#: Side of the raw-pixel baseline's grey images: Fashion-MNIST's own 28x28, small enough that kNN on
#: 784 numbers stays quick, large enough to keep a shape's outline.
RAW_SIDE = 28

#: Pillow's default (bicubic) resampling for the baseline. On 2,000 Fashion-MNIST images (5-NN, Training →
#: Test) it scores 0.790 from the image as embed's budgeted decode leaves it (bilinear 0.786, box 0.785,
#: nearest 0.775), and 0.789 from embed's 224x224 RGB input, for four times the CPU (AMD EPYC, 2 cores,
#: 2026-12-03 and -04).
RAW_RESAMPLE = "BICUBIC"

#: Images each baseline decoding task takes: one task per image cost as much as decoding a thumbnail.
GREY_CHUNK = 256

#: Folds when the images have no Training/Test split: 5 is the usual choice (each image is scored once,
#: by a model trained on the other 80 %); fewer when the rarest label has fewer images.
FOLDS = 5

#: Label pairs listed as most confused.
TOP_CONFUSED = 10


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """What `m9 evaluate` reads (a reduce or embed output), writes, and how many neighbours vote."""

    input: str
    output: str
    neighbors: int = DEFAULT_NEIGHBORS
    #: The raw-pixel baseline decodes within this budget (m9.model.decode), as embed does.
    decode_memory_mb: int = DEFAULT_DECODE_MEMORY
    overwrite: bool = False


def _read(folder: str, columns: list[str]):
    fs, path = storage.filesystem(folder)
    return pq.read_table(path, filesystem=fs, columns=columns).to_pandas()


def locate(src: str) -> dict[str, str | None]:
    """The reduce, embed and ingest outputs behind src (a reduce or an embed output), following each
    manifest's input; reduce is None for an embed output, ingest None when its output is gone."""
    manifest = lifecycle.read_manifest(src)
    if manifest is None or manifest.stage not in (contract.REDUCE.name, contract.EMBED.name):
        raise InputError(f"{src} is not the finished output of `m9 reduce` or `m9 embed`; pass one of those folders")
    chain = lifecycle.upstream(src)
    if contract.EMBED.name not in chain:
        raise InputError(
            f"{src} is `m9 reduce`'s output of {manifest.input}, which holds no finished `m9 embed` output "
            f"(moved or removed?); run `m9 run` (or `m9 embed`) again"
        )
    ingest = chain.get(contract.INGEST.name)
    return {
        contract.REDUCE.name: chain.get(contract.REDUCE.name),
        contract.EMBED.name: chain[contract.EMBED.name],
        contract.INGEST.name: ingest if ingest and storage.exists(ingest) else None,
    }


def _embed_of(folders: dict[str, str | None]) -> str:
    """The embed output among locate()'s folders: always there, as locate refuses a chain without one."""
    embed = folders[contract.EMBED.name]
    assert embed is not None
    return embed


def grey_pixels(contents, side: int = RAW_SIDE, memory_mb: int = DEFAULT_DECODE_MEMORY) -> np.ndarray:
    """Each image's bytes as a grey side x side image, flattened, in [0, 1]; a row of NaN for bytes that do
    not decode within memory_mb (m9.model.decode's budgeted decode, the same as embed's)."""
    from PIL import Image

    from m9.model.decode import DecodeError, decode_grey

    resample = Image.Resampling[RAW_RESAMPLE]

    def some(chunk) -> list[np.ndarray]:
        out = []
        for content in chunk:
            try:  # EXIF applied, alpha on white, decoded to size within the budget, as embed decodes
                out.append(decode_grey(content, side, resample, memory_mb).astype(np.float32).ravel() / 255.0)
            except DecodeError:
                out.append(np.full(side * side, np.nan, np.float32))
        return out

    if not len(contents):
        return np.zeros((0, side * side))
    chunks = [contents[i : i + GREY_CHUNK] for i in range(0, len(contents), GREY_CHUNK)]
    with ThreadPoolExecutor() as pool:  # Pillow releases the GIL while it decodes
        return np.stack([row for rows in pool.map(some, chunks) for row in rows])


def _protocol(splits: np.ndarray, labels: np.ndarray) -> tuple[str, list[tuple[np.ndarray, np.ndarray]]]:
    """(description, [(train indices, test indices)]): Training → Test when both exist, else stratified folds."""
    train, test = np.flatnonzero(splits == "Training"), np.flatnonzero(splits == "Test")
    if len(train) and len(test):
        return "trained on Training, scored on Test", [(train, test)]
    from sklearn.model_selection import StratifiedKFold

    rarest = min(Counter(labels).values())
    folds = min(FOLDS, rarest)
    if folds < 2:
        raise InputError("evaluate needs at least 2 images of every label when the images have no Training/Test split")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0)
    return f"{folds}-fold stratified cross-validation (no Training/Test split)", list(
        splitter.split(np.zeros(len(labels)), labels)
    )


def knn_predict(x: np.ndarray, labels: np.ndarray, folds, neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, predicted labels) of every scored image: each fold's test images vote among their
    `neighbors` nearest training images (euclidean, exact search in faiss, float32), a tie going to the label
    first in sorted order, as scikit-learn's KNeighborsClassifier breaks it. For 10,000 test images against
    60,000 training ones (2026-12-04, AMD EPYC, 2 cores), 1280-d: 8.0 s where KNeighborsClassifier took 15.8 s;
    784-d: 5.2 against 11.4 s; 50-d: 0.7 against 1.3 s; the same predictions in each, and on 4,150 real
    Fashion-MNIST features."""
    import faiss

    classes, codes = np.unique(labels, return_inverse=True)
    true, pred = [], []
    for train, test in folds:
        k = min(neighbors, len(train))
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(np.ascontiguousarray(x[train], np.float32))
        _, nearest = index.search(np.ascontiguousarray(x[test], np.float32), k)
        votes = codes[train][nearest]  # (test images, k) label codes
        tally = np.zeros((len(test), len(classes)), np.int32)
        np.add.at(tally, (np.arange(len(test))[:, None], votes), 1)
        true.append(labels[test])
        pred.append(classes[tally.argmax(axis=1)])  # argmax: the first (smallest) label among the most voted
    return np.concatenate(true), np.concatenate(pred)


def scores(true: np.ndarray, pred: np.ndarray, names: list[str]) -> dict:
    """Accuracy, recall per label, the confusion matrix (rows: true, columns: predicted, in `names` order)
    and the most confused label pairs."""
    from sklearn.metrics import confusion_matrix, recall_score

    matrix = confusion_matrix(true, pred, labels=names)
    recall = recall_score(true, pred, labels=names, average=None, zero_division=0)
    pairs: list[dict[str, Any]] = [
        {"true": names[i], "predicted": names[j], "count": int(matrix[i, j])}
        for i in range(len(names))
        for j in range(len(names))
        if i != j and matrix[i, j]
    ]
    pairs.sort(key=lambda p: (-p["count"], p["true"], p["predicted"]))
    return {
        "accuracy": float(np.mean(true == pred)),
        "recall": {name: float(r) for name, r in zip(names, recall) if (true == name).any()},
        "most_confused": pairs[:TOP_CONFUSED],
        "confusion": matrix.tolist(),
    }


def _within(folds, keep: np.ndarray | None):
    """The folds with only the images keep marks (all of them when keep is None)."""
    return folds if keep is None else [(train[keep[train]], test[keep[test]]) for train, test in folds]


def _without_leaked(found: str | None, frame, folds, scored_rows: dict[str, np.ndarray], hits: dict[str, np.ndarray]):
    """The accuracy with the leaked Test images (in a duplicate group with a Training image, per the
    workdir's `m9 duplicates` output `found`) left out; None without such an output or a Training/Test split.
    The other Test images keep their predictions (hits: right or wrong, per space, for scored_rows): a
    prediction depends only on the Training images, which stay the same."""
    from m9.neighbors import duplicates

    if found is None or len(folds) != 1:
        return None
    leaked = duplicates.leaked_test_ids(duplicates.read_output(found))
    train, test = folds[0]
    kept = test[~np.isin(frame["image_id"].to_numpy(str)[test], sorted(leaked))]
    honest: dict[str, Any] = {
        "duplicates": found,
        "leaked_test_images": len(test) - len(kept),
        "scored": len(kept),
        "accuracy": {},
    }
    if len(kept) == 0:
        return honest
    for name, rows in scored_rows.items():
        honest_hits = hits[name][np.isin(rows, kept)]
        if len(honest_hits):
            honest["accuracy"][name] = float(np.mean(honest_hits))
    return honest


def model_name(embed_details: dict) -> str | None:
    """`onnx int8`: the runtime and precision an embed manifest's details record (None if they record none)."""
    if not embed_details.get("runtime"):
        return None
    return f"{embed_details['runtime']} {embed_details.get('precision', 'fp32')}"


def _inputs(src: str) -> tuple[dict[str, str | None], str | None, str]:
    """(the outputs evaluate reads, the duplicates output beside the embed output, their identity)."""
    from m9.neighbors import duplicates

    folders = locate(src)
    found = duplicates.for_embed(_embed_of(folders))
    identity = lifecycle.input_identity(src)
    return folders, found, identity + (f"+{lifecycle.input_identity(found)}" if found else "")


def result(output: str) -> dict | None:
    """What a finished `m9 evaluate` wrote into output (its evaluate.json), or None."""
    return storage.read_json(storage.join(output, contract.EVALUATE_NAME))


def evaluate(cfg: EvaluateConfig) -> Manifest:
    """kNN accuracy of the label in each space; writes evaluate.json under cfg.output (read it with
    result()) and its manifest. A finished output of the same inputs and settings is reused."""
    src, out = storage.normalize(cfg.input), storage.normalize(cfg.output)
    if cfg.neighbors < 1:
        raise InputError("--neighbors must be at least 1")
    storage.check_access(read=src, write=out)
    lifecycle.check_not_a_file(out)
    folders, found, identity = _inputs(src)
    embeddings = storage.join(_embed_of(folders), contract.EMBEDDINGS)
    counts = Counter(_read(embeddings, ["label"])["label"].dropna())
    if len(counts) < 2:
        raise InputError(f"evaluate needs images of at least 2 labels (folders); {src} has {len(counts)}")
    print_ = lifecycle.fingerprint(EVALUATE, cfg, identity)
    with lease.hold(out, EVALUATE.name):
        done = lifecycle.prepare(EVALUATE, out, print_, cfg.overwrite)
        if done is not None:
            log.info("evaluate: %s already holds this input's evaluation; skipping", out)
            return done
        started = time.perf_counter()
        scored = _score(cfg, src, folders, found)
        storage.makedirs(out)
        storage.write_json(storage.join(out, contract.EVALUATE_NAME), scored)
        details = {k: scored[k] for k in ("neighbors", "protocol", "accuracy", "dims")}
        details["wall_s"] = round(time.perf_counter() - started, 2)
        manifest = Manifest(
            stage=EVALUATE.name,
            input=src,
            fingerprint=print_,
            counts={**scored["counts"], "raw_left_out": scored["raw_left_out"]},
            details=details,
        )
        return lifecycle.write_manifest(out, manifest)


def _score(cfg: EvaluateConfig, src: str, folders: dict[str, str | None], found: str | None) -> dict:
    embed_dir, reduce_dir, images_dir = _embed_of(folders), folders[contract.REDUCE.name], folders[contract.INGEST.name]
    frame = _read(storage.join(embed_dir, contract.EMBEDDINGS), ["image_id", "label", "split", "features"])
    frame = frame[frame["label"].notna()].sort_values("image_id").reset_index(drop=True)
    labels = frame["label"].to_numpy(str)
    counts = Counter(labels)
    spaces = {contract.FULL_SPACE: np.stack(frame["features"].to_numpy()).astype(np.float32)}
    kept_rows: dict[str, np.ndarray] = {}  # space → the images it has (all when absent)
    if reduce_dir:
        column = contract.PCA_COLUMN
        pca = _read(storage.join(reduce_dir, contract.PCA_DIR), ["image_id", column]).set_index("image_id")
        spaces[contract.PCA_SPACE] = np.stack(pca.loc[frame["image_id"], column].to_numpy()).astype(np.float32)
    raw_left_out = 0
    if images_dir:
        images = _read(images_dir, ["image_id", "content"]).set_index("image_id")
        raw = grey_pixels(list(images.loc[frame["image_id"], "content"]), memory_mb=cfg.decode_memory_mb)
        del images
        decoded = ~np.isnan(raw).any(axis=1)
        raw_left_out = int((~decoded).sum())
        if raw_left_out:
            log.warning("evaluate: %d images left out of the raw-pixel baseline (they do not decode)", raw_left_out)
            kept_rows[contract.RAW_SPACE] = decoded
        spaces[contract.RAW_SPACE] = np.nan_to_num(raw)
    protocol, folds = _protocol(frame["split"].to_numpy(object), labels)
    names = sorted(counts)
    embed_manifest = lifecycle.read_manifest(embed_dir)
    scored: dict[str, Any] = {
        "input": src,
        # The model whose features are scored, as embed's manifest records it ("onnx fp32", "onnx int8").
        "model": model_name(embed_manifest.details if embed_manifest else {}),
        "neighbors": cfg.neighbors,
        "protocol": protocol,
        "metric": "euclidean",
        "labels": names,
        "counts": {
            "images": len(frame),
            "labels": len(names),
            "train": int(sum(len(tr) for tr, _ in folds)) if len(folds) == 1 else len(frame),
            "scored": int(sum(len(te) for _, te in folds)),
        },
        "raw_left_out": raw_left_out,
        "dims": {name: int(x.shape[1]) for name, x in spaces.items()},
        "accuracy": {},
        "spaces": {},
    }
    scored_rows, hits = {}, {}  # per space: the images scored, and whether each was predicted right
    for name in contract.SPACES:
        if name not in spaces:
            continue
        within = _within(folds, kept_rows.get(name))
        true, pred = knn_predict(spaces[name], labels, within, cfg.neighbors)
        scored_rows[name], hits[name] = np.concatenate([test for _, test in within]), true == pred
        scored["spaces"][name] = scores(true, pred, names)
        scored["accuracy"][name] = scored["spaces"][name]["accuracy"]
    honest = _without_leaked(found, frame, folds, scored_rows, hits)
    if honest:
        scored["without_leaked"] = honest
    log.info(
        "evaluate: %d-NN accuracy on %d images (%s): %s",
        cfg.neighbors,
        scored["counts"]["scored"],
        protocol,
        ", ".join(f"{n} {100 * a:.1f} %" for n, a in scored["accuracy"].items()),
    )
    return scored
