"""The stage contracts: what each stage reads, writes and owns, its manifest, and what makes its output stale.

Every stage (ingest, embed, reduce) is described once here, and every caller asks this module: the
columns a stage needs from its input, the schema of each thing it writes, the names it owns in its
output folder, which config fields change its output, and its typed manifest. Before a stage writes,
`prepare()` decides from the output folder and the stage's fingerprint whether to skip (done, same
fingerprint), resume (interrupted, same fingerprint), update (only the input changed), start afresh, or
refuse with one line naming what changed (as DVC's lock entries and Dagster's code versions do).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fnmatch
import hashlib
import json
import logging
import os
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from m9 import __version__
from m9.config import DEFAULT_WORKDIR, FEATURE_DIM
from m9.errors import InputError
from m9.io import storage

log = logging.getLogger(__name__)

#: The file a stage writes last into its output folder; its presence means the output is complete.
MANIFEST = "_m9.json"

#: The fingerprint of a run in progress, written before a stage writes anything else: an interrupted
#: output is resumed only by a run with the same fingerprint.
PENDING = "_m9.pending.json"

#: The output's lock (see m9.io.lease).
LEASE = "_m9.lock"

#: Names any stage may leave at the top of its output while it runs (its bookkeeping, Spark's and
#: Hadoop's commit files, m9's atomic-write temporaries).
_COMMON_OWNED = (MANIFEST, PENDING, LEASE, "_SUCCESS", "_temporary", ".*.crc", "*.tmp-*", ".part-*")

_META = [
    ("image_id", pa.string()),
    ("path", pa.string()),
    ("label", pa.string()),
    ("split", pa.string()),
]


def vector_type(width: int) -> pa.DataType:
    """A vector column: FixedSizeList<float32, width>. Arrow readers need no per-row lengths, Polars reads it
    as Array(Float32, width), DuckDB over Arrow sees FLOAT[width] (array_cosine_similarity works; its own
    Parquet reader sees FLOAT[] and takes `features::FLOAT[1280]`)."""
    return pa.list_(pa.float32(), width)


#: embed's features: MobileNetV2's pooled 1280 floats per image.
FEATURES_TYPE = vector_type(FEATURE_DIM)


def vectors(table: pa.Table, column: str) -> np.ndarray:
    """A vector column as an (n, width) float32 matrix, from FixedSizeList or from the variable-length
    lists earlier m9 versions wrote."""
    values = table.column(column).combine_chunks() if table.num_rows else None
    if values is None:
        width = getattr(table.schema.field(column).type, "list_size", 0)
        return np.zeros((0, max(width, 0)), np.float32)
    return values.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(table.num_rows, -1)


def as_fixed(table: pa.Table, column: str) -> pa.Table:
    """table with its vector column as FixedSizeList (variable-length lists of one width are cast)."""
    kind = table.schema.field(column).type
    if pa.types.is_fixed_size_list(kind):
        return table
    width = vectors(table.slice(0, 1), column).shape[1] if table.num_rows else 0
    index = table.schema.get_field_index(column)
    return table.set_column(index, column, table.column(column).cast(vector_type(width)))


@dataclass(frozen=True)
class Contract:
    """One stage, stated once."""

    #: The stage's name (`m9 <name>`).
    name: str
    #: Its folder under `m9 run`'s workdir.
    folder: str
    #: The stage whose output this stage reads (None: an image tree).
    reads: str | None
    #: Columns it needs from that output; checked first, so a wrong folder is one clear error.
    needs: tuple[str, ...]
    #: What it writes: a path inside its output ("" = Parquet files at the top) → the schema of that Parquet.
    writes: Mapping[str, pa.Schema]
    #: Other files it writes (CSV, JSON) inside its output.
    files: tuple[str, ...]
    #: Config fields that change the output: part of the fingerprint.
    changes_output: tuple[str, ...]
    #: Config fields that do not change the output (where it is written, how fast, how strict).
    does_not_change_output: tuple[str, ...]
    #: Fingerprint keys that may change together with the input in an update (see only_input_changed);
    #: alone, without the input, they are a change like any other.
    follows_input: tuple[str, ...] = ()

    @property
    def producer(self) -> str:
        return f"m9 {self.name}"

    @property
    def owned(self) -> tuple[str, ...]:
        """Name patterns at the top of the output folder that this stage may write or replace."""
        top = tuple(p.split("/")[0] for p in self.writes if p) + self.files
        parquet = ("part-*",) if "" in self.writes else ()
        return _COMMON_OWNED + parquet + top

    def owns(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.owned)

    def columns(self, path: str = "") -> tuple[str, ...]:
        return tuple(self.writes[path].names)


#: The ingest output's index: one row per image (relative_path, size, mtime_ns, and the part file holding it),
#: written last before the manifest; an update compares the tree with it, and parts it does not name are
#: leftovers of an interrupted run. Its leading `_` keeps it out of Spark's and pyarrow's Parquet readers.
INGEST_INDEX = "_m9.files.parquet"

INGEST = Contract(
    name="ingest",
    folder="images",
    reads=None,
    needs=(),
    writes={
        "": pa.schema(
            [
                *_META[:2],
                ("relative_path", pa.string()),
                *_META[2:],
                ("sha256", pa.string()),
                ("size", pa.int64()),
                ("content", pa.binary()),
            ]
        )
    },
    files=(INGEST_INDEX,),
    # bytes_per_file, like images_per_file, changes how the rows are split into files (not the rows).
    changes_output=("images_per_file", "bytes_per_file", "extensions"),
    does_not_change_output=("overwrite",),
)

#: Subfolders of the embed output.
EMBEDDINGS, ERRORS = "embeddings", "errors"

EMBED = Contract(
    name="embed",
    folder="embed",
    reads="ingest",
    needs=("image_id", "path", "label", "split", "content"),
    writes={
        EMBEDDINGS: pa.schema([*_META, ("features", FEATURES_TYPE)]),
        ERRORS: pa.schema([*_META, ("error", pa.string())]),
    },
    files=(),
    # The model's identity (m9.model.spec.ModelSpec.identity) stands for these in the fingerprint:
    # weights: the weights' checksum, not the file's path.
    # runtime: ONNX Runtime and Keras agree within 1e-4, not bit for bit, so a switch makes other features.
    # precision: another number format gives other features.
    # decode_memory_mb: which images are rejected as too large.
    changes_output=("weights", "runtime", "precision", "decode_memory_mb"),
    # batch size, actors and threads change how fast, not what (the model is deterministic per image).
    # store: what the store holds was computed by the same model identity, so the features are the same.
    does_not_change_output=("actors", "batch_size", "ray_address", "overwrite", "max_errors", "store"),
)

#: Outputs of the reduce stage, and the column of pca/ holding the components.
PCA_DIR, CSV_NAME, VARIANCE_NAME = "pca", "pca.csv", "variance.json"
PCA_COLUMN = "pca"
#: reduce's fitted basis (m9.stages.reduce.Basis): the mean, the components and their explained-variance
#: ratios as float64 arrays in one NumPy .npz, with where and when it was fitted. One small file (1280 × k
#: doubles), written in one atomic write and read back bit for bit without Spark; `--basis keep` projects
#: a changed input onto it.
BASIS_NAME = "basis.npz"

REDUCE = Contract(
    name="reduce",
    folder="reduce",
    reads="embed",
    needs=("image_id", "path", "label", "split", "features"),
    # pca is vector_type(k) as written (pca_schema); k is known only once the stage has chosen it.
    writes={PCA_DIR: pa.schema([*_META, (PCA_COLUMN, pa.list_(pa.float32()))])},
    files=(CSV_NAME, VARIANCE_NAME, BASIS_NAME),
    # basis: the fingerprint holds the identity of the input the basis was fitted on (this input's for
    # refit, the kept fit's for keep), not the option's word: keep and refit make the same output until the
    # input changes, and a refit on a changed input makes a new basis along with it (follows_input).
    changes_output=("k", "variance_target", "basis"),
    does_not_change_output=("overwrite",),
    follows_input=("basis",),
)


def pca_schema(k: int) -> pa.Schema:
    """reduce's pca/ schema once k is chosen: the components as FixedSizeList<float32, k>."""
    schema = REDUCE.writes[PCA_DIR]
    return schema.set(schema.get_field_index(PCA_COLUMN), pa.field(PCA_COLUMN, vector_type(k)))


#: Outputs of the duplicates stage.
DUPLICATES_NAME, DUPLICATES_SUMMARY = "duplicates.parquet", "duplicates.json"

DUPLICATES = Contract(
    name="duplicates",
    folder="duplicates",
    reads="embed",
    needs=("image_id", "path", "label", "split", "features"),
    writes={
        DUPLICATES_NAME: pa.schema(
            [
                ("group", pa.int64()),
                *_META,
                # exact: the same bytes (sha256) as the group's representative; near: similar features.
                ("kind", pa.string()),
                # cosine similarity of the features to the group's representative (1 for itself).
                ("similarity", pa.float32()),
                ("representative", pa.bool_()),
            ]
        )
    },
    files=(DUPLICATES_SUMMARY,),
    changes_output=("threshold",),
    does_not_change_output=("overwrite",),
)

INDEX = Contract(
    name="index",
    folder="index",
    reads="embed",
    needs=("image_id", "path", "label", "split", "features"),
    # index-N.faiss (faiss's own format) beside rows-N.parquet (faiss id → image); the manifest names N.
    writes={"rows-*.parquet": pa.schema([("id", pa.int64()), *_META])},
    files=("index-*.faiss",),
    # A new input is an update (added and removed images), not a change: see m9.neighbors.index.
    changes_output=("kind",),
    does_not_change_output=("overwrite",),
)

#: The spaces `m9 evaluate` scores kNN in, in the order it reports them: reduce's PCA components, embed's
#: full features, and the raw grey pixels of the images (the baseline).
PCA_SPACE, FULL_SPACE, RAW_SPACE = "pca", "full", "raw"
SPACES = (PCA_SPACE, FULL_SPACE, RAW_SPACE)

#: The file `m9 evaluate` writes.
EVALUATE_NAME = "evaluate.json"

EVALUATE = Contract(
    name="evaluate",
    folder="evaluate",
    # A reduce output, or an embed output (then without the PCA space).
    reads="reduce",
    needs=("image_id", "label", "split", PCA_COLUMN),
    writes={},
    files=(EVALUATE_NAME,),
    # decode_memory_mb: which images the raw-pixel baseline leaves out as too large to decode.
    changes_output=("neighbors", "decode_memory_mb"),
    does_not_change_output=("overwrite",),
)

#: The report's page, and the figures written beside it as PNGs (figure_name() names their files).
REPORT_NAME = "report.html"
FIGURES = ("scree", "scatter", "neighbours", "evaluate")
#: The largest groups of duplicates, when the workdir has a duplicates output.
DUPLICATES_FIGURE = "duplicates"


def figure_name(figure: str) -> str:
    """The file of one of the report's figures (FIGURES, DUPLICATES_FIGURE)."""
    return f"{figure}.png"


REPORT = Contract(
    name="report",
    folder="report",
    # The workdir: evaluate's output and the chain behind it (m9.stages.report.inputs).
    reads="evaluate",
    needs=(),
    writes={},
    files=(REPORT_NAME, *(figure_name(name) for name in (*FIGURES, DUPLICATES_FIGURE))),
    changes_output=(),
    does_not_change_output=("overwrite",),
)

#: The record `m9 run` writes at the top of its workdir (timings, machine), read by the report.
RUN_RECORD = "run.json"

STAGES: dict[str, Contract] = {c.name: c for c in (INGEST, EMBED, REDUCE, DUPLICATES, INDEX, EVALUATE, REPORT)}


#: `m9 bench`'s folder under the default workdir (it is not a stage of `m9 run`).
BENCH_DIR = "bench"


def default_output(stage: Contract | str) -> str:
    """Where a stage (or `m9 bench`, BENCH_DIR) writes when run alone with no --output: its folder under the
    default workdir."""
    return os.path.join(DEFAULT_WORKDIR, stage if isinstance(stage, str) else stage.folder)


#: A column only one stage writes, to say whose output a folder looks like.
_SIGNATURES = (("features", "m9 embed"), ("pca", "m9 reduce"), ("content", "m9 ingest"))


def check_columns(contract: Contract, src: str, parquet_file: str) -> None:
    """Raise InputError unless parquet_file (one file of the input src) has the columns `contract` needs
    from the stage before it. Reads the file's footer only."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(parquet_file)
    names = set(pq.read_schema(path, filesystem=fs).names)
    missing = [c for c in contract.needs if c not in names]
    if not missing:
        return
    assert contract.reads is not None, "only a stage that reads another stage's output checks its columns"
    producer = STAGES[contract.reads].producer
    looks = next((f" (it looks like `{who}`'s output)" for col, who in _SIGNATURES if col in names), "")
    columns = f"column{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
    raise InputError(
        f"{src} is not `{producer}`'s output{looks}: its Parquet has no {columns}; pass the folder `{producer}` wrote"
    )


@dataclass(frozen=True)
class Manifest:
    """What a finished stage wrote into its output's _m9.json: the commit marker, and what it counted."""

    stage: str
    input: str
    #: Everything that determines the output (see fingerprint()); a later run compares its own to it.
    fingerprint: dict[str, Any]
    counts: dict[str, int]
    #: Stage-specific facts (k and explained variance, actors, wall time …).
    details: dict[str, Any] = field(default_factory=dict)
    m9_version: str = __version__
    finished_at: str = ""
    #: True when a run found this output already finished and did nothing (never written to disk).
    skipped: bool = False

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("skipped")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        """A manifest as stored; one written by an m9 before fingerprints has an empty fingerprint."""
        known = {f.name for f in dataclasses.fields(cls)} - {"skipped", "details"}
        details = dict(data.get("details") or {})
        details.update({k: v for k, v in data.items() if k not in known and k != "details"})
        return cls(
            stage=str(data.get("stage")),
            input=str(data.get("input")),
            fingerprint=dict(data.get("fingerprint") or {}),
            counts=dict(data.get("counts") or {}),
            details=details,
            m9_version=str(data.get("m9_version", "")),
            finished_at=str(data.get("finished_at", "")),
        )


def _split(uri: str) -> tuple[str, str]:
    """(bucket or "" for a local path, the path inside it)."""
    uri = storage.normalize(uri)
    if storage.is_s3(uri):
        bucket, _, key = uri[len("s3://") :].partition("/")
        return bucket, "/" + key
    return "", uri


def stored_input(output: str, src: str) -> str:
    """How output's manifest names its input src: relative to output (`../embed`) when src lies beside it
    or below its parent on the same filesystem (bucket), so a moved or copied workdir still finds its
    stages' outputs; else src itself (an input elsewhere stays where it was)."""
    (out_root, out_path), (src_root, src_path) = _split(output), _split(src)
    if out_root != src_root:
        return src
    relative = posixpath.relpath(src_path, out_path)
    parts = relative.split("/")
    return relative if parts[0] == ".." and ".." not in parts[1:] else src


def resolve_input(output: str, stored: str) -> str:
    """A manifest's input as an absolute path or URI: a relative one against the manifest's own folder
    (output); an absolute one (what earlier m9 versions wrote, or an input elsewhere) as it is."""
    if not stored or storage.is_s3(stored) or posixpath.isabs(stored) or os.path.isabs(stored):
        return stored
    root, path = _split(output)
    joined = posixpath.normpath(posixpath.join(path, stored))
    return f"s3://{root}{joined}" if root else storage.normalize(joined)


def read_manifest(output: str) -> Manifest | None:
    """The manifest of a finished stage output, or None; its input resolved to an absolute path or URI."""
    data = storage.read_json(storage.join(output, MANIFEST))
    if data is None:
        return None
    manifest = Manifest.from_json(data)
    return dataclasses.replace(manifest, input=resolve_input(output, manifest.input))


def write_manifest(output: str, manifest: Manifest) -> Manifest:
    """Mark output as finished (last write of a stage) and drop its pending record. An input that is
    another stage's output is stored relative to output (stored_input); an image tree as it is."""
    done = dataclasses.replace(manifest, finished_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    data = done.to_json()
    if manifest.stage in STAGES and STAGES[manifest.stage].reads is not None:
        data["input"] = stored_input(output, done.input)
    storage.write_json(storage.join(output, MANIFEST), data)
    storage.remove(storage.join(output, PENDING))
    return done


def upstream(src: str) -> dict[str, str]:
    """The stage outputs behind src, src included, by stage name: each finished manifest's input followed
    while it is another stage's output (evaluate → reduce → embed → ingest)."""
    found: dict[str, str] = {}
    folder: str | None = storage.normalize(src)
    below: str | None = None
    while folder and folder not in found.values():
        manifest = read_manifest(folder)
        if manifest is None and below is not None:
            # An earlier m9 wrote absolute inputs: after a move, the folder of that name beside this one.
            beside = storage.join(_parent(below), folder.rstrip("/").rsplit("/", 1)[-1])
            manifest, folder = read_manifest(beside), beside
        if manifest is None or manifest.stage not in STAGES:
            break
        found[manifest.stage] = below = folder
        folder = manifest.input if STAGES[manifest.stage].reads is not None else None
    return found


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]


def digest(value: Any) -> str:
    """A short stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def input_identity(src: str, suffix: str = ".parquet") -> str:
    """Who the input is: the fingerprint of the stage output it is (a chain, as DVC's), else a hash of
    its files' names, sizes and modification times."""
    upstream = read_manifest(src)
    if upstream is not None and upstream.fingerprint:
        return f"{upstream.stage}:{digest(upstream.fingerprint)}"
    return f"files:{digest(listing(src, suffix))}"


def listing(src: str, suffix: str = "", recursive: bool = False) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime in ns) of the files under src ending with suffix, sorted."""
    import pyarrow.fs as pafs

    fs, root = storage.filesystem(src)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=recursive, allow_not_found=True))
    return sorted(
        (i.path[len(root) :].lstrip("/"), int(i.size or 0), int(i.mtime_ns or 0))
        for i in infos
        if i.type == pafs.FileType.File and i.base_name.endswith(suffix) and not i.base_name.startswith((".", "_"))
    )


def fingerprint(contract: Contract, cfg: Any, input_id: str, **extra: Any) -> dict[str, Any]:
    """Everything that determines a stage's output: the input's identity, m9's version, the config
    fields the contract says change the output, and `extra` (weights checksum, preprocessing version …)."""
    values = {name: getattr(cfg, name) for name in contract.changes_output if name not in extra}
    return {"input": input_id, "m9_version": __version__, **values, **extra}


def unclassified_fields(contract: Contract, cfg_type: type) -> list[str]:
    """Config fields the contract neither counts as changing the output nor as not changing it."""
    known = {"input", "output", *contract.changes_output, *contract.does_not_change_output}
    return [f.name for f in dataclasses.fields(cfg_type) if f.name not in known]


def describe_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """What differs between two fingerprints, in words: `k 50 → 10, input changed`."""
    if not old:
        return "it was made by an earlier m9 that did not record its fingerprint"
    parts = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key == "input":
            parts.append("the input changed")
        else:
            parts.append(f"{key} {_short(old.get(key))} → {_short(new.get(key))}")
    return ", ".join(parts)


def _short(value: Any) -> str:
    text = "none" if value is None else str(value)
    return text if len(text) <= 24 else text[:12] + "…"


def check_not_a_file(output: str) -> None:
    """Refuse a local output that is, or lies under, a file (it would be a traceback later, or with
    --overwrite the file would be deleted). S3 has no such thing: a key and a prefix may share a name."""
    if storage.is_s3(output):
        return
    path = Path(output)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is" if candidate == path else f"lies under {candidate}, which is"
                raise InputError(f"output {output} {where} a file, not a folder; choose a folder")
            return


def _top_names(output: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(output)
    return [i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))]


def owned_files(contract: Contract, output: str) -> list[str]:
    """What a stage wrote into its output folder so far, but not its bookkeeping (lease, pending record)."""
    return [n for n in _top_names(output) if n not in (LEASE, PENDING) and contract.owns(n)]


_REDO = "pass --overwrite to redo it, or choose another output folder"


def prepare(
    contract: Contract,
    output: str,
    print_: dict[str, Any],
    overwrite: bool,
    before_start: Callable[[], None] | None = None,
    in_place: bool = False,
) -> Manifest | None:
    """Decide what to do with the output folder before a stage writes into it (call with its lease held).

    Returns the manifest when the output is finished with the same fingerprint (the caller skips);
    clears the folder when overwrite is set; otherwise records print_ as the run in progress and
    returns None (a fresh start, the resume of an interrupted run with the same fingerprint, or an update).
    An output (finished or interrupted) whose fingerprint differs only in its input is updated, not refused:
    a stage that updates in place (in_place: it keeps what still holds for the new input) finds its files
    as they were, less the manifest; any other stage finds the folder cleared and starts afresh.
    before_start, if given, runs just before that record is written: a stage's own refusals there leave
    the folder untouched.
    Raises InputError, naming what changed, for a finished or interrupted output made differently in
    anything but its input, another stage's output, or a folder holding files the stage does not own.
    """
    check_not_a_file(output)
    if overwrite:
        for name in _top_names(output):
            if name != LEASE:
                storage.remove(storage.join(output, name))
        storage.write_json(storage.join(output, PENDING), print_)
        return None
    manifest = read_manifest(output)
    updating = False
    if manifest is not None:
        if manifest.stage != contract.name:
            raise InputError(
                f"{output} holds the output of `m9 {manifest.stage}` on {manifest.input}; "
                f"choose another output folder or pass --overwrite to replace it"
            )
        if manifest.fingerprint == print_:
            return dataclasses.replace(manifest, skipped=True)
        if not only_input_changed(manifest.fingerprint, print_, contract.follows_input):
            raise InputError(
                f"{output} already holds a finished `{contract.producer}` output made differently "
                f"({describe_change(manifest.fingerprint, print_)}); {_REDO}"
            )
        log.info("%s: the input of %s changed; updating it", contract.name, output)
        _start_update(contract, output, in_place, print_)
        updating = True
    foreign = sorted(n for n in _top_names(output) if not contract.owns(n))
    if foreign:
        raise InputError(
            f"{output} already holds files m9 did not write (e.g. {foreign[0]}); "
            f"choose another output folder or pass --overwrite to replace it"
        )
    pending = storage.read_json(storage.join(output, PENDING))
    started = [n for n in _top_names(output) if n not in (LEASE, PENDING)]
    if pending is not None and started and pending != print_:
        if not only_input_changed(pending, print_, contract.follows_input):
            raise InputError(
                f"{output} holds an interrupted `{contract.producer}` run made differently "
                f"({describe_change(pending, print_)}); run the same command as before to resume it, or {_REDO}"
            )
        log.info("%s: the input of the interrupted run in %s changed; updating it", contract.name, output)
        _start_update(contract, output, in_place, print_)
        started = [n for n in _top_names(output) if n not in (LEASE, PENDING)]
        updating = True
    if before_start is not None:
        before_start()
    if started and not updating:
        log.info("%s: resuming the interrupted run in %s", contract.name, output)
    storage.write_json(storage.join(output, PENDING), print_)
    return None


def only_input_changed(old: Mapping[str, Any], new: Mapping[str, Any], follows: tuple[str, ...] = ()) -> bool:
    """Whether two fingerprints differ in their input and in nothing else but the keys that follow it
    (an update, not a new output)."""
    same = dict.fromkeys(("input", *follows))
    return bool(old) and old.get("input") != new.get("input") and {**old, **same} == {**new, **same}


def _start_update(contract: Contract, output: str, in_place: bool, print_: Mapping[str, Any]) -> None:
    """Make a finished or interrupted output ready for its stage to update: unfinished (no manifest), and,
    unless the stage updates in place, empty but for its lease. The new run's record is written first, so
    that an output killed meanwhile still says whose it is."""
    storage.write_json(storage.join(output, PENDING), dict(print_))
    for name in owned_files(contract, output):
        if not in_place or name == MANIFEST:
            storage.remove(storage.join(output, name))
