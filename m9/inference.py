"""Embed: a fixed pool of Ray actors, each loading MobileNetV2 once, turns ingested images into features."""

from __future__ import annotations

import functools
import io
import logging
import math
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m9 import contract, engine_ray, lease, quiet, storage
from m9 import weights as m9weights
from m9.config import DEFAULT_DECODE_MEMORY, DEFAULT_RUNTIME, FEATURE_DIM, PREPROCESS_VERSION, RUNTIMES, EmbedConfig
from m9.contract import EMBED, EMBEDDINGS, ERRORS, Manifest
from m9.errors import InputError, TooManyRejectedError
from m9.progress import StageProgress

log = logging.getLogger(__name__)

#: CPUs each Ray Data read task claims. Small, so that read tasks always find room beside actors that
#: together claim the rest: a 2-CPU machine whose actors claim whole CPUs starves the reads and hangs.
READ_TASK_CPUS = 0.25

#: CPUs kept free of actor claims, on the largest node, so two read tasks can always run beside the
#: actors (a 2-CPU machine whose two actors claim a whole CPU each never starts reading and hangs).
#: Claims are bookkeeping, not limits: the actors' model threads (ONNX Runtime or TensorFlow) still use
#: every core.
READ_RESERVE_CPUS = 2 * READ_TASK_CPUS

#: Work items hold this many batches' worth of rows: enough to keep an actor's batches full, few enough
#: that a 2-actor machine has several items per 1,000-image shard to share out.
SLICE_BATCHES = 4

EMBEDDINGS_SCHEMA = EMBED.writes[EMBEDDINGS]
ERRORS_SCHEMA = EMBED.writes[ERRORS]

#: Where images are decoded and resized: "actor", inside the actor just before its forward pass; or
#: "stage", in the Ray Data tasks that read the rows, so that what reaches the actors is 224×224×3 uint8
#: pixels (150 KB) instead of the file. Measured back to back on 2 cores (README "Big images"): the actor
#: was faster on both 12-MP photos (26.1 vs 9.9 images/s) and 100×100 images (60.8 vs 25.6): on 2 cores
#: the read tasks' 0.5 CPU claim leaves two decoders, and 150 KB arrays cost more to move than a 3 KB JPEG.
DECODE_IN = "actor"


class EmbedActor:
    """Ray Data callable class: one model per actor, built in __init__ on the worker, never pickled.

    runtime "onnx": the model's bytes come from the driver (Ray's object store, `model`), which converted
    and checked them; the actor checks their sha256 and needs neither TensorFlow nor a cache of its own.
    runtime "keras": the weights file, or the verified cache fetched on this worker when weights_path is None.
    """

    def __init__(
        self,
        weights_path: str | None,
        threads: int,
        batch_size: int,
        runtime: str = DEFAULT_RUNTIME,
        model=None,
        model_sha256: str | None = None,
        decode_memory_mb: int = DEFAULT_DECODE_MEMORY,
    ):
        from m9.model import Embedder

        if runtime == "onnx":
            import ray

            model_bytes = model if isinstance(model, bytes) else ray.get(model)
            self.embedder = Embedder(
                runtime="onnx",
                threads=threads,
                batch_size=batch_size,
                model_bytes=model_bytes,
                expected_sha256=model_sha256,
            )
        else:
            path = weights_path or str(m9weights.fetch())
            self.embedder = Embedder(
                path, runtime="keras", threads=threads, batch_size=batch_size, verify=weights_path is None
            )
        self.decode_memory_mb = decode_memory_mb
        engine_ray.record_model_load()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from m9.decode import decode_many, to_input
        from m9.model import place

        if "pixels" in batch:  # decoded by the read tasks (DECODE_IN = "stage")
            errors = [e or None for e in batch["error"]]
            inputs = to_input(np.asarray(batch["pixels"])[[e is None for e in errors]])
        else:
            inputs, errors = decode_many(list(batch["content"]), self.decode_memory_mb)
        features = place(self.embedder.forward(inputs), errors)
        return {
            "image_id": batch["image_id"],
            "path": batch["path"],
            "label": batch["label"],
            "split": batch["split"],
            "shard": batch["shard"],
            "features": features,
            "error": np.array([e or "" for e in errors], dtype=object),
        }


def part_name(shard_uri: str) -> str:
    """The output file name for an input shard: its own name, so a re-run can tell which shards are done."""
    return PurePosixPath(shard_uri.replace("\\", "/")).name


def plan_resources(node_cpus: list[float], actors: int) -> tuple[float, int]:
    """(CPUs each actor claims, model threads each runs) so that `actors` actors fit on these nodes; the
    threads are ONNX Runtime's intra-op threads or TensorFlow's, whichever runtime the actors run.

    Ray places whole actors on nodes, so the claim must fit the nodes as they are, not the cluster's total:
    on EMR's 2-CPU master and two 4-CPU core nodes, 4 actors claiming (10 - 1) / 4 = 2.25 CPUs would fit one
    per node and leave the fourth waiting. The largest claim that fits every actor is taken, after
    READ_RESERVE_CPUS on the largest node; each actor then runs about as many threads as it claims CPUs.
    """
    free = sorted((float(n) for n in node_cpus if n > 0), reverse=True) or [1.0]
    free[0] = max(free[0] - READ_RESERVE_CPUS, 0.0)

    def fits(claim: float) -> bool:
        return sum(math.floor(n / claim + 1e-9) for n in free) >= actors

    candidates = [n / k for n in free if n > 0 for k in range(1, actors + 1)]
    claim = max((c for c in candidates if fits(c)), default=0.01)
    claim = max(0.01, math.floor(claim * 1000) / 1000)  # round down: a rounded-up claim may no longer fit
    return claim, max(1, round(claim))


class _ShardWriter:
    """Collects embedded rows per input shard and commits a shard's two files once all its rows are in."""

    def __init__(self, output: str, expected: dict[str, int]):
        self.output, self.expected = output, expected
        self.rows: dict[str, list[dict]] = defaultdict(list)
        self.ids: dict[str, set] = defaultdict(set)
        self.seen: dict[str, int] = defaultdict(int)
        self.committed: set[str] = set()
        self.embedded = self.rejected = self.duplicates = 0

    def add(self, shard: str, batch: dict[str, np.ndarray], rows: np.ndarray) -> None:
        # Ray retries the task of an actor that died; rows it had already returned may come again. Keep
        # the first copy of each image (the model is deterministic, so both copies hold the same features).
        ids = self.ids[shard]
        fresh = []
        for row, image_id in zip(rows, batch["image_id"][rows]):
            if shard in self.committed or image_id in ids:
                self.duplicates += 1
                continue
            ids.add(image_id)
            fresh.append(row)
        if not fresh:
            return
        self.rows[shard].append({k: v[fresh] for k, v in batch.items()})
        self.seen[shard] += len(fresh)
        if self.seen[shard] == self.expected[shard]:
            self._commit(shard)
        elif self.seen[shard] > self.expected[shard]:
            raise RuntimeError(f"shard {shard}: {self.seen[shard]} rows returned for {self.expected[shard]}")

    def _commit(self, shard: str) -> None:
        parts = self.rows.pop(shard)
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(cols["image_id"].astype(str), kind="stable")
        cols = {k: v[order] for k, v in cols.items()}
        ok = cols["error"] == ""
        meta = {k: [None if v is None else str(v) for v in cols[k]] for k in ("image_id", "path", "label", "split")}
        features = np.asarray(cols["features"], dtype=np.float32).reshape(-1, FEATURE_DIM)
        good = pa.table(
            {
                **{k: pa.array([v for v, keep in zip(vals, ok) if keep], pa.string()) for k, vals in meta.items()},
                "features": pa.FixedSizeListArray.from_arrays(pa.array(features[ok].ravel()), FEATURE_DIM).cast(
                    pa.list_(pa.float32())
                ),
            },
            schema=EMBEDDINGS_SCHEMA,
        )
        bad = pa.table(
            {
                **{k: pa.array([v for v, keep in zip(vals, ok) if not keep], pa.string()) for k, vals in meta.items()},
                "error": pa.array([str(e) for e in cols["error"][~ok]], pa.string()),
            },
            schema=ERRORS_SCHEMA,
        )
        name = part_name(shard)
        # errors/ first, embeddings/ last: a shard counts as done only when its embeddings file exists.
        _write_table(storage.join(self.output, ERRORS, name), bad)
        _write_table(storage.join(self.output, EMBEDDINGS, name), good)
        self.committed.add(shard)
        self.ids.pop(shard, None)
        self.embedded += good.num_rows
        self.rejected += bad.num_rows


def _write_table(uri: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy")
    storage.write_bytes_atomic(uri, buf.getvalue())


def _count_rows(uris: list[str]) -> dict[str, int]:
    counts = {}
    for uri in uris:
        fs, path = storage.filesystem(uri)
        counts[uri] = pq.ParquetFile(path, filesystem=fs).metadata.num_rows
    return counts


def plan_slices(uris: list[str], max_rows: int) -> list[dict]:
    """Work items of at most max_rows rows: one per Parquet row group, cut further when a group is larger.

    Ray Data would hand a whole small file to one actor; slicing by row group lets every actor work from
    the first second, and keeps each read small (m9 ingest writes row groups of ROW_GROUP_BYTES).
    """
    items = []
    for uri in uris:
        fs, path = storage.filesystem(uri)
        meta = pq.ParquetFile(path, filesystem=fs).metadata
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            for start in range(0, rows, max_rows):
                items.append({"shard": uri, "row_group": group, "start": start, "stop": min(rows, start + max_rows)})
    return items


def read_slices(
    items: dict[str, np.ndarray], s3: storage.S3Settings | None = None, decode_memory_mb: int | None = None
) -> dict[str, np.ndarray]:
    """Ray Data task: read the rows a batch of work items names (image bytes and their metadata); with
    decode_memory_mb, decode them too: `pixels` (n, 224, 224, 3) uint8 and `error` replace `content`.

    s3 carries the driver's S3 settings: a Ray worker's environment is its node's, not the driver's.
    """
    tables = []
    for shard, group, start, stop in zip(items["shard"], items["row_group"], items["start"], items["stop"]):
        fs, path = storage.filesystem(str(shard), s3)
        table = pq.ParquetFile(path, filesystem=fs).read_row_group(int(group), columns=list(EMBED.needs))
        table = table.slice(int(start), int(stop) - int(start))
        tables.append(table.append_column("shard", pa.array([str(shard)] * table.num_rows, pa.string())))
    table = pa.concat_tables(tables)
    if decode_memory_mb is None:
        return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    from m9.decode import decode_many_pixels
    from m9.model import place

    pixels, errors = decode_many_pixels(table.column("content").to_pylist(), decode_memory_mb)
    table = table.drop_columns(["content"])
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    return {**columns, "pixels": place(pixels, errors), "error": np.array([e or "" for e in errors], dtype=object)}


def _prepare_resume(out: str, src: str, shards: list[str]) -> None:
    """Make an unfinished embed output safe to resume: drop temporary files a killed run left behind, and
    refuse one that holds shards this input does not have (another input's unfinished output)."""
    import pyarrow.fs as pafs

    names = {part_name(s) for s in shards}
    for sub in (EMBEDDINGS, ERRORS):
        fs, path = storage.filesystem(storage.join(out, sub))
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
            if ".tmp-" in info.base_name:
                log.info("embed: removing %s, left by an interrupted run", info.path)
                fs.delete_file(info.path)
            elif sub == EMBEDDINGS and info.base_name not in names:
                raise InputError(
                    f"{out} holds embeddings of {info.base_name}, which is not in {src}: it is the unfinished "
                    f"output of another input; choose another output folder or pass --overwrite to replace it"
                )


def check_rejections(result: Manifest, max_errors: int | float | None, output: str) -> Manifest:
    """Return result, or raise TooManyRejectedError when more images were rejected than max_errors allows
    (a count, or a fraction of the images in)."""
    counts = result.counts
    if max_errors is None:
        return result
    limit = max_errors if isinstance(max_errors, int) else max_errors * counts["rows_in"]
    if counts["rejected"] > limit:
        raise TooManyRejectedError(
            f"{counts['rejected']} of {counts['rows_in']} images were rejected (more than --max-errors "
            f"{max_errors}); reasons in {storage.join(output, ERRORS)}",
            result,
        )
    return result


def _summarize(out: str, shards: list[str]) -> dict[str, int]:
    """Rows committed in embeddings/ and errors/ for the given shards."""
    names = [part_name(s) for s in shards]
    embedded = sum(_count_rows([storage.join(out, EMBEDDINGS, n) for n in names]).values())
    error_files = [storage.join(out, ERRORS, n) for n in names]
    rejected = sum(_count_rows([e for e in error_files if storage.exists(e)]).values())
    return {"embedded": embedded, "rejected": rejected}


def embed_batches(
    shards: list[str],
    actors: int,
    batch_size: int,
    weights_path: str | None,
    runtime: str = DEFAULT_RUNTIME,
    decode_memory_mb: int = DEFAULT_DECODE_MEMORY,
) -> Iterator[dict[str, np.ndarray]]:
    """The embed pipeline on the connected Ray: a fixed actor pool over the shards' rows; yields embedded
    batches (EmbedActor's columns) as they finish. `m9 embed` writes them; `m9 bench` times them.

    weights_path: for "keras" a weights file (None: the verified cache, on each worker); for "onnx" an
    .onnx file m9 converted, or a Keras file to convert, or None for the verified conversion."""
    import ray

    actor_cpus, threads = plan_resources(engine_ray.node_cpus(), actors)
    model_kwargs: dict = {"weights_path": weights_path, "runtime": runtime}
    if runtime == "onnx":
        if not (weights_path and str(weights_path).endswith(".onnx")):
            weights_path = str(m9weights.resolve(weights_path, "onnx"))
        # Read and checked once here; the actors share one copy per node from the object store, so a
        # worker node needs neither its own conversion (TensorFlow, tf2onnx) nor a cache.
        model_bytes = m9weights.read_onnx(weights_path)
        model_kwargs.update(
            weights_path=None, model=ray.put(model_bytes), model_sha256=m9weights.onnx_sha256(weights_path)
        )
    ctx = ray.data.DataContext.get_current()
    # m9 shows its own progress (m9.progress); Ray Data's bars only with `m9 -v`, on a terminal.
    ctx.enable_progress_bars = quiet.verbose() and sys.stderr.isatty()
    ctx.execution_options.preserve_order = False
    items = plan_slices(shards, SLICE_BATCHES * batch_size)
    ds = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(
            read_slices,
            fn_kwargs={
                "s3": storage.current_settings(),
                "decode_memory_mb": decode_memory_mb if DECODE_IN == "stage" else None,
            },
            batch_size=1,
            num_cpus=READ_TASK_CPUS,
            batch_format="numpy",
        )
        .map_batches(
            EmbedActor,
            fn_constructor_kwargs={
                **model_kwargs,
                "threads": threads,
                "batch_size": batch_size,
                "decode_memory_mb": decode_memory_mb,
            },
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=actor_cpus,
            batch_size=batch_size,
            batch_format="numpy",
        )
    )
    log.info(
        "embed: %d shards (%d slices), %s, %d actors × %d threads (%.3g CPUs each), batch %d",
        len(shards),
        len(items),
        runtime,
        actors,
        threads,
        actor_cpus,
        batch_size,
    )
    yield from ds.iter_batches(batch_format="numpy", batch_size=None)


def fingerprint(cfg: EmbedConfig, src: str) -> dict:
    """Everything that determines embed's output for cfg (see m9.contract)."""
    return contract.fingerprint(
        EMBED,
        cfg,
        contract.input_identity(src),
        weights=m9weights.identity(cfg.weights),
        preprocess=PREPROCESS_VERSION,
    )


def embed(cfg: EmbedConfig) -> Manifest:
    """Embed every ingested image under cfg.input into cfg.output/embeddings, failures into errors/."""
    src, out = storage.normalize(cfg.input), storage.normalize(cfg.output)
    if cfg.actors < 1:
        raise InputError("--actors must be at least 1")
    if cfg.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    if cfg.runtime not in RUNTIMES:
        raise InputError(f"--runtime {cfg.runtime}: expected one of {', '.join(RUNTIMES)}")
    if cfg.decode_memory_mb < 1:
        raise InputError("--decode-memory must be at least 1 (MB)")
    storage.check_access(read=src, write=out)
    shards = storage.list_files(src, ".parquet")
    if not shards:
        raise InputError(f"no Parquet files in {src}; run `m9 ingest` first")
    contract.check_columns(EMBED, src, shards[0])
    contract.check_not_a_file(out)
    print_ = fingerprint(cfg, src)
    with lease.hold(out, EMBED.name):
        # Another input's unfinished output is refused before the pending record marks it as ours.
        check = functools.partial(_prepare_resume, out, src, shards)
        done = contract.prepare(EMBED, out, print_, cfg.overwrite, before_start=check)
        if done is not None:
            log.info("embed: %s already holds this input's output; skipping", out)
            return check_rejections(done, cfg.max_errors, out)
        return check_rejections(_run(cfg, src, out, shards, print_), cfg.max_errors, out)


def _run(cfg: EmbedConfig, src: str, out: str, shards: list[str], print_: dict) -> Manifest:
    import ray

    pending = [s for s in shards if not storage.exists(storage.join(out, EMBEDDINGS, part_name(s)))]
    expected = _count_rows(pending)
    rows_in = sum(_count_rows(shards).values())
    # On the driver, before Ray starts: fail fast with one clear line if no weights can be had, and convert
    # (once per cache) what the onnx runtime needs, so the actors never need TensorFlow.
    weights_path = str(m9weights.resolve(cfg.weights, cfg.runtime)) if cfg.weights or cfg.runtime == "onnx" else None
    if weights_path is None:
        m9weights.fetch()
    started = time.perf_counter()
    loads: list = []
    if pending:
        with engine_ray.connect(cfg.ray_address):
            writer = _ShardWriter(out, expected)
            counter = engine_ray.start_load_counter()
            batches = embed_batches(
                pending, cfg.actors, cfg.batch_size, weights_path, cfg.runtime, cfg.decode_memory_mb
            )
            what = f"embedding with {cfg.actors} actors ({cfg.runtime})"
            with StageProgress("embed", what, sum(expected.values()), counters={"shards": len(pending)}) as shown:
                for batch in batches:
                    batch_shards = batch.pop("shard")
                    for shard in np.unique(batch_shards):
                        writer.add(str(shard), batch, np.flatnonzero(batch_shards == shard))
                    shown.update(len(batch_shards), shards=len(writer.committed))
            loads = ray.get(counter.get.remote())
            if writer.duplicates:
                log.info("embed: %d re-delivered rows (from retried tasks) dropped", writer.duplicates)
            if writer.rows:
                missing = {part_name(s): expected[s] - writer.seen[s] for s in writer.rows}
                raise RuntimeError(f"embed finished with incomplete shards: {missing}")
    counts = _summarize(out, shards)
    counts.update(
        rows_in=rows_in,
        shards=len(shards),
        shards_skipped=len(shards) - len(pending),
        model_loads=len(loads),
        model_load_nodes=len({node for node, _ in loads}),
    )
    if counts["embedded"] + counts["rejected"] != rows_in:
        raise RuntimeError(
            f"embed lost rows: {rows_in} in, {counts['embedded']} embedded + {counts['rejected']} rejected"
        )
    wall = time.perf_counter() - started
    log.info(
        "embed: %d embedded, %d rejected, %d model loads, %.1f s",
        counts["embedded"],
        counts["rejected"],
        len(loads),
        wall,
    )
    details = {
        "actors": cfg.actors,
        "batch_size": cfg.batch_size,
        "runtime": cfg.runtime,
        "decode_memory_mb": cfg.decode_memory_mb,
        "wall_s": round(wall, 2),
    }
    if cfg.runtime == "onnx":
        details["onnx_sha256"] = m9weights.onnx_sha256(weights_path)
    return contract.write_manifest(
        out, Manifest(stage=EMBED.name, input=src, fingerprint=print_, counts=counts, details=details)
    )
