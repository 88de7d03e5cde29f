"""Engine `ray`: `m9 embed`'s own pipeline (embed.embed_batches), timed as its batches arrive."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from m9.bench.config import BenchConfig, Outcome
from m9.config import FEATURE_DIM
from m9.io import storage
from m9.model.spec import ModelSpec


def run_ray(cfg: BenchConfig, input_dir: str, table: pa.Table, model: ModelSpec, keep_features: bool = True) -> Outcome:
    """`m9 embed`'s own pipeline (embed.embed_batches on a fixed actor pool) on the resolved model, batches
    kept in memory."""
    import ray

    from m9.engines import ray_pool
    from m9.stages.embed import embed_batches, plan_resources

    ids: list[str] = []
    done: list[float] = []
    feats: list[np.ndarray] = []
    with ray_pool.connect(None):
        counter = ray_pool.start_load_counter()
        for batch in embed_batches(storage.list_files(input_dir, ".parquet"), cfg.actors, cfg.batch_size, model):
            now = time.time()
            ids.extend(str(i) for i in batch["image_id"])
            done.extend([now] * len(batch["image_id"]))
            if keep_features:
                feats.append(np.asarray(batch["features"], dtype=np.float32).reshape(-1, FEATURE_DIM))
        loads = len(ray.get(counter.get.remote()))
        ray.kill(counter)
        actor_cpus, threads = plan_resources(ray_pool.node_cpus(), cfg.actors)
    return Outcome(
        ids,
        np.array(done),
        np.concatenate(feats) if feats else None,
        loads,
        {
            "runtime": model.runtime,
            "precision": model.precision,
            "actors": cfg.actors,
            "threads_per_actor": threads,
            "actor_cpus": actor_cpus,
            "batch_size": cfg.batch_size,
            "arrow_batch_size": None,
        },
    )
