"""A nearest-neighbour index of a workdir's features (faiss), kept beside the outputs and grown in place.

Vectors are unit length, so faiss's inner product is the cosine similarity. Below EXACT_MAX vectors the
index is exact (every query against every vector); above it an inverted file (IVF: k-means cells, a query
scans the NPROBE nearest cells), chosen by measurement (docs/neighbors.md). New images are added to the
index as it is: the IVF cells are not retrained, the new vectors go into the cells they fall in.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m9 import config
from m9.config import INDEX_KINDS
from m9.errors import InputError
from m9.io import lease, storage
from m9.neighbors import features
from m9.stages import lifecycle
from m9.stages.contract import EMBEDDINGS, INDEX
from m9.stages.lifecycle import Manifest

log = logging.getLogger(__name__)

#: Up to this many vectors the index is exact (faiss IndexFlatIP). At 100,000 × 1280 one query reads
#: 512 MB of vectors: 14 ms p50 here (docs/neighbors.md); the IVF answers the same in ~2 ms at recall@10 ≥ 0.99.
EXACT_MAX = 100_000

KINDS = INDEX_KINDS

#: IVF cells per vector: the power of two nearest sqrt(n) (1,024 for a million), faiss's usual starting
#: point; training k-means on TRAIN_PER_CELL vectors per cell (faiss warns below 39).
TRAIN_PER_CELL = 40

#: Cells a query scans: on 1,000,000 vectors in 1,024 cells, 32 cells gave recall@10 0.97 against exact search
#: at 2.9 ms p50 (docs/neighbors.md); 16 gave 0.94.
DEFAULT_NPROBE = 32

DEFAULT_TOP = config.DEFAULT_TOP

#: Vectors added to faiss per call: bounded memory for the copy faiss makes, and a progress line per chunk.
ADD_CHUNK = 65_536

ROWS_SCHEMA = INDEX.writes["rows-*.parquet"]


@dataclass(frozen=True, kw_only=True)
class IndexConfig:
    """What `m9 index` reads (a workdir or an embed output), where it writes, which index it builds."""

    input: str
    output: str
    kind: str = "auto"
    overwrite: bool = False


def cells_for(n: int) -> int:
    """IVF cells for n vectors: the power of two nearest sqrt(n), at least 16 (at most n)."""
    return max(1, min(n, max(16, 2 ** round(math.log2(max(1.0, math.sqrt(n)))))))


def resolved_kind(kind: str, n: int) -> str:
    if kind not in KINDS:
        raise InputError(f"--kind {kind}: expected one of {', '.join(KINDS)}")
    if kind == "auto":
        return "exact" if n <= EXACT_MAX else "ivf"
    return kind


def new_index(kind: str, dim: int, train: np.ndarray | None = None, cells: int = 0):
    """An empty faiss index of the kind: "exact", or "ivf" with `cells` cells trained on `train`; keyed by
    int64 ids."""
    import faiss

    if kind == "exact":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, cells, faiss.METRIC_INNER_PRODUCT)
    index.cp.min_points_per_centroid = 1  # a small set may hold fewer than 39 per cell
    index.train(np.ascontiguousarray(train))
    index.nprobe = DEFAULT_NPROBE
    return index


def training_sample(x: np.ndarray, cells: int, seed: int = 0) -> np.ndarray:
    """A random sample of x large enough to train `cells` cells."""
    size = min(len(x), TRAIN_PER_CELL * cells)
    return x[np.sort(np.random.default_rng(seed).choice(len(x), size, replace=False))]


def build(x: np.ndarray, kind: str, ids: np.ndarray | None = None):
    """A faiss index of unit-length rows x (ids 0..n-1 unless given)."""
    kind = resolved_kind(kind, len(x))
    cells = cells_for(len(x))
    index = new_index(kind, x.shape[1], training_sample(x, cells) if kind == "ivf" else None, cells)
    add(index, x, np.arange(len(x), dtype=np.int64) if ids is None else ids)
    return index


def add(index, x: np.ndarray, ids: np.ndarray) -> None:
    for start in range(0, len(x), ADD_CHUNK):
        index.add_with_ids(np.ascontiguousarray(x[start : start + ADD_CHUNK]), ids[start : start + ADD_CHUNK])


def kind_of(index) -> str:
    import faiss

    return "ivf" if isinstance(faiss.downcast_index(index), faiss.IndexIVF) else "exact"


def search(index, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, ids) of each query's k nearest vectors, best first; id -1 where fewer exist."""
    import faiss

    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexIVF):
        inner.nprobe = min(inner.nlist, nprobe or DEFAULT_NPROBE)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def _files(generation: int) -> tuple[str, str]:
    return f"index-{generation}.faiss", f"rows-{generation}.parquet"


def save(out: str, index, rows: pa.Table, generation: int) -> None:
    """Write the index and its rows under new names; the manifest written after names the generation."""
    import faiss

    index_name, rows_name = _files(generation)
    buf = pa.BufferOutputStream()
    pq.write_table(rows.cast(ROWS_SCHEMA), buf, compression="snappy")
    storage.write_bytes_atomic(storage.join(out, rows_name), buf.getvalue().to_pybytes())
    storage.write_bytes_atomic(storage.join(out, index_name), faiss.serialize_index(index).tobytes())


@dataclass
class Loaded:
    """An index as kept: the faiss index, its rows (id → image_id, path, label, split), its manifest."""

    index: Any  # a faiss.Index (faiss ships no type information)
    rows: pa.Table
    manifest: Manifest

    def row_of(self, ids: np.ndarray) -> list[int]:
        lookup = getattr(self, "_lookup", None)
        if lookup is None:
            lookup = self._lookup = {int(v): i for i, v in enumerate(self.rows.column("id").to_numpy())}
        return [lookup.get(int(i), -1) for i in ids]


def load(out: str) -> Loaded:
    """The index kept in out (an `m9 index` output), or InputError."""
    import faiss

    manifest = lifecycle.read_manifest(out)
    if manifest is None or manifest.stage != INDEX.name:
        raise InputError(f"{out} holds no finished `m9 index` output; run `m9 index` first")
    index_name, rows_name = _files(int(manifest.details["generation"]))
    fs, path = storage.filesystem(storage.join(out, index_name))
    with fs.open_input_stream(path) as f:
        data = np.frombuffer(f.read(), dtype=np.uint8)
    fs, path = storage.filesystem(storage.join(out, rows_name))
    return Loaded(index=faiss.deserialize_index(data), rows=pq.read_table(path, filesystem=fs), manifest=manifest)


def fingerprint(cfg: IndexConfig, embed_dir: str) -> dict:
    """The embed output's identity and its embeddings' files (names, sizes, times): an embed output grown
    in place (new shards) is a changed input, so the index takes the new images."""
    files = lifecycle.digest(lifecycle.listing(storage.join(embed_dir, EMBEDDINGS), ".parquet"))
    return lifecycle.fingerprint(INDEX, cfg, f"{lifecycle.input_identity(embed_dir)}+{files}")


def index(cfg: IndexConfig) -> Manifest:
    """Build the index of the features under cfg.input into cfg.output, or bring an existing one up to
    date: images embedded since are added, images gone are removed, without rebuilding it."""
    folders = features.locate(cfg.input)
    out = storage.normalize(cfg.output)
    resolved_kind(cfg.kind, 0)  # a bad --kind fails before anything is read
    storage.check_access(read=folders.embed, write=out)
    lifecycle.check_not_a_file(out)
    print_ = fingerprint(cfg, folders.embed)
    with lease.hold(out, INDEX.name):
        existing = lifecycle.read_manifest(out)
        if existing is not None and existing.stage == INDEX.name and not cfg.overwrite:
            if existing.fingerprint == print_:
                log.info("index: %s is up to date; skipping", out)
                return Manifest(**{**existing.__dict__, "skipped": True})
            if existing.fingerprint.get("kind") == cfg.kind:
                return _update(cfg, folders, out, print_, existing)
        done = lifecycle.prepare(INDEX, out, print_, cfg.overwrite)
        if done is not None:
            return done
        return _build(cfg, folders, out, print_)


def _build(cfg: IndexConfig, folders: features.Folders, out: str, print_: dict) -> Manifest:
    started = time.perf_counter()
    meta, x = features.read(folders.embed)
    if len(x) == 0:
        raise InputError(f"{folders.embed} holds no embedded images to index")
    read_s = time.perf_counter() - started
    built = build(x, cfg.kind)
    rows = pa.table({"id": pa.array(np.arange(len(x), dtype=np.int64)), **{c: meta.column(c) for c in features.META}})
    save(out, built, rows, 0)
    wall = time.perf_counter() - started
    log.info("index: %d vectors, %s, built in %.1f s (%.1f s reading)", len(x), kind_of(built), wall, read_s)
    return _finish(out, folders, print_, built, rows, 0, added=len(x), removed=0, wall=wall)


def _update(cfg: IndexConfig, folders: features.Folders, out: str, print_: dict, existing: Manifest) -> Manifest:
    started = time.perf_counter()
    kept = load(out)
    have = kept.rows.column("image_id").to_pylist()
    now = set(features.read_meta(folders.embed, ("image_id",)).column("image_id").to_pylist())
    gone = [i for i, image_id in zip(kept.rows.column("id").to_pylist(), have) if image_id not in now]
    rows = kept.rows
    if gone:
        kept.index.remove_ids(np.asarray(gone, dtype=np.int64))
        rows = rows.filter(pa.array([image_id in now for image_id in have]))
    meta, x = features.read(folders.embed, skip_ids=set(have))
    next_id = int(np.max(kept.rows.column("id").to_numpy())) + 1 if kept.rows.num_rows else 0
    ids = np.arange(next_id, next_id + len(x), dtype=np.int64)
    add(kept.index, x, ids)
    added = pa.table({"id": pa.array(ids), **{c: meta.column(c) for c in features.META}})
    rows = pa.concat_tables([rows.cast(ROWS_SCHEMA), added.cast(ROWS_SCHEMA)])
    generation = int(existing.details["generation"]) + 1
    save(out, kept.index, rows, generation)
    wall = time.perf_counter() - started
    log.info("index: %d added, %d removed without a rebuild, %.1f s", len(x), len(gone), wall)
    done = _finish(out, folders, print_, kept.index, rows, generation, added=len(x), removed=len(gone), wall=wall)
    for name in _files(generation - 1):
        storage.remove(storage.join(out, name))
    return done


def _finish(out, folders, print_, built, rows, generation, *, added, removed, wall) -> Manifest:
    import faiss

    inner = faiss.downcast_index(built)
    details = {
        "generation": generation,
        "kind": kind_of(built),
        "cells": int(inner.nlist) if isinstance(inner, faiss.IndexIVF) else None,
        "nprobe": DEFAULT_NPROBE if isinstance(inner, faiss.IndexIVF) else None,
        "dim": int(built.d),
        "wall_s": round(wall, 2),
    }
    counts = {"vectors": int(built.ntotal), "added": added, "removed": removed}
    assert built.ntotal == rows.num_rows, (built.ntotal, rows.num_rows)
    return lifecycle.write_manifest(
        out, Manifest(stage=INDEX.name, input=folders.embed, fingerprint=print_, counts=counts, details=details)
    )
