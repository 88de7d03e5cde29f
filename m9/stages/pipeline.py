"""Run: ingest → embed → reduce → evaluate → report in a row, each stage's output in its own folder under one
workdir."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from m9.config import DEFAULT_WORKDIR, EmbedConfig, IngestConfig, ReduceConfig
from m9.errors import InputError, TooManyRejectedError
from m9.io import storage
from m9.stages.contract import RUN_RECORD, STAGES
from m9.stages.lifecycle import Manifest

log = logging.getLogger(__name__)


def sample_dir() -> str:
    """The bundled Fruits-360-like sample (Training/ and Test/ of 48 fruits, vegetables and nuts)."""
    return str(resources.files("m9") / "sample")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What `m9 run` reads and where it works; each stage's own settings (its config's fields other than
    input, output and overwrite) in `settings`, by stage name.

    Each stage's input and output come from the workdir's layout (m9.stages.contract: images/, embed/,
    reduce/ …), and overwrite from this config's: stage_configs() builds the stage configs from them.
    """

    input: str
    workdir: str = DEFAULT_WORKDIR
    overwrite: bool = False
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.settings) - set(self.stage_types())
        if unknown:
            raise TypeError(f"RunConfig.settings: no stage {', '.join(sorted(unknown))}")
        self.stage_configs()  # a setting no stage config has is a TypeError now, not later

    @staticmethod
    def stage_types() -> dict[str, type]:
        """The config type of each stage `m9 run` runs with settings of its own."""
        return {"ingest": IngestConfig, "embed": EmbedConfig, "reduce": ReduceConfig}

    def stage_dir(self, name: str) -> str:
        """The folder of stage `name` (ingest, embed, reduce …) under the workdir."""
        return storage.join(storage.normalize(self.workdir), STAGES[name].folder)

    def stage_configs(self) -> tuple[IngestConfig, EmbedConfig, ReduceConfig]:
        images, embedded, reduced = (self.stage_dir(n) for n in ("ingest", "embed", "reduce"))

        def settings(name: str) -> dict[str, Any]:
            return {**self.settings.get(name, {}), "overwrite": self.overwrite}

        return (
            IngestConfig(input=self.input, output=images, **settings("ingest")),
            EmbedConfig(input=images, output=embedded, **settings("embed")),
            ReduceConfig(input=embedded, output=reduced, **settings("reduce")),
        )


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """What `m9 run` did: each stage's manifest and wall time, in order."""

    workdir: str
    stages: dict[str, Manifest]
    wall_s: dict[str, float]
    #: evaluate.json's content, when the images had labels to score.
    evaluation: dict | None = None
    #: The report.html written at the end.
    report: str | None = None


def _record(cfg: RunConfig, workdir: str, results: dict[str, Manifest], timings: dict[str, float]) -> None:
    """Write the run's own record (timings, machine) for the report; the stages' manifests hold the rest.
    A stage reused from an earlier run keeps the wall time the record gave it then (the time its output
    took); when every stage was reused the earlier record stays as it is, so the report is reused too."""
    uri = storage.join(workdir, RUN_RECORD)
    earlier = storage.read_json(uri)
    reused = {name for name, manifest in results.items() if manifest.skipped}
    if earlier is not None and reused == set(results):
        return
    before = (earlier or {}).get("wall_s", {})
    wall = {name: before.get(name, t) if name in reused else t for name, t in timings.items()}
    record = {"input": storage.normalize(cfg.input), "wall_s": wall, "reused": sorted(reused)}
    from m9.stages.report import machine

    storage.write_json(uri, {**record, "machine": machine()})


def run(cfg: RunConfig) -> RunResult:
    """Every stage in a row; returns each stage's manifest and wall time, evaluate's result and the report.

    With too many rejected images (the embed config's max_errors) every stage still runs;
    TooManyRejectedError then carries the same result.
    """
    from m9.engines import spark as m9spark
    from m9.stages.embed import embed
    from m9.stages.ingest import ingest
    from m9.stages.reduce import reduce

    ingest_cfg, embed_cfg, reduce_cfg = cfg.stage_configs()
    stages: list[tuple[str, Callable[[Any], Manifest], Any]] = [
        ("ingest", ingest, ingest_cfg),
        ("embed", embed, embed_cfg),
        ("reduce", reduce, reduce_cfg),
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
    # Duplicates and leakage from the features (faiss, no Spark), before evaluate leaves leaked images out.
    from m9.neighbors.duplicates import DuplicatesConfig, duplicates

    started = time.perf_counter()
    results["duplicates"] = duplicates(
        DuplicatesConfig(input=cfg.stage_dir("embed"), output=cfg.stage_dir("duplicates"), overwrite=cfg.overwrite)
    )
    timings["duplicates"] = round(time.perf_counter() - started, 2)
    # Evaluate when the folders give labels to score (it says why not otherwise); no Spark needed.
    from m9.stages import evaluate as evaluate_stage
    from m9.stages import report

    workdir = storage.normalize(cfg.workdir)
    evaluation = None
    started = time.perf_counter()
    try:
        evaluate_cfg = evaluate_stage.EvaluateConfig(
            input=cfg.stage_dir("reduce"),
            output=cfg.stage_dir("evaluate"),
            decode_memory_mb=embed_cfg.decode_memory_mb,  # the raw-pixel baseline decodes within embed's budget
            overwrite=cfg.overwrite,
        )
        results["evaluate"] = evaluate_stage.evaluate(evaluate_cfg)
        evaluation = evaluate_stage.result(evaluate_cfg.output)
        timings["evaluate"] = round(time.perf_counter() - started, 2)
    except InputError as exc:
        log.info("evaluate skipped: %s", exc)
    _record(cfg, workdir, results, timings)
    started = time.perf_counter()
    results["report"] = report.report(workdir, overwrite=cfg.overwrite)
    timings["report"] = round(time.perf_counter() - started, 2)
    page = report.page(workdir)
    result = RunResult(workdir=workdir, stages=results, wall_s=timings, evaluation=evaluation, report=page)
    if too_many is not None:
        raise TooManyRejectedError(str(too_many), result)
    return result
