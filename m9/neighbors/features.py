"""An embed output's features as one unit-length float32 matrix with their rows' metadata, read file by file."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m9.errors import InputError
from m9.io import storage
from m9.stages import contract, lifecycle
from m9.stages.contract import EMBED, EMBEDDINGS

#: The metadata columns every neighbour output carries, as embed writes them.
META = ("image_id", "path", "label", "split")


@dataclass(frozen=True)
class Folders:
    """Where a workdir's (or an embed output's) stages wrote: embed's output and, when known, ingest's."""

    embed: str
    images: str | None


def locate(src: str) -> Folders:
    """The embed output behind src (an `m9 run` workdir or an `m9 embed` output) and the ingest output
    its manifest names. InputError when src holds no finished embed output."""
    src = storage.normalize(src)
    for candidate in (storage.join(src, EMBED.folder), src):
        manifest = lifecycle.read_manifest(candidate)
        if manifest is not None and manifest.stage == EMBED.name:
            images = manifest.input if manifest.input and storage.exists(manifest.input) else None
            return Folders(embed=candidate, images=images)
    raise InputError(
        f"{src} holds no features: no finished `m9 embed` output there or in its {EMBED.folder}/; "
        f"run `m9 run` (or `m9 embed`) first"
    )


def embeddings_files(embed_dir: str) -> list[str]:
    return storage.list_files(storage.join(embed_dir, EMBEDDINGS), ".parquet")


def read_meta(embed_dir: str, columns: tuple[str, ...] = META) -> pa.Table:
    """The metadata of every embedded image (no features), in file order."""
    tables = []
    for uri in embeddings_files(embed_dir):
        fs, path = storage.filesystem(uri)
        tables.append(pq.read_table(path, filesystem=fs, columns=list(columns)))
    return pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.string()) for c in columns})


def read(embed_dir: str, skip_ids: set[str] | None = None) -> tuple[pa.Table, np.ndarray]:
    """(metadata, unit-length features (n, 1280) float32) of the embedded images, in file order; rows whose
    image_id is in skip_ids are left out. The matrix is filled file by file, never held twice."""
    files = embeddings_files(embed_dir)
    sizes = []
    for uri in files:
        fs, path = storage.filesystem(uri)
        sizes.append(pq.ParquetFile(path, filesystem=fs).metadata.num_rows)
    x = np.empty((sum(sizes), contract.FEATURES_TYPE.list_size), np.float32)
    metas, at = [], 0
    for uri in files:
        fs, path = storage.filesystem(uri)
        table = pq.read_table(path, filesystem=fs, columns=[*META, "features"])
        if skip_ids:
            keep = pa.array([i not in skip_ids for i in table.column("image_id").to_pylist()])
            table = table.filter(keep)
        x[at : at + table.num_rows] = contract.vectors(table, "features")
        at += table.num_rows
        metas.append(table.drop_columns(["features"]))
    x = x[:at]
    normalize(x)
    meta = pa.concat_tables(metas) if metas else pa.table({c: pa.array([], pa.string()) for c in META})
    return meta, x


def normalize(x: np.ndarray) -> np.ndarray:
    """Scale each row to unit length in place (inner product = cosine similarity); zero rows stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def read_by_ids(embed_dir: str, ids: list[str]) -> tuple[pa.Table, np.ndarray]:
    """(metadata, unit-length features) of the given image ids, those found, in the order asked."""
    import pyarrow.compute as pc

    wanted = pa.array(sorted(set(ids)), pa.string())
    found = []
    for uri in embeddings_files(embed_dir):
        fs, path = storage.filesystem(uri)
        # embed sorts each file by image_id: the row groups' statistics skip most of a large file.
        hits = pq.read_table(
            path, filesystem=fs, columns=[*META, "features"], filters=pc.is_in(pc.field("image_id"), value_set=wanted)
        )
        if hits.num_rows:
            found.append(hits)
    if not found:
        return pa.table({c: pa.array([], pa.string()) for c in META}), np.zeros((0, 1280), np.float32)
    table = pa.concat_tables([contract.as_fixed(t, "features") for t in found])
    order = {v: i for i, v in enumerate(table.column("image_id").to_pylist())}
    rows = [order[i] for i in ids if i in order]
    table = table.take(pa.array(rows, pa.int64()))
    return table.drop_columns(["features"]), normalize(np.array(contract.vectors(table, "features")))


def read_hashes(images_dir: str | None) -> dict[str, str]:
    """image_id → sha256 of its bytes, from the ingest output (empty when there is none)."""
    if not images_dir:
        return {}
    out: dict[str, str] = {}
    for uri in storage.list_files(images_dir, ".parquet"):
        fs, path = storage.filesystem(uri)
        names = set(pq.read_schema(path, filesystem=fs).names)
        if not {"image_id", "sha256"} <= names:
            continue
        table = pq.read_table(path, filesystem=fs, columns=["image_id", "sha256"])
        out.update(zip(table.column("image_id").to_pylist(), table.column("sha256").to_pylist()))
    return out
