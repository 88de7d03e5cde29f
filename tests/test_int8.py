"""The int8 model: made once per cache from the FP32 ONNX model, refused unless its bytes and recorded quality
hold, its features near FP32's on the bundled sample, and `--precision int8` through m9 embed."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from m9.cli import main
from m9.config import EmbedConfig
from m9.errors import InputError, WeightsError
from m9.model import quantize
from m9.model.spec import ModelSpec, resolve_model
from m9.stages import contract, lifecycle

SAMPLE = Path(__file__).resolve().parent.parent / "m9" / "sample"

GOOD = {"sample-test": {"cosine_mean": 0.989, "cosine_p1": 0.981}}


def _fake_int8(folder: Path, data: bytes = b"int8 model", **changes) -> Path:
    """A model file and its sidecar as make_int8 writes them (the checks need no real model)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / quantize.INT8_CACHE_NAME
    path.write_bytes(data)
    meta = {"sha256": hashlib.sha256(data).hexdigest(), "method": quantize.METHOD, "quality": GOOD, **changes}
    quantize.sidecar(path).write_text(json.dumps(meta))
    return path


def test_a_model_with_its_own_record_loads(tmp_path):
    data, meta = quantize.load_int8(_fake_int8(tmp_path))
    assert data == b"int8 model" and meta["method"] == quantize.METHOD


def test_a_tampered_int8_file_is_refused(tmp_path):
    path = _fake_int8(tmp_path)
    path.write_bytes(b"int8 modeL")
    with pytest.raises(WeightsError, match="not the .* recorded when it was made: refused"):
        quantize.load_int8(path)


def test_a_model_whose_recorded_quality_is_below_the_bar_is_refused(tmp_path):
    low = {"sample-test": {"cosine_mean": 0.989, "cosine_p1": 0.94}}
    with pytest.raises(WeightsError, match="below the bar .*sample-test: cosine mean 0.9890, p1 0.9400"):
        quantize.load_int8(_fake_int8(tmp_path, quality=low))


def test_a_model_without_a_record_or_of_another_recipe_is_refused(tmp_path):
    path = _fake_int8(tmp_path / "a", method="dynamic")
    with pytest.raises(WeightsError, match="not made by m9's int8 recipe"):
        quantize.load_int8(path)
    path = _fake_int8(tmp_path / "b")
    quantize.sidecar(path).unlink()
    with pytest.raises(WeightsError, match="no readable record"):
        quantize.load_int8(path)
    with pytest.raises(WeightsError, match="another FP32 model"):
        quantize.load_int8(_fake_int8(tmp_path / "c", source_sha256="a" * 64), fp32_sha256="b" * 64)


def test_int8_runs_on_onnx_only_with_one_error_line():
    with pytest.raises(InputError, match="--precision int8 runs on --runtime onnx only, not --runtime keras"):
        resolve_model(runtime="keras", precision="int8")
    result = CliRunner().invoke(main, ["bench", "--runtime", "keras", "--precision", "int8"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: --precision int8 runs on --runtime onnx only, not --runtime keras"
    ]


def test_the_fingerprint_differs_between_fp32_and_int8():
    cfg = EmbedConfig(input="in", output="out")
    specs = [
        ModelSpec(runtime="onnx", precision=p, data=b"m", sha256=s, source="m.onnx", weights="c0")
        for p, s in (("fp32", "aa"), ("int8", "bb"))
    ]
    prints = [lifecycle.fingerprint(contract.EMBED, cfg, "src", **s.identity()) for s in specs]
    assert prints[0] != prints[1]
    assert specs[1].identity()["model_sha256"] == "bb" and "model_sha256" not in specs[0].identity()


# --- the real model (slow): made once per test session in a temporary cache ---------------------------------


@pytest.fixture(scope="session")
def int8_cache(tmp_path_factory) -> Path:
    """A cache holding the FP32 ONNX model (copied from m9's cache) and the int8 model made from it here."""
    from m9.model import weights

    cache = tmp_path_factory.mktemp("int8-cache")
    fp32 = weights.fetch_onnx()
    for path in (fp32, weights.sidecar(fp32)):
        shutil.copy(path, cache / path.name)
    quantize.cached_int8(cache)
    return cache


@pytest.mark.slow
def test_the_int8_model_passes_verification(int8_cache):
    spec = resolve_model(precision="int8", cache=int8_cache)
    assert spec.precision == "int8" and spec.runtime == "onnx"
    assert hashlib.sha256(spec.checked_data()).hexdigest() == spec.sha256
    meta = json.loads(quantize.sidecar(int8_cache / quantize.INT8_CACHE_NAME).read_text())
    assert meta["calibration"]["images"] == 144 and meta["versions"]["onnxruntime"]
    assert set(meta["quality"]) == {"sample-test", "sample-thumbnails"} and not quantize.below_bar(meta["quality"])
    fp32 = resolve_model(precision="fp32", cache=int8_cache)
    assert spec.identity() != fp32.identity() and spec.identity()["model_sha256"] == spec.sha256


@pytest.mark.slow
def test_int8_features_are_at_the_bar_against_fp32_on_the_sample(int8_cache):
    from m9.model.compare import compare

    result = compare(str(SAMPLE), cache=int8_cache)
    assert result["images"] == 240 and result["rejected"] == 0
    assert result["cosine_mean"] >= quantize.MIN_COSINE_MEAN and result["cosine_p1"] >= quantize.MIN_COSINE_P1
    assert result["at_bar"] is True
    assert abs(result["knn5_int8"] - result["knn5_fp32"]) <= 0.02


@pytest.mark.slow
def test_m9_embed_precision_int8_runs_end_to_end(pipeline, int8_cache, tmp_path):
    out = tmp_path / "embed-int8"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("M9_CACHE_DIR", str(int8_cache))
        args = ["embed", "--input", pipeline["dirs"]["images"], "--output", str(out), "--actors", "2"]
        result = CliRunner().invoke(main, [*args, "--precision", "int8"])
        keras = CliRunner().invoke(main, [*args, "--runtime", "keras", "--precision", "int8"])
    assert result.exit_code == 0, result.output
    manifest = lifecycle.read_manifest(str(out))
    assert manifest.details["precision"] == "int8" and manifest.details["model"]["precision"] == "int8"
    assert manifest.counts["embedded"] == pipeline["embed"].counts["embedded"]
    assert manifest.fingerprint != pipeline["embed"].fingerprint
    assert keras.exit_code == 1
    assert keras.output.strip().splitlines() == [
        "Error: --precision int8 runs on --runtime onnx only, not --runtime keras"
    ]
