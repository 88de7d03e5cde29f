"""Embed with a feature store: look the pending rows up by sha256, run the model only on the images the store
lacks (identical bytes once per run), and hand embed's writer every row as if all had been computed."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m9 import config
from m9.config import FEATURE_DIM
from m9.io import storage
from m9.store import FeatureStore, ModelStore
from m9.store import rows as store_rows

log = logging.getLogger(__name__)

#: `--store auto`'s folder beside the weights in m9's cache, for a local output.
LOCAL_STORE = "store"

#: Environment variable naming the store `--store auto` means (a folder, an s3:// URI, or none), e.g. one
#: store shared by every job of a cluster.
STORE_ENV = "M9_STORE"

#: Rows computed in a run are added to the store in parts of at least this many (5 MB of features): few
#: parts per run, and a killed run loses at most this many rows' work to the store (its output keeps them).
FLUSH_ROWS = 1000

#: Columns the driver reads of the pending shards (never the image bytes).
_META = ("image_id", "path", "label", "split")


def resolve_store(option: str | None, output: str) -> str | None:
    """The store URI for `--store`: none → None; auto → $M9_STORE if set, else m9's cache folder for a local output, the
    `store/` prefix of the output's bucket for an s3:// one; anything else is the URI itself."""
    if option and option.lower() == "auto" and os.environ.get(STORE_ENV):
        option = os.environ[STORE_ENV]
    if option is None or option.lower() == "none":
        return None
    if option.lower() != "auto":
        return storage.normalize(option)
    if storage.is_s3(output):
        bucket = storage.normalize(output).removeprefix("s3://").split("/", 1)[0]
        return f"s3://{bucket}/{LOCAL_STORE}"
    return storage.normalize(config.cache_dir() / LOCAL_STORE)


class Reuse:
    """The pending shards' rows split into those the store holds (reused), those to compute (the first row
    of each sha256 the store lacks) and copies of a row being computed (identical bytes elsewhere).

    items: the work items (embed.plan_slices) that still have rows to compute, each with `rows`, their
    indices inside the item; items with nothing to compute are left out.
    """

    def __init__(self, store: ModelStore, shards: list[str], items: list[dict]):
        self.store = store
        self.meta: dict[str, dict[str, np.ndarray]] = {}
        firsts: dict[str, np.ndarray] = {}  # shard → the file row where each row group starts
        for shard in shards:
            fs, path = storage.filesystem(shard)
            file = pq.ParquetFile(path, filesystem=fs)
            table = file.read(columns=[*_META, "sha256"])
            self.meta[shard] = {n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}
            sizes = [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)]
            firsts[shard] = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        wanted = {sha for m in self.meta.values() for sha in m["sha256"]}
        found = store.lookup(wanted)
        feats = found.column("features").combine_chunks().values.to_numpy().reshape(-1, FEATURE_DIM)
        #: sha256 → (features, error or "") of everything known: found in the store or computed in this run
        self.known: dict[str, tuple[np.ndarray, str]] = {
            sha: (feats[i], err or "")
            for i, (sha, err) in enumerate(zip(found.column("sha256").to_pylist(), found.column("error").to_pylist()))
        }
        self.ids: dict[tuple[str, str], str] = {}  # (shard, image_id) → sha256, for the rows computed
        self.waiting: dict[str, list[tuple[str, int]]] = defaultdict(list)  # sha256 → copies' (shard, row)
        self.items, claimed = [], set()
        self.computed = self.copies = 0
        for item in items:
            first = int(firsts[item["shard"]][item["row_groups"][0]]) + item["start"]
            shas = self.meta[item["shard"]]["sha256"]
            todo = []
            for i in range(item["stop"] - item["start"]):
                row = first + i
                sha = shas[row]
                if sha in self.known:
                    continue
                if sha in claimed:
                    self.waiting[sha].append((item["shard"], row))
                    self.copies += 1
                    continue
                claimed.add(sha)
                todo.append(i)
                self.ids[(item["shard"], self.meta[item["shard"]]["image_id"][row])] = sha
            if todo:
                self.items.append({**item, "rows": todo})
        self.computed = len(claimed)
        self.rows_in = sum(len(m["sha256"]) for m in self.meta.values())
        self.reused = self.rows_in - self.computed - self.copies
        self._new: list[pa.Table] = []
        log.info(
            "embed: %d of %d rows found in the store %s, %d to compute, %d identical to one of those",
            self.reused,
            self.rows_in,
            store.folder,
            self.computed,
            self.copies,
        )

    def batches(self, computed: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        """Every pending row in embed_item's columns: the store's rows first, then each computed batch (added
        to the store as it comes) followed by the copies it completes."""
        for shard, meta in self.meta.items():
            rows = [r for r, sha in enumerate(meta["sha256"]) if sha in self.known]
            if rows:
                yield self._batch(shard, rows)
        try:
            for batch in computed:
                shas = [self.ids[(str(s), str(i))] for s, i in zip(batch["shard"], batch["image_id"])]
                yield batch  # the caller may take columns out of it
                self._new.append(store_rows(shas, batch["features"], batch["error"]))
                copies: dict[str, list[int]] = defaultdict(list)
                for sha, features, error in zip(shas, batch["features"], batch["error"]):
                    self.known[sha] = (features, error)
                    for shard, row in self.waiting.pop(sha, ()):
                        copies[shard].append(row)
                for shard, rows in copies.items():
                    yield self._batch(shard, rows)
                if sum(t.num_rows for t in self._new) >= FLUSH_ROWS:
                    self.flush()
        finally:
            self.flush()

    def flush(self) -> None:
        """Add the rows computed since the last flush to the store, as one part."""
        if self._new:
            self.store.add(pa.concat_tables(self._new))
            self._new = []

    def _batch(self, shard: str, rows: list[int]) -> dict[str, np.ndarray]:
        meta = self.meta[shard]
        known = [self.known[meta["sha256"][r]] for r in rows]
        out = {n: meta[n][rows] for n in _META}
        out["features"] = np.stack([f for f, _ in known]).astype(np.float32)
        out["error"] = np.array([e for _, e in known], dtype=object)
        out["shard"] = np.full(len(rows), shard)
        return out


def open_store(uri: str | None, identity: dict) -> ModelStore | None:
    """The store's part for one model identity, or None without a store."""
    return FeatureStore(uri).model(identity) if uri else None
