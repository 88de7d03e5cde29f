"""Duplicates: exact (the same bytes) and near (cosine similarity of the features above a threshold), grouped,
and the groups that cross the Training/Test split (leakage)."""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m9.config import DEFAULT_THRESHOLD  # the near-duplicate threshold; its measurement is given there
from m9.errors import InputError
from m9.io import lease, storage
from m9.neighbors import features
from m9.neighbors import index as m9index
from m9.stages import contract, lifecycle
from m9.stages.contract import DUPLICATES, DUPLICATES_NAME, DUPLICATES_SUMMARY
from m9.stages.lifecycle import Manifest

log = logging.getLogger(__name__)

#: Past m9index.EXACT_MAX images, the near-duplicate search splits the set into k-means cells (as many as the
#: index has) and compares each image with the images of its own cell in one matrix product per cell; an
#: image is also compared within the DUPLICATE_CELLS − 1 cells next nearest to it, so a near copy whose
#: nearest centroid differs from its original's is still found. Measured in docs/neighbors.md.
DUPLICATE_CELLS = 2

#: The exact search's tiles (BLOCK × COLUMN_BLOCK similarities, 128 MB of float32 at a time), and the
#: queries per product within a cell.
BLOCK, COLUMN_BLOCK = 2048, 16384
CELL_BLOCK = 1024

#: Groups drawn in the report, largest first; groups whose medoid is computed (past it, the first member).
LARGEST_GROUPS, MEDOID_MAX = 6, 2000

SCHEMA = DUPLICATES.writes[DUPLICATES_NAME]


@dataclass(frozen=True, kw_only=True)
class DuplicatesConfig:
    """What `m9 duplicates` reads (a workdir or an embed output), where it writes, its threshold."""

    input: str
    output: str
    threshold: float = DEFAULT_THRESHOLD
    overwrite: bool = False


def near_pairs(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, similarity) of every pair i < j of unit rows whose cosine similarity is at least threshold:
    exact search up to m9index.EXACT_MAX rows, else a search within k-means cells (_pairs_in_cells).

    The exact search computes each pair once: block of rows i × the rows j ≥ the block's first, one matrix
    product (BLAS) per BLOCK × COLUMN_BLOCK tile. On 70,000 Fashion-MNIST features at threshold 0.92
    (2026-12-04, AMD EPYC, 2 cores) this found 80,721 pairs in 37.5 s (about 175 GFLOP/s, the BLAS rate of
    one tile), where a faiss range search of every row over all rows, each pair twice, took 67.0 s for a
    duplicates table equal to this one, similarities bit for bit; 4096 × 8192 tiles took 42.8 s."""
    n = len(x)
    if n > m9index.EXACT_MAX:
        return _pairs_in_cells(x, threshold)
    x = np.ascontiguousarray(x, np.float32)
    found_i, found_j, found_s = [], [], []
    for start in range(0, n, BLOCK):
        rows = x[start : start + BLOCK]
        for first in range(start, n, COLUMN_BLOCK):
            sims = rows @ x[first : first + COLUMN_BLOCK].T
            qi, ci = np.nonzero(sims >= threshold)
            i, j = qi + start, ci + first
            keep = j > i
            found_i.append(i[keep])
            found_j.append(j[keep])
            found_s.append(sims[qi[keep], ci[keep]])
    return _joined(found_i, found_j, found_s)


def _pairs_in_cells(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """near_pairs past the exact size: each image is a query in its nearest k-means cell and a candidate in
    its DUPLICATE_CELLS nearest; within a cell, queries × candidates is one matrix product (BLAS) per
    CELL_BLOCK queries. A pair is found when one image's nearest cell is among the other's nearest cells."""
    n = len(x)
    cells = m9index.cells_for(n)
    trained = m9index.new_index("ivf", x.shape[1], m9index.training_sample(x, cells), cells)
    quantizer = trained.quantizer  # owned by `trained`, which must outlive it
    nearest = np.empty((n, DUPLICATE_CELLS), np.int64)
    for start in range(0, n, m9index.ADD_CHUNK):
        _, nearest[start : start + m9index.ADD_CHUNK] = quantizer.search(
            np.ascontiguousarray(x[start : start + m9index.ADD_CHUNK]), DUPLICATE_CELLS
        )
    queries = _members(nearest[:, 0], cells)
    candidates = _members(nearest.ravel(), cells, per_row=DUPLICATE_CELLS)
    found_i, found_j, found_s = [], [], []
    for cell in range(cells):
        cand = candidates[cell]
        if len(cand) < 2:
            continue
        xc = x[cand]
        for start in range(0, len(queries[cell]), CELL_BLOCK):
            q = queries[cell][start : start + CELL_BLOCK]
            sims = x[q] @ xc.T
            qi, ci = np.nonzero(sims >= threshold)
            a, b = q[qi], cand[ci]
            keep = a != b
            found_i.append(np.minimum(a, b)[keep])
            found_j.append(np.maximum(a, b)[keep])
            found_s.append(sims[qi, ci][keep])
    i, j, s = _joined(found_i, found_j, found_s)
    # Both images of a pair may be queries where the other is a candidate: keep each pair once.
    _, first = np.unique(i * n + j, return_index=True)
    return i[first], j[first], s[first]


def _members(cell_of: np.ndarray, cells: int, per_row: int = 1) -> list[np.ndarray]:
    """The rows in each cell, given each row's cell (per_row cells per row, flattened row by row)."""
    order = np.argsort(cell_of, kind="stable")
    bounds = np.searchsorted(cell_of[order], np.arange(cells + 1))
    rows = order // per_row
    return [rows[bounds[c] : bounds[c + 1]] for c in range(cells)]


def _joined(i: list, j: list, s: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(i).astype(np.int64), np.concatenate(j).astype(np.int64), np.concatenate(s)


def exact_pairs(hashes: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """(i, j): each image whose bytes another image already has, paired with the first that has them."""
    first: dict[str, int] = {}
    i, j = [], []
    for row, digest in enumerate(hashes):
        if digest is None:
            continue
        if digest in first:
            i.append(first[digest])
            j.append(row)
        else:
            first[digest] = row
    return np.asarray(i, np.int64), np.asarray(j, np.int64)


def groups(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected component of each of n items joined by the pairs (i, j); -1 for an item in no pair."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(i) == 0:
        return np.full(n, -1, np.int64)
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    component = np.where(sizes[component] >= 2, component, -1)
    # Number groups 0, 1, … largest first (ties: by first member), so group 0 is the largest.
    members = np.flatnonzero(component >= 0)
    labels, first, counts = np.unique(component[members], return_index=True, return_counts=True)
    order = np.lexsort((members[first], -counts))
    renumber = np.full(component.max() + 1, -1, np.int64)
    renumber[labels[order]] = np.arange(len(order))
    return np.where(component >= 0, renumber[np.maximum(component, 0)], -1)


def find(meta: pa.Table, x: np.ndarray, hashes: list[str | None], threshold: float) -> pa.Table:
    """One row per image in a group of two or more (SCHEMA), sorted by group then similarity."""
    ni, nj, _ = near_pairs(x, threshold)
    ei, ej = exact_pairs(hashes)
    group = groups(len(x), np.concatenate([ni, ei]), np.concatenate([nj, ej]))
    members = np.flatnonzero(group >= 0)
    by_group: dict[int, list[int]] = defaultdict(list)
    for row in members[np.argsort(group[members], kind="stable")]:
        by_group[int(group[row])].append(int(row))
    splits = meta.column("split").to_pylist()
    out: dict[str, list] = {name: [] for name in SCHEMA.names}
    for g, rows in by_group.items():
        rows_arr = np.asarray(rows)
        if len(rows) <= MEDOID_MAX:
            sims = x[rows_arr] @ x[rows_arr].T
            # The medoid: most similar on average to the others; ties go to a Training image, then the first.
            score = np.round(sims.mean(axis=1), 6) + 1e-7 * np.asarray([splits[r] == "Training" for r in rows])
            rep = rows[int(np.argmax(score))]
        else:
            rep = rows[0]
        similarity = x[rows_arr] @ x[rep]
        twins = Counter(hashes[r] for r in rows if hashes[r] is not None)
        for row, sim in sorted(zip(rows, similarity), key=lambda p: (p[0] != rep, -p[1], p[0])):
            same_bytes = hashes[row] is not None and (
                hashes[row] == hashes[rep] if row != rep else twins[hashes[rep]] > 1
            )
            out["group"].append(g)
            for c in features.META:
                out[c].append(meta.column(c)[row].as_py())
            out["kind"].append("exact" if same_bytes else "near")
            out["similarity"].append(1.0 if row == rep or same_bytes else float(min(1.0, sim)))
            out["representative"].append(row == rep)
    return pa.table(out, schema=SCHEMA)


def summarize(table: pa.Table, images: int, threshold: float) -> dict:
    """Counts of duplicates.json: groups, images, kinds, and the groups crossing the Training/Test split
    (per label), with the Test images in them (leaked: a Training image has the same or a near copy)."""
    rows = table.to_pylist()
    by_group: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_group[r["group"]].append(r)
    per_label: Counter[str] = Counter()
    crossing, leaked, mixed = [], [], 0
    for g, members in by_group.items():
        splits = {m["split"] for m in members}
        rep = next(m for m in members if m["representative"])
        if len({m["label"] for m in members}) > 1:
            mixed += 1
        if {"Training", "Test"} <= splits:
            crossing.append(g)
            per_label[str(rep["label"])] += 1
            leaked += [m["image_id"] for m in members if m["split"] == "Test"]
    largest = sorted(by_group, key=lambda g: (-len(by_group[g]), g))[:LARGEST_GROUPS]
    return {
        "threshold": threshold,
        "images": images,
        "groups": len(by_group),
        "images_in_groups": len(rows),
        "exact_images": sum(r["kind"] == "exact" for r in rows),
        "near_images": sum(r["kind"] == "near" for r in rows),
        "groups_with_mixed_labels": mixed,
        "crossing_groups": len(crossing),
        "crossing_groups_by_label": dict(sorted(per_label.items(), key=lambda kv: (-kv[1], kv[0]))),
        "leaked_test_images": len(leaked),
        "largest_groups": [
            {
                "group": g,
                "images": len(by_group[g]),
                "labels": dict(Counter(str(m["label"]) for m in by_group[g])),
                "splits": dict(Counter(str(m["split"]) for m in by_group[g])),
            }
            for g in largest
        ],
    }


def leaked_test_ids(table: pa.Table) -> set[str]:
    """Test images in a group that also holds a Training image."""
    by_group: dict[int, set[str]] = defaultdict(set)
    for g, split in zip(table.column("group").to_pylist(), table.column("split").to_pylist()):
        by_group[g].add(split)
    crossing = {g for g, s in by_group.items() if {"Training", "Test"} <= s}
    return {
        image_id
        for g, split, image_id in zip(
            table.column("group").to_pylist(), table.column("split").to_pylist(), table.column("image_id").to_pylist()
        )
        if g in crossing and split == "Test"
    }


def read_output(out: str) -> pa.Table:
    fs, path = storage.filesystem(storage.join(out, DUPLICATES_NAME))
    return pq.read_table(path, filesystem=fs)


def for_embed(embed_dir: str) -> str | None:
    """The finished duplicates output made from this embed output in the same workdir, if there is one."""
    parent = embed_dir.rstrip("/").rsplit("/", 1)[0] if "/" in embed_dir.rstrip("/") else "."
    out = storage.join(parent, DUPLICATES.folder)
    manifest = lifecycle.read_manifest(out)
    if manifest is None or manifest.stage != DUPLICATES.name:
        return None
    return out if storage.normalize(manifest.input) == storage.normalize(embed_dir) else None


def duplicates(cfg: DuplicatesConfig) -> Manifest:
    """Find the exact and near duplicates among the features under cfg.input; write duplicates.parquet
    and duplicates.json into cfg.output."""
    if not 0 < cfg.threshold <= 1:
        raise InputError(f"--threshold {cfg.threshold}: expected a cosine similarity above 0 and at most 1")
    folders = features.locate(cfg.input)
    out = storage.normalize(cfg.output)
    storage.check_access(read=folders.embed, write=out)
    files = features.embeddings_files(folders.embed)
    if files:
        contract.check_columns(DUPLICATES, folders.embed, files[0])
    lifecycle.check_not_a_file(out)
    print_ = lifecycle.fingerprint(DUPLICATES, cfg, lifecycle.input_identity(folders.embed))
    with lease.hold(out, DUPLICATES.name):
        done = lifecycle.prepare(DUPLICATES, out, print_, cfg.overwrite)
        if done is not None:
            log.info("duplicates: %s already holds this input's output; skipping", out)
            return done
        started = time.perf_counter()
        meta, x = features.read(folders.embed)
        known = features.read_hashes(folders.images)
        hashes = [known.get(i) for i in meta.column("image_id").to_pylist()]
        read_s = time.perf_counter() - started
        table = find(meta, x, hashes, cfg.threshold)
        summary = summarize(table, len(x), cfg.threshold)
        summary["exact_by_bytes"] = bool(known)
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="snappy")
        storage.write_bytes_atomic(storage.join(out, DUPLICATES_NAME), buf.getvalue().to_pybytes())
        storage.write_json(storage.join(out, DUPLICATES_SUMMARY), summary)
        wall = time.perf_counter() - started
        log.info(
            "duplicates: %d groups of %d images among %d (%d cross the Training/Test split), %.1f s",
            summary["groups"],
            summary["images_in_groups"],
            len(x),
            summary["crossing_groups"],
            wall,
        )
        counts = {k: summary[k] for k in ("images", "groups", "images_in_groups", "crossing_groups")}
        counts["leaked_test_images"] = summary["leaked_test_images"]
        details = {"threshold": cfg.threshold, "read_s": round(read_s, 2), "wall_s": round(wall, 2)}
        return lifecycle.write_manifest(
            out,
            Manifest(stage=DUPLICATES.name, input=folders.embed, fingerprint=print_, counts=counts, details=details),
        )
