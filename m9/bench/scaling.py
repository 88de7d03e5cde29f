"""Scaling: the `ray` engine at several input sizes, so per-image cost and memory can be seen flat in N."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from m9.bench.config import BenchConfig
from m9.bench.inputs import load_rows, take, write_input
from m9.bench.machine import machine_facts
from m9.bench.run import Models, measure
from m9.errors import InputError
from m9.stages import lifecycle

log = logging.getLogger(__name__)


def scaling(cfg: BenchConfig, sizes: list[int], progress: Callable[[str], None] = log.info) -> dict:
    """The `ray` engine at each size: per-image cost and peak memory, so flatness in N can be seen."""
    if not sizes or min(sizes) < 1:
        raise InputError("--scaling takes positive image counts, e.g. 1000,4000,16000")
    lifecycle.check_not_a_file(cfg.output)
    machine = machine_facts()
    models = Models(cfg)
    work = Path(tempfile.mkdtemp(prefix="m9-scaling-"))
    rows = []
    try:
        table = load_rows(cfg.input, work)
        for n in sizes:
            part = take(table, n)
            input_dir = write_input(part, work / f"input-{n}")
            progress(f"scaling: ray engine on {n} images …")
            result, _ = measure("ray", cfg, input_dir, part, progress, models, keep_features=False)
            rows.append(
                {
                    "images": n,
                    "wall_s": result["wall_s"],
                    "wall_ms_per_image": round(1000 * result["wall_s"] / n, 2),
                    "steady_ms_per_image": round(1000 / result["steady_img_per_s"], 2),
                    "cpu_ms_per_image": round(1000 * result["cpu_s"] / n, 2),
                    "steady_img_per_s": result["steady_img_per_s"],
                    "first_row_s": result["first_row_s"],
                    "peak_rss_mb": result["peak_rss_mb"],
                    "cpu_util": result["cpu_util"],
                }
            )
            progress(
                f"scaling: {n} images: {rows[-1]['steady_ms_per_image']:.2f} ms/image steady, "
                f"{rows[-1]['wall_ms_per_image']:.2f} ms/image end to end, peak RSS "
                f"{result['peak_rss_mb']:.0f} MB"
            )
            shutil.rmtree(input_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    steady = [r["steady_ms_per_image"] for r in rows]
    spread = (max(steady) - min(steady)) / (sum(steady) / len(steady))
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out = {
        "machine": machine,
        "engine": "ray",
        "knobs": {"actors": cfg.actors, "batch_size": cfg.batch_size},
        "sizes": rows,
        "steady_cost_spread": round(spread, 3),
    }
    folder = Path(cfg.output)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scaling.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "| images | steady ms/image | end-to-end ms/image | CPU ms/image | wall s | first row s | peak RSS MB "
        "| CPU % |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['images']} | {r['steady_ms_per_image']:.2f} | {r['wall_ms_per_image']:.2f} | "
        f"{r['cpu_ms_per_image']:.2f} | {r['wall_s']:.1f} | {r['first_row_s']:.1f} | {r['peak_rss_mb']:.0f} "
        f"| {100 * r['cpu_util']:.0f} |"
        for r in rows
    ]
    lines += ["", f"Steady per-image cost spread (max − min) / mean: {100 * spread:.1f} %."]
    (folder / "scaling.md").write_text("\n".join(lines) + "\n")
    return out
