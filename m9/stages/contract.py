"""The stage contracts: what each stage reads, writes and owns, and what makes its output stale.

Every stage (ingest, embed, reduce, duplicates, index, evaluate, report) is described once here, and every
caller asks this module: its folder under a workdir, the columns it needs from its input, the schema of
each thing it writes, the names it owns in its output folder, and which config fields change its output.
m9.stages.lifecycle uses these to read and write a stage's manifest and to decide, before a stage writes,
whether to skip, resume, update, start afresh or refuse.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from m9.config import DEFAULT_WORKDIR, FEATURE_DIM
from m9.errors import InputError
from m9.io import storage

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
#: reduce's fitted basis (m9.stages.pca.Basis): the mean, the components and their explained-variance
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
