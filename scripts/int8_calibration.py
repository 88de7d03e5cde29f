"""The int8 recipe under each calibration method: MinMax (m9's), Entropy and Percentile, everything else as
m9.model.quantize makes it. "Percentile:P" is Percentile at P; "Entropy:N" is Entropy over a histogram of N
bins (quantize_static passes no bin count to its calibrator, whose Entropy default of 128 bins, as many as it
quantises to, leaves one threshold to choose: the full range, MinMax's); the N is set on ONNX Runtime's
create_calibrator here, with 128 quantised bins. Per method: the time to quantise and, on quantize's check
sets, the cosine of each image's int8 features to FP32's (mean, p1, min) and 5-NN accuracy. Each method runs
in its own process (Entropy and Percentile hold every calibration batch's activations). One JSON line each.

Usage: .venv/bin/python scripts/int8_calibration.py \
    [--methods MinMax,Entropy,Entropy:2048,Percentile:99.99,Percentile:99.999]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time


def _entropy_bins(bins: int) -> None:
    """Make quantize_static's Entropy calibrator histogram into `bins` bins (and quantise to 128)."""
    import importlib

    ortq = importlib.import_module("onnxruntime.quantization.quantize")  # the module, not its quantize()

    make = ortq.create_calibrator

    def create_calibrator(*args, extra_options=None, **kwargs):
        options = {**(extra_options or {}), "num_bins": bins, "num_quantized_bins": 128}
        return make(*args, extra_options=options, **kwargs)

    ortq.create_calibrator = create_calibrator


def _one(method: str, queue) -> None:
    """Quantise with one method ("Percentile:99.99" names the percentile) and measure it on the check sets."""
    import resource

    from m9.model import quantize
    from m9.model.weights import cached_onnx

    _, fp32, _ = cached_onnx()
    name, _, arg = method.partition(":")
    if name == "Entropy" and arg:
        _entropy_bins(int(arg))
    calibration = quantize.calibration_inputs()
    started, cpu = time.perf_counter(), time.process_time()
    data = quantize.quantise(fp32, calibration, name, float(arg) if name == "Percentile" and arg else None)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    quality = quantize.measure(fp32, data, quantize.check_sets())
    queue.put(
        {
            "method": method,
            "calibration_images": len(calibration),
            "quantise_wall_s": round(wall, 1),
            "quantise_cpu_s": round(cpu, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "at_bar": not quantize.below_bar(quality),
            "quality": quality,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="MinMax,Entropy,Entropy:2048,Percentile:99.99,Percentile:99.999")
    args = parser.parse_args()
    from m9.bench.machine import machine_facts

    cpu = machine_facts().get("cpu_model")
    ctx = multiprocessing.get_context("spawn")
    for method in args.methods.split(","):
        queue = ctx.Queue()
        load = round(os.getloadavg()[0], 2)
        proc = ctx.Process(target=_one, args=(method, queue))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"{method}: the measuring process failed (exit code {proc.exitcode})")
        out = queue.get()
        print(json.dumps({**out, "cpu": cpu, "loadavg_1m_at_start": load}), flush=True)


if __name__ == "__main__":
    main()
