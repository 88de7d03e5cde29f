"""A content-addressed store of features: per model identity, append-only Parquet parts of
(sha256, features, error) rows, so an image's bytes are embedded once per model, ever."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from m9.config import FEATURE_DIM
from m9.errors import InputError
from m9.io import storage

log = logging.getLogger(__name__)

#: The rows of a part: the image bytes' sha256 (hex), the features, and a rejection's reason or null. A
#: rejection's features are zeros, not null: pyarrow 25 writes a null fixed-size list to Parquet but cannot
#: read it back ("Expected all lists to be of size=1280 but index … had size=0").
SCHEMA = pa.schema(
    [
        ("sha256", pa.string()),
        ("features", pa.list_(pa.float32(), FEATURE_DIM)),
        ("error", pa.string()),
    ]
)

#: Written beside the parts of one model: the identity they were made with. Parts are served only when it
#: is there and equals the identity asked for, so a digest collision or a hand-copied folder serves nothing.
IDENTITY_NAME = "identity.json"

#: Part files: `part-<uuid>.parquet`, unique per writer, so writers never touch each other's files.
PART_PREFIX, PART_SUFFIX = "part-", ".parquet"

#: Rows per row group in a part: 1,000 rows are 5 MB of features, so a lookup that hits a few rows of a
#: merged 100,000-row part reads those rows' groups, not the whole part.
ROW_GROUP_ROWS = 1000

#: Hex digits of the identity digest naming a model's folder (64 bits: no collision among the few models a
#: store holds, and identity.json is checked anyway).
DIGEST_CHARS = 16

#: A temporary part older than this is a killed writer's leftover, removed by compact(); a younger one may
#: still be being written.
STALE_TMP_S = 3600

#: Times a lookup lists the parts again when one vanished under it (a concurrent compact removed it after
#: writing the merged part that holds its rows).
LIST_RETRIES = 3


class StoreError(InputError):
    """A store folder holds something other than what was asked for (another model's identity)."""


def digest(identity: dict) -> str:
    """The folder name of a model identity (m9.model.spec.ModelSpec.identity): a digest of its canonical JSON."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


@dataclass(frozen=True)
class Entries:
    """What a store holds for one model identity (FeatureStore.show)."""

    digest: str
    identity: dict | None
    entries: int
    rejections: int
    parts: int
    bytes: int


class FeatureStore:
    """The store at a local folder or s3:// URI; `model(identity)` is the part that serves one model."""

    def __init__(self, uri: str):
        self.uri = storage.normalize(uri)

    def model(self, identity: dict) -> ModelStore:
        """The rows of one model identity (created on the first add)."""
        return ModelStore(storage.join(self.uri, digest(identity)), identity)

    def digests(self) -> list[str]:
        """The identity folders in the store."""
        fs, path = storage.filesystem(self.uri)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name[0] not in "._")

    def show(self) -> list[Entries]:
        """Entries (distinct sha256), rejections, parts and bytes per identity."""
        out = []
        for name in self.digests():
            folder = storage.join(self.uri, name)
            identity = storage.read_json(storage.join(folder, IDENTITY_NAME))
            parts = _parts(folder)
            keys: dict[str, bool] = {}
            for part, _ in parts:
                table = _read(part, ["sha256", "error"])
                for sha, err in zip(table.column("sha256").to_pylist(), table.column("error").to_pylist()):
                    keys.setdefault(sha, err is not None)
            out.append(
                Entries(
                    digest=name,
                    identity=identity,
                    entries=len(keys),
                    rejections=sum(keys.values()),
                    parts=len(parts),
                    bytes=sum(size for _, size in parts),
                )
            )
        return out

    def drop(self, identity_digest: str) -> str:
        """Remove one identity's folder, named by its digest or a unique prefix of it; returns the digest."""
        names = [n for n in self.digests() if n.startswith(identity_digest)] if identity_digest else []
        if len(names) != 1:
            known = ", ".join(self.digests()) or "none"
            what = "matches several" if names else "matches none"
            raise InputError(f"--identity {identity_digest!r} {what} of the identities in {self.uri} ({known})")
        storage.remove(storage.join(self.uri, names[0]))
        return names[0]


class ModelStore:
    """The parts of one model identity in a store: lookup, add and compact. Safe with several writers at
    once (each writes parts of its own, under unique names) and with readers (a row is removed only after
    a part holding it is visible; readers keep the first copy of each sha256)."""

    def __init__(self, folder: str, identity: dict):
        self.folder, self.identity = folder, identity
        self.digest = folder.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        #: sha256 column per part already read by this process (parts never change once written).
        self._keys: dict[str, pa.Array] = {}

    def _trusted(self) -> bool:
        """True when identity.json is there and says this identity; raises when it says another."""
        found = storage.read_json(storage.join(self.folder, IDENTITY_NAME))
        if found is None:
            return False
        if found != self.identity:
            raise StoreError(
                f"{self.folder} holds features of another model identity than its name says ({IDENTITY_NAME}: "
                f"{json.dumps(found, sort_keys=True)}); nothing is served from it. Remove it with "
                f"`m9 store drop --identity {self.digest}`"
            )
        return True

    def lookup(self, sha256s) -> pa.Table:
        """The stored rows (SCHEMA) of those of sha256s the store holds, one per sha256. Reads every part's
        sha256 column (once per process), then only the row groups of the parts that hold a wanted one."""
        wanted = pa.array(sorted(set(sha256s)), pa.string())
        if not len(wanted) or not self._trusted():
            return SCHEMA.empty_table()
        for attempt in range(LIST_RETRIES):
            try:
                return self._lookup(wanted)
            except FileNotFoundError:
                if attempt == LIST_RETRIES - 1:
                    raise
                log.debug("store: a part vanished during a lookup (a compact); listing again")
        raise AssertionError("unreachable")

    def _lookup(self, wanted: pa.Array) -> pa.Table:
        pieces, seen = [], pa.array([], pa.string())
        for part, _ in _parts(self.folder):
            keys = self._keys.get(part)
            if keys is None:
                keys = self._keys[part] = _read(part, ["sha256"]).column("sha256").combine_chunks()
            hit = pc.and_(pc.is_in(keys, value_set=wanted), pc.invert(pc.is_in(keys, value_set=seen)))
            rows = np.flatnonzero(hit.to_numpy(zero_copy_only=False))
            if not len(rows):
                continue
            pieces.append(_read_rows(part, rows))
            seen = pa.concat_arrays([seen, keys.take(pa.array(rows))])
        if not pieces:
            return SCHEMA.empty_table()
        return _first_per_key(pa.concat_tables(pieces))

    def add(self, table: pa.Table) -> int:
        """Append rows (SCHEMA) as one new part; duplicates of stored rows are harmless. Returns rows written."""
        table = _first_per_key(table.select(SCHEMA.names).cast(SCHEMA))
        if not table.num_rows:
            return 0
        if not self._trusted():
            storage.write_json(storage.join(self.folder, IDENTITY_NAME), self.identity)
        _write_part(self.folder, table)
        return table.num_rows

    def compact(self) -> tuple[int, int]:
        """Merge every part into one (first copy of each sha256 kept): the merged part is written first, then
        the parts it replaced are removed, so readers and other writers are never short of a row. Also
        removes temporary parts older than STALE_TMP_S. Returns (parts replaced, rows kept)."""
        if not self._trusted():
            return 0, 0
        _remove_stale_tmp(self.folder)
        parts = [p for p, _ in _parts(self.folder)]
        if len(parts) < 2:
            return 0, sum(_read(p, ["sha256"]).num_rows for p in parts)
        merged = _first_per_key(pa.concat_tables([_read(p, SCHEMA.names) for p in parts]))
        _write_part(self.folder, merged)
        for part in parts:
            fs, path = storage.filesystem(part)
            try:
                fs.delete_file(path)
            except FileNotFoundError:
                pass  # another compact removed it after writing its own merged part
            self._keys.pop(part, None)
        return len(parts), merged.num_rows


def _parts(folder: str) -> list[tuple[str, int]]:
    """(uri, bytes) of the committed parts; temporary names (`….parquet.tmp-…`) do not end in .parquet."""
    fs, path = storage.filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return sorted(
        (storage.join(folder, i.base_name), i.size or 0)
        for i in infos
        if i.type == pafs.FileType.File and i.base_name.startswith(PART_PREFIX) and i.base_name.endswith(PART_SUFFIX)
    )


def _read(part: str, columns: list[str]) -> pa.Table:
    fs, path = storage.filesystem(part)
    return pq.read_table(path, columns=columns, filesystem=fs)


def _read_rows(part: str, rows: np.ndarray) -> pa.Table:
    """Rows (indices into the part) read from only the row groups that hold them."""
    fs, path = storage.filesystem(part)
    file = pq.ParquetFile(path, filesystem=fs)
    sizes = [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)]
    firsts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    group_of = np.searchsorted(firsts, rows, side="right") - 1
    groups = np.unique(group_of)
    table = file.read_row_groups([int(g) for g in groups], columns=SCHEMA.names)
    # where each group read starts in `table`
    starts = dict(zip(groups.tolist(), np.concatenate([[0], np.cumsum([sizes[g] for g in groups])]).tolist()))
    local = rows - firsts[group_of] + np.array([starts[g] for g in group_of.tolist()], dtype=np.int64)
    return table.take(pa.array(local))


def _first_per_key(table: pa.Table) -> pa.Table:
    """The first row of each sha256."""
    keys = table.column("sha256").to_pylist()
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    if len(first) == len(keys):
        return table
    return table.take(pa.array(sorted(first.values())))


def _write_part(folder: str, table: pa.Table) -> str:
    """One new part under a unique name, atomically (a temporary name then a rename locally; one PUT on S3)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy", row_group_size=ROW_GROUP_ROWS)
    uri = storage.join(folder, f"{PART_PREFIX}{uuid.uuid4().hex}{PART_SUFFIX}")
    storage.write_bytes_atomic(uri, buf.getvalue())
    return uri


def _remove_stale_tmp(folder: str) -> None:
    fs, path = storage.filesystem(folder)
    now = time.time()
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True)):
        if ".tmp-" in info.base_name and info.mtime and now - info.mtime.timestamp() > STALE_TMP_S:
            log.info("store: removing %s, left by an interrupted writer", info.path)
            fs.delete_file(info.path)


def rows(sha256s, features: np.ndarray, errors) -> pa.Table:
    """A table of store rows: errors[i] None (or "") for an embedded image, else its reason (features zeros)."""
    errors = [e or None for e in errors]
    ok = np.array([e is None for e in errors], dtype=bool)
    features = np.asarray(features, dtype=np.float32).reshape(-1, FEATURE_DIM)
    flat = pa.array(np.where(ok[:, None], features, 0).ravel(), pa.float32())
    feats = pa.FixedSizeListArray.from_arrays(flat, FEATURE_DIM)
    return pa.table({"sha256": pa.array(list(sha256s), pa.string()), "features": feats, "error": errors}, schema=SCHEMA)
