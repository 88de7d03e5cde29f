"""The knobs check: m9's fixed defaults (threads per actor, batch size, session options) against the best
setting the ceiling search found on this machine, timed alternately so load hits both alike."""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable

from m9.bench.ceiling import Setting, default_session, setting_of, time_setting
from m9.bench.config import KNOBS_TOLERANCE, BenchConfig
from m9.model.spec import ModelSpec


def default_setting(cfg: BenchConfig, model: ModelSpec) -> Setting:
    """What `m9 embed` runs on one local node of this machine: cfg.actors processes, the resource plan's
    threads each (embed.plan_resources, the one plan), cfg.batch_size, m9's session options."""
    from m9.stages.embed import plan_resources

    _, threads = plan_resources([float(os.cpu_count() or 1)], cfg.actors)
    return Setting(model, cfg.actors, threads, cfg.batch_size, default_session(model.runtime, threads))


def check_knobs(
    cfg: BenchConfig, model: ModelSpec, search: list[dict], contents: list, progress: Callable[[str], None]
) -> dict:
    """The `knobs` section of bench.json: the default setting, the search's best, each one's images/s (the
    median of cfg.knobs_rounds alternating runs, each batch decoded before its forward pass as the actors
    run) and default / best, which should be at least 1 - tolerance; forward_only_ratio beside it."""
    measured = [r for r in search if r["img_per_s"] is not None]
    runtime = model.runtime
    default = default_setting(cfg, model)
    # With nothing measured (a search of one setting) its one setting is the best.
    best = setting_of(max(search, key=lambda r: r["img_per_s"] or 0), model) if search else default
    sample = contents[: max(cfg.ceiling_images, max(default.batch_size, best.batch_size) * 2)]
    rates: dict[str, list[float | None]]  # None: a setting the search did not measure
    if best == default:
        method = "the search's best setting is m9's default"
        rate = max((r["img_per_s"] for r in measured if setting_of(r, model) == default), default=None)
        rates = {"default": [rate], "best": [rate]}
    elif cfg.knobs_rounds < 1:
        method = "the search's own rates (no knobs rounds)"
        found = [r["img_per_s"] for r in measured if setting_of(r, model) == default]
        top = max((r["img_per_s"] for r in measured), default=None)
        rates = {"default": [max(found)] if found else [None], "best": [top]}
    else:
        method = (
            f"default and best timed alternately, {cfg.knobs_rounds} rounds each over {len(sample)} images, each "
            f"batch decoded just before its forward pass as an embed actor does; medians"
        )
        rates = {"default": [], "best": [], "default_forward_only": [], "best_forward_only": []}
        for n in range(cfg.knobs_rounds):
            for name, setting in (("default", default), ("best", best)):
                # As the actors run: decode in series with the forward pass. A layout whose forward pass
                # is faster can lose here (one process × 2 spinning threads decodes on one core while
                # the other spins), so this is what m9's defaults are judged by.
                rates[name].append(round(time_setting(setting, sample, len(sample), with_decode=True), 2))
                rates[f"{name}_forward_only"].append(round(time_setting(setting, sample, len(sample)), 2))
                progress(
                    f"  knobs round {n + 1}/{cfg.knobs_rounds}: {name} {rates[name][-1]:.1f} images/s with decode, "
                    f"{rates[f'{name}_forward_only'][-1]:.1f} forward only"
                )
    default_rate, best_rate = _median(rates["default"]), _median(rates["best"])
    ratio = round(default_rate / best_rate, 3) if default_rate and best_rate else None
    forward_ratio = None
    if rates.get("default_forward_only"):
        default_forward, best_forward = _median(rates["default_forward_only"]), _median(rates["best_forward_only"])
        assert default_forward is not None and best_forward is not None  # every round timed both
        forward_ratio = round(default_forward / best_forward, 3)
    sessions = None
    if runtime == "onnx" and cfg.knobs_rounds >= 1:
        sessions = session_options_at_default(default, sample, cfg.knobs_rounds)
        progress(
            f"  knobs: session options at {default.threads} thread(s): default / best {sessions['default_over_best']}"
        )
    return {
        "runtime": runtime,
        "precision": model.precision,
        "default": default.row(),
        "best": best.row(),
        "default_img_per_s": default_rate,
        "best_img_per_s": best_rate,
        "rates": rates,
        "ratio": ratio,
        # The same two settings on forward passes alone (inputs decoded up front), as the ceiling ranks them.
        "forward_only_ratio": forward_ratio,
        "tolerance": KNOBS_TOLERANCE,
        "within_tolerance": None if ratio is None else bool(ratio >= 1 - KNOBS_TOLERANCE),
        "method": method,
        # ONNX Runtime's session options at the default's own thread count, in this process
        # (m9.model.ort.defaults_vs_best), beside the ceiling's search of them at the best layout.
        "sessions_at_default_threads": sessions,
    }


def _median(rates: list[float | None]) -> float | None:
    """The median of the rates, or None when one of them was not measured."""
    measured = [r for r in rates if r is not None]
    return statistics.median(measured) if len(measured) == len(rates) else None


def bound_rate(cfg: BenchConfig, model: ModelSpec, contents: list, progress: Callable[[str], None]) -> dict:
    """The decode bound on `model` where no knobs check ran for it: m9's default setting timed as the knobs
    check times it (each batch decoded just before its forward pass, cfg.knobs_rounds runs over the same
    sample), the median images/s and every run's."""
    default = default_setting(cfg, model)
    sample = contents[: max(cfg.ceiling_images, default.batch_size * 2)]
    rates = []
    for n in range(cfg.knobs_rounds):
        rates.append(round(time_setting(default, sample, len(sample), with_decode=True), 2))
        progress(f"  decode bound ({model.precision}) round {n + 1}/{cfg.knobs_rounds}: {rates[-1]:.1f} images/s")
    return {
        "runtime": model.runtime,
        "precision": model.precision,
        "img_per_s": statistics.median(rates) if rates else None,
        "rates": rates,
        "timed_by": f"m9 bench, {cfg.knobs_rounds} round(s) over {len(sample)} images, the median",
    }


#: Seconds each session setting runs per round in the in-process comparison of session options.
SESSION_SECONDS = 2.0


def session_options_at_default(default: Setting, contents: list, rounds: int) -> dict:
    """m9's session options against every alternative at the default's threads and batch, in this process."""
    from m9.model import ort
    from m9.model.decode import decode_many

    inputs, _ = decode_many(contents, default.model.decode_memory_mb)
    model_bytes = default.model.checked_data()
    return ort.defaults_vs_best(model_bytes, default.threads, inputs, default.batch_size, rounds, SESSION_SECONDS)
