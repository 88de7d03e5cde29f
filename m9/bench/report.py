"""bench.md: the engine table with ratios, the ceiling search and the machine it ran on."""

from __future__ import annotations

import json
from pathlib import Path

from m9.bench.chart import chart


def _ratio(value: float, ref: dict | None) -> str:
    if not ref or not ref.get("steady_img_per_s"):
        return "–"
    return f"{value / ref['steady_img_per_s']:.2f}"


def _knobs(knobs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in knobs.items() if v is not None)


def markdown(result: dict) -> str:
    """bench.md: the engine table with ratios to ceiling and spark-udf, and the machine it ran on."""
    m, eng = result["machine"], result["engines"]
    ceiling, udf = eng.get("ceiling"), eng.get("spark-udf")
    lines = [
        f"{result['images']} images; {m['cpu_model']}, {m['cores']} cores, {m['memory_gb']} GB; "
        f"load average {m['loadavg_start'][0]} at start, {m.get('loadavg_end', ['?'])[0]} at end.",
        "",
        "| engine | steady img/s | × ceiling | × spark-udf | wall s | first row s | model loads | peak RSS MB "
        "| CPU % | CPU ms/img | knobs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, e in eng.items():
        lines.append(
            f"| {name} | {e['steady_img_per_s']:.1f} | {_ratio(e['steady_img_per_s'], ceiling)} | "
            f"{_ratio(e['steady_img_per_s'], udf)} | {e['wall_s']:.1f} | {e['first_row_s']:.1f} | "
            f"{e['model_loads']} | {e['peak_rss_mb']:.0f} | {100 * e['cpu_util']:.0f} | "
            f"{e.get('cpu_ms_per_image', float('nan')):.1f} | "
            f"{_knobs(e['knobs'])} |"
        )
    lines += [
        "",
        f"Engines agree: **{'yes' if result['agree'] else 'NO'}** — max |Δ| = "
        f"{result['max_abs_diff']:.2e} per feature (tolerance {result['tolerance']:g}).",
    ]
    if ceiling and any(s["img_per_s"] for s in ceiling.get("search", [])):
        lines += [
            "",
            "Ceiling search (forward pass only, inputs decoded up front):",
            "",
            "| processes | threads | batch | img/s |",
            "|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {s['processes']} | {s['threads']} | {s['batch_size']} | {s['img_per_s']:.1f} |"
            for s in ceiling["search"]
            if s["img_per_s"] is not None
        ]
    v = m["versions"]
    lines += ["", "Versions: " + ", ".join(f"{k} {v[k]}" for k in v if v[k]) + "."]
    return "\n".join(lines) + "\n"


def write_report(result: dict, output: str) -> None:
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / "bench.md").write_text(markdown(result))
    chart(result, str(folder / "bench.png"))
