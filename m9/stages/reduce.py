"""Reduce: Spark ML PCA of the embeddings (of the centered data), as Parquet, CSV and a variance report."""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from m9.config import FEATURE_DIM, VARIANCE_THRESHOLDS, ReduceConfig
from m9.engines import spark as m9spark
from m9.errors import InputError
from m9.io import lease, storage
from m9.stages import contract
from m9.stages.contract import CSV_NAME, EMBEDDINGS, PCA_DIR, REDUCE, VARIANCE_NAME, Manifest
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
    reach that share of the variance, from one fit); write pca/, pca.csv, variance.json."""
    src, out = storage.normalize(cfg.input), storage.normalize(cfg.output)
    storage.check_access(read=src, write=out)
    emb, files = _embeddings(src)
    if not files:
        raise InputError(f"no embeddings (Parquet files) in {src}; run `m9 embed` first")
    contract.check_columns(REDUCE, src, files[0])
    contract.check_not_a_file(out)
    if cfg.k is None and not (cfg.variance_target and 0 < cfg.variance_target <= 1):
        raise InputError("reduce needs --k N or --k auto:T with a share T above 0 and at most 1")
    print_ = contract.fingerprint(REDUCE, cfg, contract.input_identity(src))
    with lease.hold(out, REDUCE.name):
        done = contract.prepare(REDUCE, out, print_, cfg.overwrite)
        if done is not None:
            log.info("reduce: %s already holds this input's output with k=%s; skipping", out, done.details.get("k"))
            return done
        return _fit(cfg, src, out, emb, print_)


def _fit(cfg: ReduceConfig, src: str, out: str, emb: str, print_: dict) -> Manifest:
    """Fit, project and write; returns the manifest."""
    from pyspark.ml.feature import PCA, StandardScaler, VectorSlicer
    from pyspark.ml.functions import array_to_vector, vector_to_array
    from pyspark.sql import functions as F

    auto = cfg.k is None
    started = time.perf_counter()
    with m9spark.session("m9-reduce", s3=storage.is_s3(src) or storage.is_s3(out)) as spark:
        m9spark.configure_s3(spark, emb, out)
        frame = spark.read.parquet(m9spark.read_uri(emb)).select(
            "image_id", "path", "label", "split", array_to_vector(F.col("features")).alias("features")
        )
        rows = frame.count()
        if rows == 0:
            raise InputError(
                f"no embedded images in {src} to reduce: embed rejected every image (the reasons are in its errors/)"
            )
        limit = min(FEATURE_DIM, rows)
        if not auto and not 1 <= cfg.k <= limit:
            raise InputError(
                f"--k {cfg.k} is out of range: it must be between 1 and {limit} "
                f"(the smaller of {FEATURE_DIM} features and {rows} embedded images)"
            )
        # Spark's PCAModel.transform does not center; m9's components are those of the centered data.
        scaler = StandardScaler(inputCol="features", outputCol="centered", withMean=True, withStd=False).fit(frame)
        centered = scaler.transform(frame)
        with spark_tasks(spark, "reduce", f"PCA of {rows} embeddings"):
            # --k auto: one fit with every component the data allows; the first k of them are the
            # components a fit with k would give (PCA's components are nested), so slice, don't refit.
            model = PCA(k=limit if auto else cfg.k, inputCol="centered", outputCol="pca_all").fit(centered)
            fitted = model.explainedVariance.toArray().tolist()
            exact = exact_components(centered, scaler.std.toArray(), np.asarray(fitted))
            if exact is not None:
                fitted = exact[0].tolist()
            k = choose_k(fitted, cfg.variance_target) if auto else cfg.k
            if exact is None:
                sliced = VectorSlicer(inputCol="pca_all", outputCol="pca_vec", indices=list(range(k)))
                projected = sliced.transform(model.transform(centered)).select(
                    "image_id", "path", "label", "split", vector_to_array("pca_vec", "float32").alias("pca")
                )
            else:
                projected = centered.select(
                    "image_id",
                    "path",
                    "label",
                    "split",
                    _project(exact[1][:, :k])(vector_to_array("centered")).alias("pca"),
                )
            result = projected.orderBy("image_id")
            result.write.mode("overwrite").parquet(m9spark.spark_uri(storage.join(out, PCA_DIR)))
            table = pa.Table.from_pandas(
                spark.read.parquet(m9spark.read_uri(storage.join(out, PCA_DIR))).orderBy("image_id").toPandas(),
                preserve_index=False,
            )
    fixed_size_pca(storage.join(out, PCA_DIR), k)
    _write_csv(storage.join(out, CSV_NAME), table, k)
    report = variance_report(fitted[:k], k, rows)
    choice = k_choice(fitted, cfg.variance_target, k) if auto else None
    if choice:
        report["k_choice"] = choice
    storage.write_json(storage.join(out, VARIANCE_NAME), report)
    log.info(
        "reduce: %d rows → %d components explaining %.1f %% of the variance%s",
        rows,
        k,
        100 * report["total_explained"],
        f" ({choice['why']})" if choice else "",
    )
    details = {
        "k": k,
        "variance_target": cfg.variance_target if auto else None,
        "k_choice": choice,
        "total_explained": report["total_explained"],
        "smallest_k_reaching": report["smallest_k_reaching"],
        "wall_s": round(time.perf_counter() - started, 2),
    }
    return contract.write_manifest(
        out, Manifest(stage=REDUCE.name, input=src, fingerprint=print_, counts={"rows": rows}, details=details)
    )


#: How far Spark ML's explained-variance ratios may be from an eigendecomposition of the same covariance
#: before m9 uses the latter: float64 rounding moves them by ~1e-12; a wrong SVD by whole percents.
PCA_CHECK_TOLERANCE = 1e-6


def exact_components(centered, std: np.ndarray, spark_ratios: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """None when Spark ML's PCA is right; else the (ratios, components) of an eigendecomposition of the
    covariance Spark computes, to use in its place.

    Spark ML's PCA diagonalises the covariance matrix with LAPACK's dgesdd. Without a system LAPACK,
    Spark's netlib falls back to a pure-Java translation, whose dgesdd returns wrong singular values on
    some rank-deficient covariances (fewer images than 1,280 features): on the bundled sample's ONNX
    features it reports 70.8 % of the variance in 50 components where numpy (and Spark with Debian's
    liblapack3) gives 83.7 %. The covariance itself is right, so m9 checks Spark's result against numpy's
    eigh of it (1280×1280, well under a second) and warns when it has to replace it.
    """
    from pyspark.ml.stat import Correlation

    corr = Correlation.corr(centered, "centered").head()[0].toArray()
    cov = np.nan_to_num(corr) * np.outer(std, std)  # constant features: correlation NaN, covariance 0
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    values = np.clip(values[order], 0, None)
    ratios = values / values.sum()
    k = len(spark_ratios)
    if np.abs(spark_ratios - ratios[:k]).max() <= PCA_CHECK_TOLERANCE:
        return None
    log.warning(
        "reduce: Spark ML's PCA disagrees with its own covariance matrix (top component %.4f, not %.4f): "
        "Spark is using its pure-Java LAPACK, whose SVD fails on this matrix; m9 uses numpy's "
        "eigendecomposition of the same covariance instead. Installing the system LAPACK (Debian: "
        "liblapack3) lets Spark compute it itself.",
        spark_ratios[0],
        ratios[0],
    )
    return ratios[:k], vectors[:, order[:k]]


def _project(components: np.ndarray):
    """A pandas UDF: centered features (array<double>) → their coordinates on the components (array<float>)."""
    import pandas as pd
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    def project(features):
        x = np.stack(features.to_numpy()) if len(features) else np.zeros((0, components.shape[0]))
        return pd.Series(list((x @ components).astype(np.float32)))

    # Real types, not this module's postponed (string) annotations: pandas_udf reads them to pick its kind.
    project.__annotations__ = {"features": pd.Series, "return": pd.Series}
    return F.pandas_udf(project, T.ArrayType(T.FloatType()))


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
