"""m9 bench on a few images: every engine runs on both runtimes, the JSON has every field and the knobs
check, the engines agree; the pure parts (engine order, steady rate, targets, knobs) on made-up numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from m9.bench import ENGINES, FEATURE_ENGINES, BenchConfig, bench, steady_rate
from m9.bench.knobs import check_knobs, default_setting
from m9.bench.report import bounds_missing, decode_bound, markdown, targets
from m9.bench.run import engine_order
from m9.bench.scaling import scaling
from m9.cli import main
from m9.errors import InputError
from m9.model.spec import ModelSpec
from tests.conftest import SAMPLE

#: Few images, one ceiling layout, no session search, one knobs round: the point is that every engine runs
#: and agrees and every section is written, not its speed.
IMAGES = 24

ENGINE_FIELDS = {
    "steady_img_per_s",
    "wall_s",
    "first_row_s",
    "model_loads",
    "peak_rss_mb",
    "cpu_util",
    "knobs",
    "cpu_s_by_process",
    "loadavg_1m_at_start",
}

#: The runtime each engine must have run on (ray: the bench's default runtime, onnx).
RUNTIME_OF = {
    "ceiling-keras": "keras",
    "ceiling-onnx": "onnx",
    "ray": "onnx",
    "ray-keras": "keras",
    "spark-udf": "keras",
    "spark-udf-onnx": "onnx",
    "spark-udf-defaults": "keras",
    "spark-predict": "onnx",
}

#: A resolved model as the knobs check sees it: only its runtime and precision matter there.
ONNX = ModelSpec(runtime="onnx", precision="fp32", data=b"", sha256="0" * 64, source="m.onnx", weights="w")


@pytest.fixture(scope="module")
def result(spark, ray_local, weights_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(
        output=str(out),
        limit=IMAGES,
        ceiling_batches=(8,),
        ceiling_images=16,
        ceiling_configs=((1, 1),),
        ceiling_sessions=False,
        knobs_rounds=1,
    )
    lines: list[str] = []
    return {"out": out, "result": bench(cfg, progress=lines.append), "lines": lines}


@pytest.mark.slow
def test_json_has_every_engine_and_field(result):
    data = json.loads((result["out"] / "bench.json").read_text())
    assert {
        "machine",
        "images",
        "engines",
        "agree",
        "max_abs_diff",
        "knobs",
        "targets",
        "decode_bound",
        "reference",
    } <= set(data)
    assert {"cpu_model", "cores", "memory_gb", "versions", "loadavg_start", "loadavg_end"} <= set(data["machine"])
    assert data["machine"]["versions"]["onnxruntime"]
    assert data["images"] == IMAGES
    assert set(data["engines"]) == set(ENGINES)
    for name, engine in data["engines"].items():
        assert ENGINE_FIELDS <= set(engine), name
        assert engine["steady_img_per_s"] > 0, name
        assert engine["wall_s"] >= engine["first_row_s"] >= 0, name
        assert engine["peak_rss_mb"] > 0, name
    for name, runtime in RUNTIME_OF.items():
        assert data["engines"][name]["knobs"]["runtime"] == runtime, name
    for name in FEATURE_ENGINES:
        assert data["engines"][name]["model_loads"] >= 1, name
        assert data["engines"][name]["knobs"]["batch_size"] >= 1, name
    # ceiling is the faster of the two bare models, picked, not run again.
    ceiling = data["engines"]["ceiling"]
    assert ceiling["of"] in ("ceiling-keras", "ceiling-onnx")
    assert ceiling["steady_img_per_s"] == max(data["engines"][e]["steady_img_per_s"] for e in RUNTIME_OF if "ceil" in e)
    assert data["engines"]["spark-udf"]["knobs"]["arrow_batch_size"] > 0
    # The seed's UDF as a notebook leaves it: Keras predict's batch, Spark's Arrow batch, TensorFlow's threads.
    assert data["engines"]["spark-udf-defaults"]["knobs"] == {
        "runtime": "keras",
        "tasks": data["engines"]["spark-udf"]["knobs"]["tasks"],
        "threads_per_task": "tf-default",
        "batch_size": 32,
        "arrow_batch_size": 10_000,
    }
    assert [t["over"] for t in data["targets"]] == ["spark-udf-defaults", "ceiling", "spark-udf-onnx"]
    # A decode bound per precision a Ray engine ran at: fp32's from the knobs check, int8's timed by bench.
    bounds = data["decode_bound"]
    assert set(bounds) == {"fp32", "int8"}
    assert set(bounds["fp32"]["over_bound"]) == {"ray"} and set(bounds["int8"]["over_bound"]) == {"ray-int8"}
    assert bounds["fp32"]["img_per_s"] == data["knobs"]["default_img_per_s"]
    assert bounds["int8"]["img_per_s"] > 0 and len(bounds["int8"]["rates"]) == 1


@pytest.mark.slow
def test_knobs_section(result):
    knobs = result["result"]["knobs"]
    assert knobs["runtime"] == "onnx"
    # The default is what m9 embed would run here; the search had one layout, (1, 1) at batch 8.
    assert knobs["default"] == default_setting(BenchConfig(), ONNX).row()
    assert (knobs["best"]["processes"], knobs["best"]["threads"], knobs["best"]["batch_size"]) == (1, 1, 8)
    assert knobs["default_img_per_s"] > 0 and knobs["best_img_per_s"] > 0
    assert knobs["ratio"] == pytest.approx(knobs["default_img_per_s"] / knobs["best_img_per_s"], abs=1e-3)
    assert len(knobs["rates"]["default"]) == len(knobs["rates"]["best"]) == 1
    sessions = knobs["sessions_at_default_threads"]
    assert sessions["threads"] == knobs["default"]["threads"] and "default" in sessions["images_per_s"]
    assert 0 < sessions["default_over_best"] <= 1


@pytest.mark.slow
def test_engines_agree(result):
    data = result["result"]
    assert data["agree"] is True
    assert data["reference"] == "ceiling-keras"
    assert data["max_abs_diff"] <= 1e-4
    assert set(data["max_abs_diff_by_engine"]) == set(FEATURE_ENGINES)
    assert data["max_abs_diff_by_engine"]["ray-keras"] <= 1e-5  # same runtime as the reference


@pytest.mark.slow
def test_reports_and_progress(result):
    md = (result["out"] / "bench.md").read_text()
    for name in ENGINES:
        assert f"| {name} |" in md
    assert "× ceiling" in md and "× spark-udf-defaults" in md and "Engines agree: **yes**" in md
    assert "Knobs (onnx): m9's default" in md and "Targets for `ray`" in md and "Session options at the" in md
    assert (result["out"] / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A line before and after each engine that runs; one for ceiling, which is picked.
    for name in ENGINES:
        assert any(line.split("] ", 1)[-1].startswith(f"{name}:") for line in result["lines"]), name
    assert sum(line.startswith("[") and " … " not in line and line.endswith("…") for line in result["lines"]) == (
        len(ENGINES) - 1 + 2  # every engine run, the knobs check and the int8 model's decode bound
    )
    assert "Decode bound:" in md and "`ray` = **" in md and "`ray-int8` = **" in md


@pytest.mark.slow
def test_scaling_writes_a_row_per_size(spark, ray_local, weights_path, tmp_path):
    out = scaling(BenchConfig(output=str(tmp_path)), [8])
    assert [row["images"] for row in out["sizes"]] == [8]
    assert {"steady_ms_per_image", "wall_ms_per_image", "peak_rss_mb"} <= set(out["sizes"][0])
    assert "| 8 |" in (tmp_path / "scaling.md").read_text()


def test_cli_rejects_unknown_engine(tmp_path):
    res = CliRunner().invoke(main, ["bench", "--engines", "ray,gpu", "--output", str(tmp_path)])
    assert res.exit_code == 1
    assert "unknown engine(s) gpu" in res.output


def test_cli_rejects_unknown_runtime(tmp_path):
    res = CliRunner().invoke(main, ["bench", "--runtime", "tflite", "--output", str(tmp_path)])
    assert res.exit_code == 2
    assert "'tflite' is not one of 'onnx', 'keras'" in res.output


def test_cli_rejects_bad_scaling(tmp_path):
    res = CliRunner().invoke(main, ["bench", "--scaling", "1000,x"])
    assert res.exit_code == 2
    assert "comma-separated whole numbers" in res.output


def test_engine_order_runs_both_ceilings_for_ceiling():
    assert engine_order(("ray", "ceiling")) == ["ceiling-keras", "ceiling-onnx", "ceiling", "ray"]
    assert engine_order(("spark-udf", "ceiling-onnx")) == ["ceiling-onnx", "spark-udf"]
    with pytest.raises(InputError, match="unknown engine"):
        engine_order(("ray", "gpu"))


def test_steady_rate_counts_bursts_once():
    assert steady_rate(np.arange(1000) / 70.0) == pytest.approx(70.0)
    # Two workers returning 64-row blocks together every 2 s: 64 rows/s, not the 128 that indexing the
    # sorted rows would claim when the 20 % mark falls inside the first pair of blocks.
    bursts = np.repeat([2.0, 2.001, 4.0, 4.001, 6.0, 6.001, 8.0, 8.001], 64)
    assert steady_rate(bursts) == pytest.approx(64.0, rel=0.01)


def _row(processes, threads, batch, rate, session_threads=None):
    t = session_threads or threads
    return {
        "runtime": "onnx",
        "processes": processes,
        "threads": threads,
        "batch_size": batch,
        "session": f"threads={t} spinning=off opt=all",
        "img_per_s": rate,
    }


def test_knobs_from_the_search_without_rounds():
    """No rounds: the ratio is the default's own search rate over the best's; no processes start."""
    cfg = BenchConfig(actors=2, batch_size=16, knobs_rounds=0)
    default = default_setting(cfg, ONNX)
    search = [
        _row(1, 2, 16, 100.0),
        _row(default.processes, default.threads, 16, 96.0),
        _row(default.processes, default.threads, 32, 80.0),
    ]
    knobs = check_knobs(cfg, ONNX, search, [], lambda line: None)
    assert knobs["default"]["batch_size"] == 16 and knobs["best"]["processes"] == 1
    assert knobs["ratio"] == pytest.approx(0.96)
    assert knobs["within_tolerance"] is True
    search[1]["img_per_s"] = 90.0
    assert check_knobs(cfg, ONNX, search, [], lambda line: None)["within_tolerance"] is False


def test_targets_compare_ray_with_each_bar():
    eng = {n: {"steady_img_per_s": r} for n, r in [("ray", 90.0), ("ceiling", 100.0), ("spark-udf-defaults", 45.0)]}
    got = targets({"engines": eng})
    assert got == [
        {"over": "spark-udf-defaults", "ratio": 2.0, "at_least": 1.8, "met": True},
        {"over": "ceiling", "ratio": 0.9, "at_least": 0.95, "met": False},
    ]


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["keras", "onnx"])
def test_embed_stamped_keeps_rows_in_place(weights_path, runtime):
    """The Spark UDF's per-forward-batch timing: rows keep their places, a broken image gets zeros and a time."""
    from m9.bench.spark_engines import _embed_stamped
    from m9.model.embedder import Embedder

    good = sorted(SAMPLE.rglob("*.jpg"))[:3]
    contents = [good[0].read_bytes(), b"not an image", good[1].read_bytes(), good[2].read_bytes()]
    from m9.model.spec import resolve_model

    embedder = Embedder(resolve_model(runtime=runtime), threads=1, batch_size=2)
    features, done_at = _embed_stamped(embedder, contents)
    expected, errors = embedder.embed(contents)
    assert errors[1] is not None and errors[0] is errors[2] is errors[3] is None
    np.testing.assert_allclose(features, expected, atol=1e-5)
    assert not features[1].any() and all(features[i].any() for i in (0, 2, 3))
    # Two forward batches (rows 0, 2 then row 3), each stamped when it finished; the broken row at the end.
    assert done_at[0] == done_at[2] <= done_at[3] <= done_at[1]


@pytest.mark.slow
def test_the_knobs_timing_with_decode_counts_the_images_it_decoded_and_forwarded():
    """time_group with_decode (how the knobs check times a setting as an actor runs it): each process decodes
    its share batch by batch inside the timed loop; a broken image is skipped, not counted."""
    from m9.bench.ceiling import default_session, time_group
    from m9.model.spec import resolve_model

    model = resolve_model(runtime="onnx")
    contents = [p.read_bytes() for p in sorted(SAMPLE.rglob("*.jpg"))[:19]] + [b"not an image"]
    for with_decode in (True, False):
        ((rate, msgs),) = time_group(
            model, 2, 1, [(8, default_session("onnx", 1))], contents, len(contents), with_decode=with_decode
        )
        assert rate > 0 and sorted(m.rank for m in msgs) == [0, 1]
        assert sum(m.images for m in msgs) == 19, with_decode


def test_the_decode_bound_is_ray_over_the_knobs_default_timed_with_decode():
    knobs = {"runtime": "onnx", "precision": "fp32", "default_img_per_s": 360.0, "forward_only_ratio": 0.99}
    result = {"engines": {"ray": {"steady_img_per_s": 342.0, "knobs": {"runtime": "onnx"}}}, "knobs": knobs}
    bound = decode_bound(result)
    assert set(bound) == {"fp32"}
    assert bound["fp32"]["ray_over_bound"] == pytest.approx(0.95) and bound["fp32"]["img_per_s"] == 360.0
    # Knobs from the search alone (no rounds with decode), or on another runtime than ray's: no bound.
    assert decode_bound({**result, "knobs": {**knobs, "forward_only_ratio": None}}) is None
    assert decode_bound({**result, "knobs": {**knobs, "runtime": "keras"}}) is None


#: ray on fp32 and ray-int8, as a default bench runs them: the knobs check times fp32's bound, bench int8's.
RAY_BOTH = {
    "ray": {"steady_img_per_s": 342.0, "knobs": {"runtime": "onnx", "precision": "fp32"}},
    "ray-int8": {"steady_img_per_s": 380.0, "knobs": {"runtime": "onnx", "precision": "int8"}},
}
WANTED = {"ray": ("onnx", "fp32"), "ray-int8": ("onnx", "int8")}
KNOBS = {"runtime": "onnx", "precision": "fp32", "default_img_per_s": 360.0, "forward_only_ratio": 0.99}


def test_each_precision_a_ray_engine_ran_at_has_its_own_decode_bound():
    result = {"engines": RAY_BOTH, "knobs": KNOBS}
    assert bounds_missing(result, WANTED) == [("onnx", "int8")]
    int8 = {"runtime": "onnx", "precision": "int8", "img_per_s": 400.0, "rates": [400.0], "timed_by": "m9 bench"}
    bound = decode_bound(result, [int8])
    assert set(bound) == {"fp32", "int8"}
    assert bound["fp32"]["over_bound"] == {"ray": pytest.approx(0.95)}
    assert bound["int8"]["over_bound"] == {"ray-int8": pytest.approx(0.95)}
    assert bound["int8"]["ray_over_bound"] == pytest.approx(0.95) and bound["int8"]["img_per_s"] == 400.0
    # Without the int8 timing, fp32's alone; with `ray` itself at int8 (--precision int8), it shares int8's.
    assert set(decode_bound(result)) == {"fp32"}
    at_int8 = {**RAY_BOTH, "ray": {**RAY_BOTH["ray"], "knobs": {"runtime": "onnx", "precision": "int8"}}}
    wanted = {**WANTED, "ray": ("onnx", "int8")}
    assert bounds_missing({"engines": at_int8, "knobs": KNOBS}, wanted) == [("onnx", "int8")]
    bound = decode_bound({"engines": at_int8, "knobs": KNOBS}, [int8])
    assert set(bound) == {"int8"} and set(bound["int8"]["over_bound"]) == {"ray", "ray-int8"}
    # Knobs without rounds time no bound: both precisions are bench's to time.
    no_rounds = {"engines": RAY_BOTH, "knobs": {**KNOBS, "forward_only_ratio": None}}
    assert bounds_missing(no_rounds, WANTED) == [("onnx", "fp32"), ("onnx", "int8")]


def _report(decode_bound_entry) -> str:
    """bench.md's decode-bound line for a minimal bench.json holding `decode_bound_entry`."""
    eng = {
        n: {**e, "wall_s": 1.0, "first_row_s": 0.1, "model_loads": 2, "peak_rss_mb": 1.0, "cpu_util": 0.5}
        for n, e in RAY_BOTH.items()
    }
    result = {
        "images": 8,
        "machine": {"cpu_model": "cpu", "cores": 2, "memory_gb": 1, "loadavg_start": [1.0], "versions": {}},
        "engines": eng,
        "agree": True,
        "max_abs_diff": 0.0,
        "tolerance": 1e-4,
        "knobs": None,
        "decode_bound": decode_bound_entry,
    }
    return next(line for line in markdown(result).splitlines() if line.startswith("Decode bound"))


def test_bench_md_shows_every_precisions_decode_bound_and_reads_an_old_bench_json():
    int8 = {"runtime": "onnx", "precision": "int8", "img_per_s": 400.0, "rates": [400.0], "timed_by": "m9 bench"}
    line = _report(decode_bound({"engines": RAY_BOTH, "knobs": KNOBS}, [int8]))
    assert "fp32 360.0 images/s, `ray` = **0.95 ×** that" in line
    assert "int8 400.0 images/s, `ray-int8` = **0.95 ×** that" in line
    # bench.json as written when the bound was `ray`'s alone.
    old = {"img_per_s": 363.0, "ray_over_bound": 0.92, "what": "m9's default layout"}
    assert "fp32 363.0 images/s, `ray` = **0.92 ×** that." in _report(old)
