"""Reduce: PCA of the embeddings (of the centered data; the covariance in one Spark scan, its eigenvectors by
numpy), as Parquet, CSV, a variance report and the fitted basis, which a changed input can be projected onto
instead of refitting (`--basis keep`)."""

from __future__ import annotations

import datetime as dt
import io
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from m9.config import BASES, FEATURE_DIM, ReduceConfig
from m9.engines import spark as m9spark
from m9.errors import InputError
from m9.io import lease, storage
from m9.stages import contract, lifecycle
from m9.stages.contract import BASIS_NAME, CSV_NAME, EMBEDDINGS, PCA_COLUMN, PCA_DIR, PENDING, REDUCE, VARIANCE_NAME
from m9.stages.lifecycle import Manifest
from m9.stages.pca import (
    Basis,
    choose_k,
    covariance,
    k_choice,
    principal_components,
    projection_udf,
    read_basis,
    variance_report,
)
from m9.ui.progress import spark_tasks

log = logging.getLogger(__name__)


def _embeddings(src: str) -> tuple[str, list[str]]:
    """The embeddings folder and its Parquet files: an embed output's embeddings/, or src itself."""
    inner = storage.join(src, EMBEDDINGS)
    files = storage.list_files(inner, ".parquet")
    return (inner, files) if files else (src, storage.list_files(src, ".parquet"))


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
    # Each part sorted by image_id, parts as the input's partitions: a global orderBy would add a sampling
    # job and a shuffle (1.5 against 0.8 s for 4,150 embeddings, both timed twice in one Spark session, AMD
    # EPYC, 2 cores, 2026-12-04), and the table returned is sorted here anyway.
    result = raw.select(*_META_COLUMNS, projection_udf(basis)("features").alias(PCA_COLUMN)).sortWithinPartitions(
        "image_id"
    )
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
