"""The int8 speed/quality frontier: m9's int8 recipe (m9.model.quantize) with other sets of Conv nodes kept in
float (the first N; the depthwise ones; the last one) and in QOperator format, each measured against FP32 on
this machine: quality on quantize's check sets (cosine of each image's int8 features to FP32's: mean, p1,
min) and the bare model's images/s, all sessions taking turns pass by pass in one process (so a change in
the machine's load hits all alike), at 1 thread and at 2 threads, batch 8; medians over the rounds. With --profile, ONNX
Runtime's per-node profile of one variant: where its time goes, by operator type. Prints a markdown table,
then one JSON line.

Usage: .venv/bin/python scripts/int8_frontier.py [--variants f0,f1,f2,f3,f4,f6,dw,f6+last,f6-qop,f9-qop]
    [--rounds 5] [--seconds 2] [--threads 1,2] [--profile f6] [--out /tmp/m9-int8-frontier]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

#: Variant names: "fN" keeps the first N Conv nodes in float, "dw" every depthwise conv, "iK" the Conv at
#: position K, "+last" adds the last Conv; QDQ with U8U8 unless "-qop" (QOperator, whose weights ORT makes
#: int8 whatever is asked) or "-s8" (U8S8). m9's recipe is f9-qop.
VARIANTS = "f0,f1,f2,f3,f4,f6,dw,f6+last,f6-s8,f7-s8,f8-s8,f9-s8,f6-qop,f9-qop"


def _conv_groups(fp32: bytes) -> list[int]:
    """The `group` of every Conv node of the pre-processed model, in graph order (>1: depthwise)."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        src, pre = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
        src.write_bytes(fp32)
        quant_pre_process(str(src), str(pre))
        nodes = [n for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv"]
    return [next((a.i for a in n.attribute if a.name == "group"), 1) for n in nodes]


def _float_convs(variant: str, groups: list[int]) -> tuple[list[int], str, str]:
    """The Conv positions a variant keeps in float, its format and its weight type."""
    name, fmt, weights = variant, "QDQ", "QUInt8"
    if name.endswith("-s8"):
        name, weights = name[: -len("-s8")], "QInt8"
    if name.endswith("-qop"):
        name, fmt = name[: -len("-qop")], "QOperator"
    keep: set[int] = set()
    for part in name.split("+"):
        if part == "dw":
            keep |= {i for i, g in enumerate(groups) if g > 1}
        elif part == "last":
            keep.add(len(groups) - 1)
        elif part.startswith("i"):
            keep.add(int(part[1:]))
        elif part.startswith("f"):
            keep |= set(range(int(part[1:])))
        else:
            raise SystemExit(f"Error: unknown variant part {part!r} in {variant!r}")
    return sorted(keep), fmt, weights


def _build(variant: str, out: str, queue) -> None:
    """Quantise one variant to out/<variant>.onnx and measure its quality on the check sets."""
    from m9.model import quantize
    from m9.model.weights import cached_onnx

    _, fp32, _ = cached_onnx()
    groups = _conv_groups(fp32)
    keep, fmt, weights = _float_convs(variant, groups)
    started = time.perf_counter()
    data = quantize.quantise(
        fp32, quantize.calibration_inputs(), float_convs=keep, quant_format=fmt, weight_type=weights
    )
    wall = time.perf_counter() - started
    Path(out, f"{variant}.onnx").write_bytes(data)
    quality = quantize.measure(fp32, data, quantize.check_sets())
    queue.put(
        {
            "variant": variant,
            "format": fmt,
            "weights": weights,
            "float_convs": keep,
            "convs": len(groups),
            "bytes": len(data),
            "quantise_wall_s": round(wall, 1),
            "at_bar": not quantize.below_bar(quality),
            "quality": quality,
        }
    )


def _interleaved(models: dict[str, bytes], threads: int, batch: int, rounds: int, seconds: float) -> dict:
    """images/s per round of each model. Within a round the models take turns pass by pass (one pass: 64
    images in batches), the order rotating, until each has had about `seconds`: a change in the machine's load
    hits every model alike even when the load moves within seconds."""
    from m9.model import ort
    from m9.model.quantize import calibration_inputs

    inputs = calibration_inputs()[:64]
    slices = [inputs[i : i + batch] for i in range(0, len(inputs), batch)]
    live = {name: ort.session(data, ort.SessionSettings(threads=threads)) for name, data in models.items()}
    for sess in live.values():
        ort.run(sess, slices[0])  # the first run allocates and plans; not timed
    out: dict = {name: [] for name in live}
    names = list(live)
    for _ in range(rounds):
        spent = dict.fromkeys(names, 0.0)
        done = dict.fromkeys(names, 0)
        turn = 0
        while sum(spent.values()) < seconds * len(names):
            order = names[turn % len(names) :] + names[: turn % len(names)]
            turn += 1
            for name in order:
                started = time.perf_counter()
                for part in slices:
                    ort.run(live[name], part)
                spent[name] += time.perf_counter() - started
                done[name] += len(inputs)
        for name in names:
            out[name].append(round(done[name] / spent[name], 1))
    return out


def _profile(data: bytes, batch: int, runs: int) -> dict:
    """ONNX Runtime's profile of `runs` batches on 1 thread: per operator type (after ORT's graph optimisation,
    so QDQ groups appear as the int8 kernels they are fused into), its share of the node time and node count;
    and the 12 slowest nodes."""
    import onnxruntime

    from m9.model import ort
    from m9.model.quantize import calibration_inputs

    inputs = calibration_inputs()[:batch]
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.session_options(ort.SessionSettings(threads=1))
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "prof")
        sess = onnxruntime.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            ort.run(sess, inputs)
        events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict = defaultdict(lambda: [0, 0])
    by_node: dict = defaultdict(int)
    seen_first = set()
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        node, op = e["name"][: -len("_kernel_time")], e["args"].get("op_name", "?")
        by_node[(node, op)] += e["dur"]
        by_op[op][0] += e["dur"]
        if (node, op) not in seen_first:
            seen_first.add((node, op))
            by_op[op][1] += 1
    total = sum(v[0] for v in by_op.values())
    return {
        "runs": runs + 1,
        "batch_size": batch,
        "node_ms_per_batch": round(total / 1000 / (runs + 1), 2),
        "by_op": {
            op: {"share": round(us / total, 3), "nodes": n}
            for op, (us, n) in sorted(by_op.items(), key=lambda kv: -kv[1][0])
        },
        "slowest_nodes": [
            {"node": node, "op": op, "share": round(us / total, 3)}
            for (node, op), us in sorted(by_node.items(), key=lambda kv: -kv[1])[:12]
        ],
    }


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default=VARIANTS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--profile", default="fp32,f6,f9-qop", help="models to profile, comma-separated ('' for none)")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "m9-int8-frontier"))
    parser.add_argument("--reuse", action="store_true", help="reuse variants already built in --out")
    args = parser.parse_args()
    from m9.bench.machine import machine_facts
    from m9.model.weights import cached_onnx

    Path(args.out).mkdir(parents=True, exist_ok=True)
    variants = args.variants.split(",")
    built: dict = {}
    ctx = multiprocessing.get_context("spawn")
    for v in variants:
        record = Path(args.out, f"{v}.json")
        if args.reuse and record.exists() and Path(args.out, f"{v}.onnx").exists():
            built[v] = json.loads(record.read_text())
            continue
        queue = ctx.Queue()
        proc = ctx.Process(target=_build, args=(v, args.out, queue))  # each in its own process: ~2 GB while calibrating
        proc.start()
        built[v] = queue.get()
        proc.join()
        record.write_text(json.dumps(built[v]))
        print(json.dumps(built[v]), flush=True)

    models = {"fp32": cached_onnx()[1], **{v: Path(args.out, f"{v}.onnx").read_bytes() for v in variants}}
    speed: dict = {}
    load: dict = {}
    for threads in (int(t) for t in args.threads.split(",")):
        load[threads] = [round(os.getloadavg()[0], 2)]
        rates = _interleaved(models, threads, args.batch_size, args.rounds, args.seconds)
        load[threads].append(round(os.getloadavg()[0], 2))
        med = {name: _median(r) for name, r in rates.items()}
        # the ratio to FP32 within each round, then its median: the load moves between rounds more than within
        ratio = {name: _median([a / b for a, b in zip(r, rates["fp32"], strict=True)]) for name, r in rates.items()}
        speed[threads] = {"images_per_s": rates, "median": med, "over_fp32": {k: round(v, 3) for k, v in ratio.items()}}
    profiles = {v: _profile(models[v], args.batch_size, 20) for v in filter(None, args.profile.split(","))}

    cols = [f"{t} thread{'s' if t > 1 else ''}: img/s (× fp32)" for t in speed]
    print()
    print(
        "| variant | format | float convs | sample-test mean / p1 / min | thumbnails mean / p1 / min | at bar | "
        + " | ".join(cols)
        + " |"
    )
    print("| --- | --- | --- | --- | --- | --- | " + " | ".join("---:" for _ in cols) + " |")
    fp32_cells = " | ".join(f"{s['median']['fp32']:.1f}" for s in speed.values())
    print(f"| fp32 | | all | | | | {fp32_cells} |")
    for v in variants:
        b, q = built[v], built[v]["quality"]
        cells = " | ".join(f"{s['median'][v]:.1f} ({s['over_fp32'][v]:.2f}×)" for s in speed.values())
        kept = len(b["float_convs"])
        print(
            f"| {v} | {b['format']} | {kept} of {b['convs']} | "
            + " | ".join(f"{q[s]['cosine_mean']:.4f} / {q[s]['cosine_p1']:.4f} / {q[s]['cosine_min']:.4f}" for s in q)
            + f" | {'yes' if b['at_bar'] else 'no'} | {cells} |"
        )
    for v, p in profiles.items():
        print(f"\nprofile {v} (1 thread, batch {p['batch_size']}, {p['node_ms_per_batch']} ms of node time per batch):")
        for op, o in p["by_op"].items():
            print(f"  {op}: {o['share']:.1%} ({o['nodes']} nodes)")
    print()
    print(
        json.dumps(
            {
                "cpu": machine_facts().get("cpu_model"),
                "batch_size": args.batch_size,
                "rounds": args.rounds,
                "seconds": args.seconds,
                "loadavg_1m_before_after": load,
                "variants": built,
                "speed": speed,
                "profiles": profiles,
            }
        )
    )


if __name__ == "__main__":
    main()
