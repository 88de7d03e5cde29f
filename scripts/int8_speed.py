"""FP32 against int8: the bare model's images/s on this machine, one thread, batch 8, the two sessions timed in
turns in one process (so a change in the machine's load hits both alike). Prints one JSON line.

Usage: .venv/bin/python scripts/int8_speed.py [--rounds 5] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import platform

from m9.bench.machine import machine_facts
from m9.model import ort
from m9.model.quantize import calibration_inputs
from m9.model.spec import resolve_model


def _interleaved(sessions: dict, settings, inputs, batch_size: int, rounds: int, seconds: float) -> dict:
    """images/s per round of each model's session, the sessions taking turns within every round."""
    import time

    live = {p: ort.session(data, settings) for p, data in sessions.items()}
    slices = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
    for sess in live.values():
        ort.run(sess, slices[0])  # the first run allocates and plans; not timed
    out: dict = {p: [] for p in live}
    for _ in range(rounds):
        for p, sess in live.items():
            done, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                for part in slices:
                    ort.run(sess, part)
                    done += len(part)
            out[p].append(round(done / (time.perf_counter() - started), 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    inputs = calibration_inputs()[:64]
    settings = ort.SessionSettings(threads=args.threads)
    sessions = {p: resolve_model(precision=p).data for p in ("fp32", "int8")}
    out = _interleaved(sessions, settings, inputs, args.batch_size, args.rounds, args.seconds)
    med = {p: sorted(v)[len(v) // 2] for p, v in out.items()}
    facts = machine_facts()
    print(
        json.dumps(
            {
                "cpu": facts.get("cpu_model") or platform.processor(),
                "threads": args.threads,
                "batch_size": args.batch_size,
                "images_per_s": out,
                "median": med,
                "int8_over_fp32": round(med["int8"] / med["fp32"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
