"""Reduce: PCA of the embeddings (of the centered data; the covariance in one Spark scan, its eigenvectors by
numpy), as Parquet, CSV, a variance report and the fitted basis, which a changed input can be projected onto
instead of refitting (`--basis keep`)."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from m9.config import BASES, FEATURE_DIM, VARIANCE_THRESHOLDS, ReduceConfig
from m9.engines import spark as m9spark
from m9.errors import InputError
from m9.io import lease, storage
from m9.stages import contract, lifecycle
from m9.stages.contract import BASIS_NAME, CSV_NAME, EMBEDDINGS, PCA_COLUMN, PCA_DIR, PENDING, REDUCE, VARIANCE_NAME
from m9.stages.lifecycle import Manifest
from m9.ui.progress import spark_tasks

log = logging.getLogger(__name__)


def _embeddings(src: str) -> tuple[str, list[str]]:
    """The embeddings folder and its Parquet files: an embed output's embeddings/, or src itself."""
    inner = storage.join(src, EMBEDDINGS)
    files = storage.list_files(inner, ".parquet")
    return (inner, files) if files else (src, storage.list_files(src, ".parquet"))


def variance_report(ratios: list[float], k: int, rows: int) -> dict:
    """Explained-variance ratios, their running sum, and the smallest k reaching each threshold."""
    cumulative = np.cumsum(ratios).tolist()
    reached = {}
    for t in VARIANCE_THRESHOLDS:
        hit = next((i + 1 for i, c in enumerate(cumulative) if c >= t - 1e-12), None)
        reached[f"{round(t * 100)}%"] = hit
    return {
        "k": k,
        "rows": rows,
        "centered": True,
        "explained_variance_ratio": [float(r) for r in ratios],
        "cumulative": [float(c) for c in cumulative],
        "total_explained": float(cumulative[-1]),
        "smallest_k_reaching": reached,
    }


def choose_k(ratios: list[float], target: float) -> int:
    """The smallest k whose first k explained-variance ratios sum to at least target (all of them if
    none do: the fit's ratios are all there is)."""
    cumulative = np.cumsum(ratios)
    hit = np.flatnonzero(cumulative >= target - 1e-12)
    return int(hit[0]) + 1 if hit.size else len(ratios)


def k_choice(ratios: list[float], target: float, k: int) -> dict:
    """Why `--k auto:target` kept k components: the rule, the fit it was read from, the variance k and
    k - 1 components explain."""
    cumulative = np.cumsum(ratios)
    reached = float(cumulative[k - 1])
    below = float(cumulative[k - 2]) if k > 1 else 0.0
    return {
        "rule": f"auto:{target:g}",
        "variance_target": target,
        "fitted_components": len(ratios),
        "k": k,
        "explained": reached,
        "explained_by_k_minus_1": below,
        "why": (
            f"the smallest k whose components explain at least {100 * target:g} % of the variance: "
            f"{k} explain {100 * reached:.1f} %, {k - 1} explain {100 * below:.1f} %"
            if reached >= target - 1e-12
            else f"all {len(ratios)} components the data allows explain {100 * reached:.1f} %, "
            f"short of {100 * target:g} %"
        ),
    }


def reduce(cfg: ReduceConfig) -> Manifest:
    """Fit PCA on the embeddings under cfg.input (k components, or with cfg.variance_target as many as
    reach that share of the variance, from one fit), or with cfg.basis "keep" project them onto the basis
    the output already holds; write pca/, pca.csv, variance.json and the basis."""
    src, out = storage.normalize(cfg.input), storage.normalize(cfg.output)
    storage.check_access(read=src, write=out)
    emb, files = _embeddings(src)
    if not files:
        raise InputError(f"no embeddings (Parquet files) in {src}; run `m9 embed` first")
    contract.check_columns(REDUCE, src, files[0])
    lifecycle.check_not_a_file(out)
    if cfg.k is None and not (cfg.variance_target and 0 < cfg.variance_target <= 1):
        raise InputError("reduce needs --k N or --k auto:T with a share T above 0 and at most 1")
    if cfg.basis not in BASES:
        raise InputError(f"--basis {cfg.basis}: expected one of {', '.join(BASES)}")
    input_id = lifecycle.input_identity(src)
    with lease.hold(out, REDUCE.name):
        # --overwrite clears the folder, the basis with it: keep has nothing left to keep, and fits.
        kept = stored_basis(out, cfg) if cfg.basis == "keep" and not cfg.overwrite else None
        if cfg.basis == "refit" and not cfg.overwrite:
            _refuse_refit_over_kept(out)
        print_ = lifecycle.fingerprint(REDUCE, cfg, input_id, basis=kept.fitted_on if kept else input_id)
        # A kept basis updates in place: basis.npz stays until the manifest says the new output is whole.
        done = lifecycle.prepare(REDUCE, out, print_, cfg.overwrite, in_place=kept is not None)
        if done is not None:
            log.info("reduce: %s already holds this input's output with k=%s; skipping", out, done.details.get("k"))
            return done
        if kept is not None:
            return _keep(src, out, emb, print_, kept)
        return _fit(cfg, src, out, emb, print_, input_id)


@dataclass(frozen=True, kw_only=True)
class Basis:
    """A fitted PCA basis: an embedding x's coordinates are (x - mean) @ components (see project)."""

    #: The mean of the embeddings it was fitted on, (FEATURE_DIM,) float64.
    mean: np.ndarray
    #: The principal components as columns, (FEATURE_DIM, k) float64.
    components: np.ndarray
    #: Their explained-variance ratios on the embeddings they were fitted on, (k,) float64.
    ratios: np.ndarray
    #: The identity of the input it was fitted on (lifecycle.input_identity), and that input's path or URI.
    fitted_on: str
    fitted_input: str
    #: When it was fitted (UTC, ISO 8601), and on how many embeddings.
    fitted_at: str
    fitted_rows: int
    #: With --k auto: why the fit kept k components (k_choice).
    k_choice: dict | None = None

    @property
    def k(self) -> int:
        return int(self.components.shape[1])

    def to_bytes(self) -> bytes:
        facts = {name: getattr(self, name) for name in ("fitted_on", "fitted_input", "fitted_at", "fitted_rows")}
        buf = io.BytesIO()
        np.savez(
            buf,
            mean=self.mean,
            components=self.components,
            ratios=self.ratios,
            facts=np.array(json.dumps({**facts, "k_choice": self.k_choice}, sort_keys=True)),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Basis:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            facts = json.loads(str(z["facts"]))
            return cls(mean=z["mean"], components=z["components"], ratios=z["ratios"], **facts)

    def describe(self, kind: str) -> dict:
        """The basis as a manifest and variance.json record it: fitted here, or kept from an earlier fit."""
        return {
            "kind": kind,
            "file": BASIS_NAME,
            "fitted_on": self.fitted_on,
            "fitted_input": self.fitted_input,
            "fitted_at": self.fitted_at,
            "fitted_rows": self.fitted_rows,
        }


def read_basis(out: str) -> Basis | None:
    """The basis in a reduce output, or None when it has none."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(storage.join(out, BASIS_NAME))
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return Basis.from_bytes(f.read())


def _rule(k: int | None, target: float | None) -> str:
    return f"--k {k}" if k is not None else f"--k auto:{target:g}"


def stored_basis(out: str, cfg: ReduceConfig) -> Basis | None:
    """For --basis keep: the basis a finished or interrupted reduce output in out holds, or None when
    there is none (keep then fits, as refit does). Raises InputError when it was fitted with another --k:
    keeping it keeps its k."""
    made = _made(out)  # None for another stage's output too: prepare refuses it
    basis = read_basis(out) if made else None
    if made is None or basis is None:
        return None
    held, asked = (made.get("k"), made.get("variance_target")), (cfg.k, cfg.variance_target)
    if held != asked:
        raise InputError(
            f"--basis keep keeps the basis in {out}, fitted with {_rule(*held)} (k={basis.k}): "
            f"{_rule(*asked)} needs a new fit; pass {_rule(*held)} to keep it, or --basis refit --overwrite "
            f"to refit"
        )
    return basis


def _made(out: str) -> dict | None:
    """The fingerprint of the reduce output in out, finished or interrupted; None when there is none."""
    manifest = lifecycle.read_manifest(out)
    if manifest is not None:
        return manifest.fingerprint if manifest.stage == REDUCE.name else None
    return storage.read_json(storage.join(out, PENDING))


def _refuse_refit_over_kept(out: str) -> None:
    """A refit would replace a kept basis, fitted on an input that may be gone, for good: refuse it
    unless --overwrite says so."""
    made = _made(out)
    if made and made.get("basis") not in (None, made.get("input")) and read_basis(out) is not None:
        raise InputError(
            f"{out} holds coordinates on a basis kept with --basis keep (fitted on another input); pass "
            f"--basis keep to project onto it again, or --overwrite to refit and replace it"
        )


_META_COLUMNS = ("image_id", "path", "label", "split")


def _fit(cfg: ReduceConfig, src: str, out: str, emb: str, print_: dict, input_id: str) -> Manifest:
    """Fit, save the basis, project and write; returns the manifest."""
    started = time.perf_counter()
    with m9spark.session("m9-reduce", s3=storage.is_s3(src) or storage.is_s3(out)) as spark:
        m9spark.configure_s3(spark, emb, out)
        raw = spark.read.parquet(m9spark.read_uri(emb)).select(*_META_COLUMNS, "features")
        with spark_tasks(spark, "reduce", "covariance of the embeddings"):
            rows, mean, cov = covariance(raw, "features", FEATURE_DIM)
        if rows == 0:
            raise InputError(
                f"no embedded images in {src} to reduce: embed rejected every image (the reasons are in its errors/)"
            )
        limit = min(FEATURE_DIM, rows)
        if cfg.k is not None and not 1 <= cfg.k <= limit:
            raise InputError(
                f"--k {cfg.k} is out of range: it must be between 1 and {limit} "
                f"(the smaller of {FEATURE_DIM} features and {rows} embedded images)"
            )
        # --k auto: every component the data allows; the first k of them are the components a fit with k
        # would give (PCA's components are nested), so slice, don't refit.
        ratios, components = principal_components(cov, limit)
        fitted = ratios.tolist()
        if cfg.k is None:
            assert cfg.variance_target is not None, "reduce() refuses --k auto without a share"
            k = choose_k(fitted, cfg.variance_target)
            choice = k_choice(fitted, cfg.variance_target, k)
        else:
            k, choice = cfg.k, None
        basis = Basis(
            mean=mean,
            components=np.ascontiguousarray(components[:, :k], np.float64),
            ratios=np.asarray(fitted[:k], np.float64),
            fitted_on=input_id,
            fitted_input=src,
            fitted_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            fitted_rows=rows,
            k_choice=choice,
        )
        # Before the coordinates: an interrupted run leaves a whole basis or none (one atomic write).
        storage.write_bytes_atomic(storage.join(out, BASIS_NAME), basis.to_bytes())
        with spark_tasks(spark, "reduce", f"{rows} embeddings onto {k} components"):
            table = _write_pca(spark, raw, out, basis)
    report = variance_report(fitted[:k], k, rows)
    if choice:
        report["k_choice"] = choice
    return _finish(src, out, print_, table, report, basis, "fitted", started)


def _moments(batches, dim: int):
    """mapInArrow over one partition: a single row with the count, the sum and XᵀX of its vectors (float64)."""
    n, total, gram = 0, np.zeros(dim), np.zeros((dim, dim))
    for batch in batches:
        column = batch.column(0)
        if len(column) == 0:
            continue
        x = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float64)
        n += len(x)
        total += x.sum(axis=0)
        gram += x.T @ x  # one level-3 BLAS product per Arrow batch
    yield pa.record_batch(
        [pa.array([n]), pa.array([total.tobytes()]), pa.array([gram.tobytes()])], names=["n", "s", "g"]
    )


def covariance(frame, column: str, dim: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(rows, mean, sample covariance) of the vectors in frame's array column, in one scan of the input.

    Each partition sums its count, Σx and ΣxxT with numpy; the partial sums are added in a tree, so the
    driver never holds more than two dim×dim matrices at once, however many partitions there are.
    Spark ML's PCA needs three scans for the same (the mean for centering, the covariance, and m9's check
    of it) and computes the covariance one row at a time: on 70,000 synthetic 1280-d embeddings (AMD EPYC,
    2 cores, load ~10, `m9 reduce`'s Spark session) this took 26 s where scaler + PCA + check took 161 s.
    """

    def add(a, b):
        return a[0] + b[0], a[1] + b[1], a[2] + b[2]

    partials = frame.select(column).mapInArrow(lambda it: _moments(it, dim), "n long, s binary, g binary")
    n, total, gram = partials.rdd.map(
        lambda r: (r.n, np.frombuffer(r.s), np.frombuffer(r.g).reshape(dim, dim))
    ).treeReduce(add, depth=2)
    n = int(n)
    mean = total / max(n, 1)
    cov = (gram - n * np.outer(mean, mean)) / max(n - 1, 1)
    return n, mean, (cov + cov.T) / 2


def principal_components(cov: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(explained-variance ratios, components as columns) of the k largest eigenvalues of a covariance,
    by numpy's symmetric eigensolver (LAPACK syevd). Each component's sign is fixed so that its largest
    loading is positive: the same data gives the same coordinates, not their mirror image."""
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1][:k]
    values = np.clip(values, 0, None)
    total = values.sum()
    components = vectors[:, order]
    signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(components.shape[1])])
    components = components * np.where(signs == 0, 1, signs)
    return (values[order] / total if total > 0 else np.zeros(len(order))), components


def _keep(src: str, out: str, emb: str, print_: dict, basis: Basis) -> Manifest:
    """Project the embeddings onto the basis out already holds (no fit) and write; returns the manifest."""
    from pyspark.ml.functions import array_to_vector
    from pyspark.ml.stat import Summarizer
    from pyspark.sql import functions as F

    started = time.perf_counter()
    with m9spark.session("m9-reduce", s3=storage.is_s3(src) or storage.is_s3(out)) as spark:
        m9spark.configure_s3(spark, emb, out)
        raw = spark.read.parquet(m9spark.read_uri(emb)).select(*_META_COLUMNS, "features")
        rows = raw.count()
        if rows == 0:
            raise InputError(
                f"no embedded images in {src} to reduce: embed rejected every image (the reasons are in its errors/)"
            )
        with spark_tasks(spark, "reduce", f"{rows} embeddings onto the kept basis"):
            table = _write_pca(spark, raw, out, basis)
            # The share of this input's variance each kept component explains: its coordinates' variance
            # over the features' total variance (both sample variances).
            variances = raw.select(Summarizer.variance(array_to_vector(F.col("features"))).alias("v")).head()["v"]
    total = float(np.sum(variances.toArray()))
    coords = contract.vectors(table, PCA_COLUMN).astype(np.float64)
    spread = coords.var(axis=0, ddof=1) if rows > 1 else np.zeros(basis.k)
    ratios = (spread / total if total > 0 else np.zeros(basis.k)).tolist()
    report = variance_report(ratios, basis.k, rows)
    report["basis_note"] = (
        f"kept from a fit on {basis.fitted_rows} embeddings at {basis.fitted_at}: the ratios are the share of "
        f"this input's variance the kept components explain"
    )
    if basis.k_choice:
        report["k_choice"] = basis.k_choice
    return _finish(src, out, print_, table, report, basis, "kept", started)


def _write_pca(spark, raw, out: str, basis: Basis) -> pa.Table:
    """Write pca/ (the embeddings' coordinates on basis, by image_id) and return it as one Arrow table."""
    result = raw.select(*_META_COLUMNS, _project(basis)("features").alias(PCA_COLUMN)).orderBy("image_id")
    result.write.mode("overwrite").parquet(m9spark.spark_uri(storage.join(out, PCA_DIR)))
    fixed_size_pca(storage.join(out, PCA_DIR), basis.k)
    fs, path = storage.filesystem(storage.join(out, PCA_DIR))
    import pyarrow.parquet as pq

    return pq.read_table(path, filesystem=fs).sort_by("image_id")


def _finish(
    src: str, out: str, print_: dict, table: pa.Table, report: dict, basis: Basis, kind: str, started: float
) -> Manifest:
    """pca.csv, variance.json and the manifest, after pca/ and the basis."""
    k, rows = basis.k, table.num_rows
    _write_csv(storage.join(out, CSV_NAME), table, k)
    report["basis"] = basis.describe(kind)
    storage.write_json(storage.join(out, VARIANCE_NAME), report)
    choice = report.get("k_choice")
    log.info(
        "reduce: %d rows → %d components (%s basis) explaining %.1f %% of the variance%s",
        rows,
        k,
        kind,
        100 * report["total_explained"],
        f" ({choice['why']})" if choice else "",
    )
    details = {
        "k": k,
        "variance_target": print_.get("variance_target") if print_.get("k") is None else None,
        "k_choice": choice,
        "total_explained": report["total_explained"],
        "smallest_k_reaching": report["smallest_k_reaching"],
        "basis": report["basis"],
        "wall_s": round(time.perf_counter() - started, 2),
    }
    return lifecycle.write_manifest(
        out, Manifest(stage=REDUCE.name, input=src, fingerprint=print_, counts={"rows": rows}, details=details)
    )


def project(features: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Coordinates of embeddings (n, FEATURE_DIM) on a basis: (x - mean) @ components in float64, as
    float32. Row by row: a blocked matrix product may round a row differently with other rows beside it,
    so one image's coordinates would depend on which images share its batch; one product per row gives
    the same bits for the same embedding and basis on the same machine, in any run."""
    centered = np.asarray(features, np.float64) - mean
    coords = np.empty((len(centered), components.shape[1]), np.float32)
    for i, row in enumerate(centered):
        coords[i] = row @ components
    return coords


def _project(basis: Basis):
    """A pandas UDF: features (array<float>) → their coordinates on basis (array<float>), by project()."""
    import pandas as pd
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    mean, components = basis.mean, basis.components

    def coordinates(features):
        x = np.stack(features.to_numpy()) if len(features) else np.zeros((0, components.shape[0]))
        return pd.Series(list(project(x, mean, components)))

    # Real types, not this module's postponed (string) annotations: pandas_udf reads them to pick its kind.
    coordinates.__annotations__ = {"features": pd.Series, "return": pd.Series}
    # pyspark's stubs have no overload for this Spark 3 form (the UDF's kind read from its type hints).
    return F.pandas_udf(coordinates, T.ArrayType(T.FloatType()))  # type: ignore[call-overload]


def fixed_size_pca(folder: str, k: int) -> None:
    """Rewrite the Parquet files Spark wrote into pca/ with the components as FixedSizeList<float32, k>
    (contract.pca_schema): Spark writes arrays as variable-length lists. The same floats, bit for bit."""
    import pyarrow.parquet as pq

    schema = contract.pca_schema(k)
    for uri in storage.list_files(folder, ".parquet"):
        fs, path = storage.filesystem(uri)
        table = pq.read_table(path, filesystem=fs).cast(schema)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="snappy")
        storage.write_bytes_atomic(uri, buf.getvalue())
        name = uri.rsplit("/", 1)[-1]
        storage.remove(storage.join(folder, f".{name}.crc"))  # Hadoop's checksum of the file Spark wrote


def _write_csv(uri: str, table: pa.Table, k: int) -> None:
    """pca.csv with header image_id,path,label,split,pc_1..pc_k."""
    pcs = np.asarray(table.column("pca").to_pylist(), dtype=np.float32).reshape(-1, k)
    columns = {name: table.column(name) for name in ("image_id", "path", "label", "split")}
    columns.update({f"pc_{i + 1}": pa.array(pcs[:, i]) for i in range(k)})
    buf = io.BytesIO()
    pacsv.write_csv(pa.table(columns), buf, pacsv.WriteOptions(quoting_style="needed", quoting_header="none"))
    storage.write_bytes_atomic(uri, buf.getvalue())
