"""Embed: a fixed pool of Ray actors, each loading MobileNetV2 once, turns ingested images into features."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m9.config import FEATURE_DIM, EmbedConfig
from m9.engines import ray_pool
from m9.errors import EngineError, InputError, TooManyRejectedError, first_line
from m9.io import lease, storage
from m9.model.spec import ModelSpec, resolve_model
from m9.stages import contract, lifecycle, reuse
from m9.stages.contract import EMBED, EMBEDDINGS, ERRORS
from m9.stages.lifecycle import Manifest
from m9.ui.progress import StageProgress

log = logging.getLogger(__name__)

#: Work items in flight per actor: one running and one queued behind it, so an actor starts its next item
#: the moment it finishes one instead of idling while the driver hears back and sends another.
IN_FLIGHT_PER_ACTOR = 2

#: Work items hold this many batches' worth of rows: enough to keep an actor's batches full, few enough
#: that a 2-actor machine has several items per 1,000-image shard to share out.
SLICE_BATCHES = 4

#: Times Ray restarts an actor whose process died (out of memory, killed, a crash in a native library);
#: a restarted actor loads the model again and Ray re-runs the item it was on. An image that kills every
#: actor that touches it stops the run after this many restarts, naming its shard.
ACTOR_RESTARTS = 3

EMBEDDINGS_SCHEMA = EMBED.writes[EMBEDDINGS]
ERRORS_SCHEMA = EMBED.writes[ERRORS]

#: Calls an actor runs at once. 1: an actor reads and decodes an item, then forwards it, in series. 2 would
#: overlap one item's decode with another's forward pass (a lock keeps forwards in series); measured on 2
#: cores (README "Big images"), it gained nothing where every core already runs an actor, and a second
#: decoded item in memory per actor.
ACTOR_CONCURRENCY = 1


class EmbedActor:
    """One model per Ray actor, built in __init__ on its worker, never pickled. An actor reads the rows of the
    work items it is given straight from storage, decodes them and runs the model: what travels between
    processes is a work item's name (file, row groups) and the features that come back, not the images.

    model: the ModelSpec resolved on the driver (passed as an ObjectRef, so Ray's object store holds one
    copy per node); the actor confirms its bytes' sha256 and needs no cache of its own, nor TensorFlow on
    the onnx runtime. s3 carries the driver's S3 settings: a Ray worker's environment is its node's.
    """

    def __init__(self, model: ModelSpec, threads: int, batch_size: int, s3: storage.S3Settings | None = None):
        import threading

        from m9.model.embedder import Embedder

        self.embedder = Embedder(model, threads=threads, batch_size=batch_size)
        self.s3 = s3
        self._forward_lock = threading.Lock()  # forwards in series even when calls overlap (ACTOR_CONCURRENCY)
        ray_pool.record_model_load()

    def embed_item(self, item: dict) -> dict[str, np.ndarray]:
        """Read a work item's rows (plan_slices), decode and embed them: embed_rows's columns. An item with
        `rows` (indices inside it: those a feature store lacks, m9.stages.reuse) embeds only those."""
        rows = self._read(item)
        if "rows" in item:
            rows = {name: column[item["rows"]] for name, column in rows.items()}
        return self.embed_rows(rows) | {"shard": np.full(len(rows["image_id"]), item["shard"])}

    def embed_rows(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows (EMBED.needs columns) → their metadata, features (zeros where the image failed) and error
        ("" for an embedded image)."""
        from m9.model.embedder import place

        inputs, errors = self.embedder.decode(list(rows["content"]))
        with self._forward_lock:
            features = self.embedder.forward(inputs)
        return {
            "image_id": rows["image_id"],
            "path": rows["path"],
            "label": rows["label"],
            "split": rows["split"],
            "features": place(features, errors),
            "error": np.array([e or "" for e in errors], dtype=object),
        }

    def _read(self, item: dict) -> dict[str, np.ndarray]:
        fs, path = storage.filesystem(item["shard"], self.s3)
        table = pq.ParquetFile(path, filesystem=fs).read_row_groups(item["row_groups"], columns=list(EMBED.needs))
        table = table.slice(item["start"], item["stop"] - item["start"])
        return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def part_name(shard_uri: str) -> str:
    """The output file name for an input shard: its own name, so a re-run can tell which shards are done."""
    return PurePosixPath(shard_uri.replace("\\", "/")).name


def plan_resources(node_cpus: list[float], actors: int) -> tuple[float, int]:
    """(CPUs each actor claims, model threads each runs) so that `actors` actors fit on these nodes; the
    threads are ONNX Runtime's intra-op threads or TensorFlow's, whichever runtime the actors run.

    Ray places whole actors on nodes, so the claim must fit the nodes as they are, not the cluster's total:
    on EMR's two 4-CPU core nodes and a 2-CPU one, 4 actors claiming 10 / 4 = 2.5 CPUs would fit one per
    node and leave the fourth waiting. The largest claim that fits every actor is taken; each actor then
    runs about as many threads as it claims CPUs. The actors do all the work (read, decode, forward), so
    nothing else needs a claim beside them.
    """
    free = sorted((float(n) for n in node_cpus if n > 0), reverse=True) or [1.0]

    def fits(claim: float) -> bool:
        return sum(math.floor(n / claim + 1e-9) for n in free) >= actors

    candidates = [n / k for n in free for k in range(1, actors + 1)]
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
                "features": pa.FixedSizeListArray.from_arrays(pa.array(features[ok].ravel()), FEATURE_DIM),
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
    """Work items of max_rows consecutive rows of one file (the file's last may be shorter), each naming the
    row groups it overlaps: {"shard", "row_groups", "start", "stop"}, rows start:stop of those groups read
    together.

    A whole small file to one actor would leave the others idle; items of a few batches let every actor work
    from the first second and keep each read small (m9 ingest writes row groups of ROW_GROUP_BYTES: about 100
    thumbnails, or 4 phone photos). Items cut across row groups rather than at them, so every batch but a
    file's last is full: cut at 100-row groups, every fourth item held 4 rows, a quarter-full forward pass.
    """
    items = []
    for uri in uris:
        fs, path = storage.filesystem(uri)
        meta = pq.ParquetFile(path, filesystem=fs).metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        firsts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)  # firsts[g]: the file's row where group g starts
        for start in range(0, int(firsts[-1]), max_rows):
            stop = min(int(firsts[-1]), start + max_rows)
            groups = [g for g in range(len(sizes)) if firsts[g] < stop and firsts[g + 1] > start]
            offset = int(firsts[groups[0]])
            items.append({"shard": uri, "row_groups": groups, "start": start - offset, "stop": stop - offset})
    return items


def _prepare_resume(out: str, src: str, shard_rows: Callable[[], dict[str, int]], ours: bool) -> None:
    """Make an unfinished embed output safe to resume or update: drop temporary files a killed run left
    behind, and the output (embeddings/ and errors/) of every shard the input no longer has, or whose rows
    it no longer matches; the output of every other shard is kept. ours: the folder records a run of this
    stage (a manifest or a pending record); a folder that records none but holds shards this input does not
    have is refused, untouched (it may be the unfinished output of another input). shard_rows: the rows of
    each input shard, by URI."""
    import pyarrow.fs as pafs

    rows = {part_name(s): n for s, n in shard_rows().items()}
    found: dict[str, dict[str, str]] = {EMBEDDINGS: {}, ERRORS: {}}
    for sub in (EMBEDDINGS, ERRORS):
        fs, path = storage.filesystem(storage.join(out, sub))
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
            if ".tmp-" in info.base_name:
                log.info("embed: removing %s, left by an interrupted run", info.path)
                fs.delete_file(info.path)
            elif info.type == pafs.FileType.File:
                found[sub][info.base_name] = storage.join(out, sub, info.base_name)
    stale = sorted(n for n in found[EMBEDDINGS] if n not in rows)
    if stale and not ours:
        raise InputError(
            f"{out} holds embeddings of {stale[0]}, which is not in {src}: it is the unfinished "
            f"output of another input; choose another output folder or pass --overwrite to replace it"
        )
    done = [n for n in found[EMBEDDINGS] if n in rows]
    counted = _count_rows([found[EMBEDDINGS][n] for n in done] + [found[ERRORS][n] for n in done if n in found[ERRORS]])
    for name in done:
        held = counted[found[EMBEDDINGS][name]] + counted.get(found[ERRORS].get(name, ""), 0)
        if held != rows[name]:
            stale.append(name)  # the same name, other rows: computed again
    for name in sorted(set(stale) | {n for n in found[ERRORS] if n not in rows}):
        log.info("embed: removing the output of %s, which the input no longer has", name)
        for sub in (EMBEDDINGS, ERRORS):
            if name in found[sub]:
                storage.remove(found[sub][name])


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
    shards: list[str], actors: int, batch_size: int, model: ModelSpec, items: list[dict] | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """The embed pipeline on the connected Ray: a fixed pool of `actors` EmbedActors, each loading the model
    (resolved once on the driver, resolve_model) once, given work items (plan_slices of the shards, unless
    given) as they finish the previous ones; yields each item's embedded rows (EmbedActor.embed_item's
    columns) as it finishes. `m9 embed` writes them; `m9 bench` times them."""
    import ray

    actor_cpus, threads = plan_resources(ray_pool.node_cpus(), actors)
    # One copy per node in the object store; Ray hands each actor the value itself.
    model_ref = ray.put(model)
    items = plan_slices(shards, SLICE_BATCHES * batch_size) if items is None else items
    log.info(
        "embed: %d shards (%d work items), %s, %d actors × %d threads (%.3g CPUs each), batch %d",
        len(shards),
        len(items),
        f"{model.runtime} {model.precision}",
        actors,
        threads,
        actor_cpus,
        batch_size,
    )
    remote = ray.remote(EmbedActor).options(
        num_cpus=actor_cpus,
        max_concurrency=ACTOR_CONCURRENCY,
        # A dead actor's process is started again (the model loaded again) and Ray re-runs the calls it
        # had: its item and the one queued behind it. Nothing comes back twice.
        max_restarts=ACTOR_RESTARTS,
        max_task_retries=ACTOR_RESTARTS,
    )
    pool = [
        remote.remote(model_ref, threads=threads, batch_size=batch_size, s3=storage.current_settings())
        for _ in range(actors)
    ]
    try:
        yield from _share_out(pool, items)
    finally:
        for actor in pool:
            # Ray types ActorClass.remote() as `ActorHandle | type[EmbedActor]` (so that method calls
            # type-check); what it returns is an ActorHandle, which ray.kill takes.
            ray.kill(actor)  # type: ignore[arg-type]


def _share_out(pool: list, items: list[dict]) -> Iterator[dict[str, np.ndarray]]:
    """Give each actor IN_FLIGHT_PER_ACTOR items and another each time one finishes; yield the results.
    An actor Ray could not restart (ACTOR_RESTARTS spent) leaves the pool, and its items go to the others;
    with no actor left the run stops with the last actor's error."""
    import ray
    from ray.exceptions import RayActorError

    queue = list(reversed(items))  # popped from the end: first items first
    running: dict = {}  # ObjectRef → (actor, item)
    alive = list(pool)

    def top_up() -> None:
        for actor in alive:
            busy = sum(a is actor for a, _ in running.values())
            for _ in range(IN_FLIGHT_PER_ACTOR - busy):
                if queue:
                    item = queue.pop()
                    running[actor.embed_item.remote(item)] = (actor, item)

    top_up()
    while running:
        [ref], _ = ray.wait(list(running), num_returns=1)
        actor, item = running.pop(ref)
        try:
            result = ray.get(ref)
        except RayActorError as exc:
            queue.append(item)
            if actor in alive:
                alive.remove(actor)
                log.warning("embed: an actor died and could not be restarted; %d left", len(alive))
            if not alive:
                raise EngineError(
                    f"every embed actor died (last on a work item of {part_name(item['shard'])}): {first_line(exc)}"
                ) from None
        else:
            yield result
        top_up()


def fingerprint(cfg: EmbedConfig, src: str, model: ModelSpec) -> dict:
    """Everything that determines embed's output for cfg and its resolved model (see m9.stages.contract):
    the model's identity stands for the config's weights, runtime, precision and decode budget."""
    return lifecycle.fingerprint(EMBED, cfg, lifecycle.input_identity(src), **model.identity())


def embed(cfg: EmbedConfig, model: ModelSpec | None = None) -> Manifest:
    """Embed every ingested image under cfg.input into cfg.output/embeddings, failures into errors/.
    model: the model resolved for cfg (resolve_model), or None to resolve it here, once."""
    src, out = storage.normalize(cfg.input), storage.normalize(cfg.output)
    if cfg.actors < 1:
        raise InputError("--actors must be at least 1")
    if cfg.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    if cfg.decode_memory_mb < 1:
        raise InputError("--decode-memory must be at least 1 (MB)")
    storage.check_access(read=src, write=out)
    store = reuse.resolve_store(cfg.store, out)
    storage.check_access(read=store, write=store)  # the store may be under another prefix's rights
    shards = storage.list_files(src, ".parquet")
    if not shards:
        raise InputError(f"no Parquet files in {src}; run `m9 ingest` first")
    contract.check_columns(EMBED, src, shards[0])
    lifecycle.check_not_a_file(out)
    # On the driver, before Ray starts: fail fast with one clear line if no model can be had, and convert
    # (once per cache) what the onnx runtime needs, so the actors never need TensorFlow.
    if model is None:
        model = resolve_model(
            runtime=cfg.runtime, weights=cfg.weights, precision=cfg.precision, decode_memory_mb=cfg.decode_memory_mb
        )
    print_ = fingerprint(cfg, src, model)
    with lease.hold(out, EMBED.name):
        # A folder that records no run of this stage but holds other shards is refused before the pending
        # record marks it as ours; in one that does, the output of shards the input no longer has goes.
        ours = lifecycle.read_manifest(out) is not None or storage.exists(storage.join(out, contract.PENDING))
        # Each shard's footer read once, and only if the stage runs (on S3 a request each).
        shard_rows = functools.cache(lambda: _count_rows(shards))
        check = functools.partial(_prepare_resume, out, src, shard_rows, ours)
        done = lifecycle.prepare(EMBED, out, print_, cfg.overwrite, before_start=check, in_place=True)
        if done is not None:
            log.info("embed: %s already holds this input's output; skipping", out)
            return check_rejections(done, cfg.max_errors, out)
        return check_rejections(_run(cfg, src, out, shards, shard_rows(), print_, model), cfg.max_errors, out)


def _run(
    cfg: EmbedConfig, src: str, out: str, shards: list[str], rows: dict[str, int], print_: dict, model: ModelSpec
) -> Manifest:
    """Embed what the output lacks; rows: each shard's rows, by URI."""
    import ray

    pending = [s for s in shards if not storage.exists(storage.join(out, EMBEDDINGS, part_name(s)))]
    expected = {s: rows[s] for s in pending}
    rows_in = sum(rows.values())
    started = time.perf_counter()
    loads: list = []
    store = reuse.open_store(reuse.resolve_store(cfg.store, out), model.identity())
    computed = reused = 0
    if pending:
        items = plan_slices(pending, SLICE_BATCHES * cfg.batch_size)
        plan = reuse.Reuse(store, pending, items) if store else None
        to_run = plan.items if plan else items
        # Everything found in the store: no Ray, no model loads.
        with ray_pool.connect(cfg.ray_address) if to_run else contextlib.nullcontext():
            writer = _ShardWriter(out, expected)
            counter = ray_pool.start_load_counter() if to_run else None
            batches = embed_batches(pending, cfg.actors, cfg.batch_size, model, to_run) if to_run else iter(())
            batches = plan.batches(batches) if plan else batches
            what = f"embedding with {cfg.actors} actors ({model.runtime}, {model.precision})"
            with StageProgress("embed", what, sum(expected.values()), counters={"shards": len(pending)}) as shown:
                for batch in batches:
                    batch_shards = batch.pop("shard")
                    for shard in np.unique(batch_shards):
                        writer.add(str(shard), batch, np.flatnonzero(batch_shards == shard))
                    shown.update(len(batch_shards), shards=len(writer.committed))
            loads = ray.get(counter.get.remote()) if counter else []
            if writer.duplicates:
                log.info("embed: %d re-delivered rows (from retried tasks) dropped", writer.duplicates)
            if writer.rows:
                missing = {part_name(s): expected[s] - writer.seen[s] for s in writer.rows}
                raise RuntimeError(f"embed finished with incomplete shards: {missing}")
        computed = plan.computed if plan else sum(expected.values())
        reused = sum(expected.values()) - computed
    counts = _summarize(out, shards)
    counts.update(
        rows_in=rows_in,
        shards=len(shards),
        shards_skipped=len(shards) - len(pending),
        model_loads=len(loads),
        model_load_nodes=len({node for node, _ in loads}),
        computed=computed,
        reused=reused,
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
        "runtime": model.runtime,
        "precision": model.precision,
        "decode_memory_mb": model.decode_memory_mb,
        "wall_s": round(wall, 2),
        "model": model.describe(),
        "store": {"uri": store.folder, "identity": store.digest} if store else None,
    }
    if model.runtime == "onnx":
        details["onnx_sha256"] = model.sha256
    return lifecycle.write_manifest(
        out, Manifest(stage=EMBED.name, input=src, fingerprint=print_, counts=counts, details=details)
    )
