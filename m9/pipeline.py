"""Run: ingest → embed → reduce in a row, each stage's output in its own folder under one workdir."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from importlib import resources

from m9 import storage
from m9.config import (
    DEFAULT_ACTORS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_IMAGES_PER_FILE,
    DEFAULT_K,
    DEFAULT_WORKDIR,
    EmbedConfig,
    IngestConfig,
    ReduceConfig,
)
from m9.errors import TooManyRejectedError

log = logging.getLogger(__name__)

#: Stage folders under the workdir.
IMAGES, EMBED, REDUCE = "images", "embed", "reduce"


def sample_dir() -> str:
    """The bundled Fruits-360-like sample (Training/ and Test/ of 48 fruits, vegetables and nuts)."""
    return str(resources.files("m9") / "sample")


@dataclass(frozen=True)
class RunConfig:
    """What `m9 run` reads, where it works, and the knobs it passes to the stages."""

    input: str
    workdir: str = DEFAULT_WORKDIR
    actors: int = DEFAULT_ACTORS
    k: int = DEFAULT_K
    batch_size: int = DEFAULT_BATCH_SIZE
    images_per_file: int = DEFAULT_IMAGES_PER_FILE
    ray_address: str | None = None
    weights: str | None = None
    overwrite: bool = False
    #: Rejected images tolerated (a count or a fraction); the run still writes everything, then fails.
    max_errors: int | float | None = None

    def stage_dir(self, name: str) -> str:
        return storage.join(storage.normalize(self.workdir), name)


def run(cfg: RunConfig) -> dict:
    """All three stages; returns each stage's manifest and wall time.

    With too many rejected images (cfg.max_errors) every stage still runs; TooManyRejectedError then
    carries the same result.
    """
    from m9 import spark as m9spark
    from m9.inference import embed
    from m9.ingest import ingest
    from m9.reduce import reduce

    stages = [
        ("ingest", ingest, IngestConfig(cfg.input, cfg.stage_dir(IMAGES), cfg.images_per_file, cfg.overwrite)),
        (
            "embed",
            embed,
            EmbedConfig(
                cfg.stage_dir(IMAGES),
                cfg.stage_dir(EMBED),
                cfg.actors,
                cfg.batch_size,
                cfg.ray_address,
                cfg.weights,
                cfg.overwrite,
                cfg.max_errors,
            ),
        ),
        ("reduce", reduce, ReduceConfig(cfg.stage_dir(EMBED), cfg.stage_dir(REDUCE), cfg.k, cfg.overwrite)),
    ]
    timings, results = {}, {}
    too_many: TooManyRejectedError | None = None
    # A missing bucket or refused credentials must show before the JVM starts, not after.
    storage.check_access(read=storage.normalize(cfg.input), write=storage.normalize(cfg.workdir))
    started = time.perf_counter()
    # One Spark session for ingest and reduce: starting the JVM twice would cost seconds for nothing.
    with m9spark.session("m9-run", s3=storage.is_s3(cfg.input) or storage.is_s3(cfg.workdir)):
        timings["spark_startup"] = round(time.perf_counter() - started, 2)
        for name, stage_fn, stage_cfg in stages:
            started = time.perf_counter()
            try:
                results[name] = stage_fn(stage_cfg)
            except TooManyRejectedError as exc:  # reduce the images that did embed, then fail
                results[name], too_many = exc.result, exc
            timings[name] = round(time.perf_counter() - started, 2)
            log.info("%s done in %.1f s", name, timings[name])
    result = {"workdir": storage.normalize(cfg.workdir), "stages": results, "wall_s": timings}
    if too_many is not None:
        raise TooManyRejectedError(str(too_many), result)
    return result
