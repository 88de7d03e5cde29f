"""bench.md and bench.json: the engine table with ratios, the targets, the knobs check, the ceiling search
and the machine it ran on."""

from __future__ import annotations

import json
from pathlib import Path

from m9.bench.chart import chart

#: The ratios the runtime issue sets for `ray` (m9 embed's default path): (engine, at least).
TARGETS = (("spark-udf-defaults", 1.8), ("ceiling", 0.95), ("spark-udf-onnx", 1.0))


def _ratio(value: float, ref: dict | None) -> str:
    if not ref or not ref.get("steady_img_per_s"):
        return "–"
    return f"{value / ref['steady_img_per_s']:.2f}"


def _knobs(knobs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in knobs.items() if v is not None)


def targets(result: dict) -> list[dict]:
    """`ray`'s steady rate over each target engine's, beside the bar; only for engines that ran."""
    eng = result["engines"]
    if "ray" not in eng:
        return []
    out = []
    for other, bar in TARGETS:
        if other in eng and eng[other]["steady_img_per_s"]:
            ratio = eng["ray"]["steady_img_per_s"] / eng[other]["steady_img_per_s"]
            out.append({"over": other, "ratio": round(ratio, 3), "at_least": bar, "met": bool(ratio >= bar)})
    return out


#: The engines a decode bound is for, `m9 embed`'s pipeline on Ray: `ray` (at --precision) and `ray-int8`.
BOUND_ENGINES = ("ray", "ray-int8")

#: What a decode bound times.
BOUND_WHAT = "m9's default layout, bare model, each batch decoded just before its forward pass"


def knobs_bound(knobs: dict | None) -> dict | None:
    """The bound the knobs check measured: its default setting's rate with decode, on its runtime and precision
    (None from the search's rates alone, which have no decode)."""
    if not knobs or knobs.get("forward_only_ratio") is None or not knobs.get("default_img_per_s"):
        return None
    return {
        "runtime": knobs.get("runtime"),
        "precision": knobs.get("precision", "fp32"),
        "img_per_s": knobs["default_img_per_s"],
        "rates": (knobs.get("rates") or {}).get("default"),
        "timed_by": "the knobs check",
    }


def bounds_missing(result: dict, wanted: dict[str, tuple[str, str]]) -> list[tuple[str, str]]:
    """(runtime, precision) of each BOUND_ENGINES engine that ran (wanted: engine → its runtime and precision)
    that the knobs check gave no bound for: the ones bench times itself (m9.bench.knobs.bound_rate)."""
    bound = knobs_bound(result.get("knobs"))
    have = {(bound["runtime"], bound["precision"])} if bound else set()
    out: list[tuple[str, str]] = []
    for name in BOUND_ENGINES:
        if name in result["engines"] and wanted[name] not in have and wanted[name] not in out:
            out.append(wanted[name])
    return out


def decode_bound(result: dict, timed: list[dict] | tuple = ()) -> dict | None:
    """Per precision a BOUND_ENGINES engine ran at: each such engine against the most an engine that decodes on
    the model's cores can do here, the bare model on m9's default layout with each batch decoded before its
    forward pass (the ceiling's own timing, plus the decode every engine pays and the ceiling does not),
    timed by the knobs check for its precision and by bench (`timed`, knobs.bound_rate) for the others.
    None without both numbers for any precision."""
    bounds: dict[str, dict] = {}
    for bound in (knobs_bound(result.get("knobs")), *timed):
        if bound:
            bounds.setdefault(bound["precision"], bound)
    out: dict = {}
    for name in BOUND_ENGINES:
        engine = result["engines"].get(name)
        knobs = (engine or {}).get("knobs") or {}
        bound = bounds.get(knobs.get("precision", "fp32"))
        if not (engine and bound and bound["img_per_s"]) or bound["runtime"] != knobs.get("runtime"):
            continue
        entry = out.setdefault(bound["precision"], {**bound, "over_bound": {}, "what": BOUND_WHAT})
        entry["over_bound"][name] = round(engine["steady_img_per_s"] / bound["img_per_s"], 3)
    for entry in out.values():
        # `ray` if it ran at this precision, else ray-int8 (`ray` on the int8 model).
        entry["ray_over_bound"] = next(iter(entry["over_bound"].values()))
    return out or None


def bounds_by_precision(result: dict) -> dict:
    """bench.json's decode_bound by precision; a bench.json written before there was one per precision holds
    `ray`'s alone (img_per_s, ray_over_bound), on the knobs check's precision."""
    bound = result.get("decode_bound") or {}
    if "img_per_s" in bound:
        precision = (result.get("knobs") or {}).get("precision", "fp32")
        return {precision: {**bound, "over_bound": {"ray": bound["ray_over_bound"]}}}
    return bound


def int8_speed(result: dict) -> dict | None:
    """The int8 model's speed-ups measured by this bench: ray-int8 over ray (beside INT8_TARGET's bar) and
    ceiling-int8 over ceiling-onnx (the bare models); None unless one pair ran."""
    from m9.bench.config import INT8_TARGET

    eng, out = result["engines"], {}
    fast, slow, bar = INT8_TARGET
    for a, b in ((fast, slow), ("ceiling-int8", "ceiling-onnx")):
        if a in eng and b in eng and eng[b]["steady_img_per_s"]:
            if b == "ray" and (eng[b].get("knobs") or {}).get("precision", "fp32") != "fp32":
                continue
            ratio = round(eng[a]["steady_img_per_s"] / eng[b]["steady_img_per_s"], 3)
            out[f"{a}_over_{b}"] = {"ratio": ratio, **({"at_least": bar, "met": ratio >= bar} if a == fast else {})}
    return out or None


def _session(s: dict) -> str:
    return f", {s['session']}" if s.get("session") else ""


def _setting(s: dict) -> str:
    return f"{s['processes']} × {s['threads']} thread(s), batch {s['batch_size']}{_session(s)}"


def markdown(result: dict) -> str:
    """bench.md: the engine table with ratios to the ceiling and the seed's UDF, the targets, the knobs
    check, the ceiling searches and the machine it ran on."""
    m, eng = result["machine"], result["engines"]
    ceiling, seed = eng.get("ceiling"), eng.get("spark-udf-defaults")
    lines = [
        f"{result['images']} images; {m['cpu_model']}, {m['cores']} cores, {m['memory_gb']} GB; "
        f"load average {m['loadavg_start'][0]} at start, {m.get('loadavg_end', ['?'])[0]} at end.",
        "",
        "| engine | runtime | steady img/s | × ceiling | × spark-udf-defaults | wall s | first row s | model loads "
        "| peak RSS MB | CPU % | CPU ms/img | load | knobs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, e in eng.items():
        knobs = {k: v for k, v in e["knobs"].items() if k != "runtime"}
        lines.append(
            f"| {name} | {e['knobs'].get('runtime', '–')} | {e['steady_img_per_s']:.1f} | "
            f"{_ratio(e['steady_img_per_s'], ceiling)} | {_ratio(e['steady_img_per_s'], seed)} | "
            f"{e['wall_s']:.1f} | {e['first_row_s']:.1f} | {e['model_loads']} | {e['peak_rss_mb']:.0f} | "
            f"{100 * e['cpu_util']:.0f} | {e.get('cpu_ms_per_image', float('nan')):.1f} | "
            f"{e.get('loadavg_1m_at_start', '–')} | {_knobs(knobs)} |"
        )
    lines += [
        "",
        f"Engines agree: **{'yes' if result['agree'] else 'NO'}** — max |Δ| = "
        f"{result['max_abs_diff']:.2e} per feature against {result.get('reference')} "
        f"(tolerance {result['tolerance']:g}).",
    ]
    if ceiling and "of" in ceiling:
        lines += ["", f"`ceiling` is `{ceiling['of']}`, the faster bare model."]
    met = result.get("targets") or []
    if met:
        lines += [
            "",
            "Targets for `ray`: "
            + "; ".join(
                f"{t['ratio']:.2f} × {t['over']} (≥ {t['at_least']:g}: {'met' if t['met'] else 'NOT met'})" for t in met
            )
            + ".",
        ]
    int8 = result.get("int8_cosine_by_engine") or {}
    if int8:
        lines += [
            "",
            "int8 engines against the reference (cosine per image; bar: mean ≥ 0.98, p1 ≥ 0.95): "
            + "; ".join(
                f"{n} mean {q['cosine_mean']:.4f}, p1 {q['cosine_p1']:.4f}, min {q['cosine_min']:.4f} "
                f"({'at' if q['at_bar'] else 'BELOW'} the bar)"
                for n, q in int8.items()
            )
            + ".",
        ]
    speed = result.get("int8_speed") or {}
    if speed:
        lines += [
            "",
            "int8 speed: "
            + "; ".join(
                f"{k.replace('_over_', ' / ')} = **{v['ratio']:.2f}**"
                + (f" (≥ {v['at_least']:g}: {'met' if v['met'] else 'NOT met'})" if "at_least" in v else "")
                for k, v in speed.items()
            )
            + ".",
        ]
    bounds = bounds_by_precision(result)
    if bounds:
        lines += [
            "",
            "Decode bound: the bare model on m9's default layout, decoding each batch before its forward pass "
            "(the ceiling decodes up front): "
            + "; ".join(
                f"{precision} {b['img_per_s']} images/s, "
                + ", ".join(f"`{name}` = **{ratio:.2f} ×**" for name, ratio in b["over_bound"].items())
                + " that"
                for precision, b in bounds.items()
            )
            + ".",
        ]
    k = result.get("knobs")
    if k:
        lines += [
            "",
            f"Knobs ({k['runtime']}): m9's default {_setting(k['default'])} ran at {k['default_img_per_s']} "
            f"images/s; the best setting the ceiling search found, {_setting(k['best'])}, at "
            f"{k['best_img_per_s']}: default / best = **{k['ratio']}** (at least {1 - k['tolerance']:.2f}: "
            f"{'yes' if k['within_tolerance'] else 'NO'}). Method: {k['method']}."
            + (
                f" On forward passes alone the same two give {k['forward_only_ratio']}."
                if k.get("forward_only_ratio") is not None
                else ""
            ),
        ]
        sess = k.get("sessions_at_default_threads")
        if sess:
            rates = ", ".join(f"{name} {rate}" for name, rate in sess["images_per_s"].items())
            lines += [
                "",
                f"Session options at the default's {sess['threads']} thread(s), batch {sess['batch_size']}, in one "
                f"process: {rates} images/s; default / best ({sess['best']}) = **{sess['default_over_best']}**.",
            ]
    for name in ("ceiling-onnx", "ceiling-int8", "ceiling-keras"):
        search = [s for s in eng.get(name, {}).get("search", []) if s["img_per_s"] is not None]
        if search:
            lines += [
                "",
                f"{name} search (forward pass only, inputs decoded up front):",
                "",
                "| processes | threads | batch | session | img/s |",
                "|---:|---:|---:|---|---:|",
            ]
            lines += [
                f"| {s['processes']} | {s['threads']} | {s['batch_size']} | {s.get('session') or '–'} | "
                f"{s['img_per_s']:.1f} |"
                for s in search
            ]
    by_process = [(n, e["cpu_s_by_process"]) for n, e in eng.items() if e.get("cpu_s_by_process")]
    if by_process:
        lines += ["", "CPU seconds by process (the largest):", ""]
        lines += [f"- {n}: " + ", ".join(f"{p} {s}" for p, s in procs.items()) for n, procs in by_process]
    v = m["versions"]
    lines += ["", "Versions: " + ", ".join(f"{k} {v[k]}" for k in v if v[k]) + "."]
    return "\n".join(lines) + "\n"


def write_report(result: dict, output: str) -> None:
    """bench.json, bench.md and bench.png in `output`."""
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / "bench.md").write_text(markdown(result))
    chart(result, str(folder / "bench.png"))
