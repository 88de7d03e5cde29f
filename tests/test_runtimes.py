"""The ONNX runtime against the Keras reference: equal features, refused tampered or unequal conversions,
and no TensorFlow in a Ray actor that runs ONNX."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from m9.config import IMAGE_EXTENSIONS
from m9.errors import InputError, WeightsError
from m9.model import ort
from m9.model import weights as m9weights
from m9.model.embedder import Embedder
from m9.model.spec import ModelSpec, resolve_model
from tests.conftest import SAMPLE

TOLERANCE = 1e-4


def _fake_cache(folder: Path, data: bytes, recorded: bytes, **meta) -> Path:
    """An .onnx file holding `data` with a sidecar recording the sha256 of `recorded`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / m9weights.ONNX_CACHE_NAME
    path.write_bytes(data)
    record = {"sha256": hashlib.sha256(recorded).hexdigest(), **meta}
    m9weights.sidecar(path).write_text(json.dumps(record))
    return path


# --- fast: the checks themselves, on small files -----------------------------------------------------------


def test_an_onnx_file_whose_bytes_changed_is_refused(tmp_path):
    path = _fake_cache(
        tmp_path, b"tampered model", b"converted model", keras_weights_checksum=m9weights.EXPECTED_CHECKSUM
    )
    with pytest.raises(WeightsError, match="sha256 .* not the .* recorded when it was converted"):
        m9weights.read_onnx(path)
    with pytest.raises(WeightsError, match="sha256"):
        m9weights.fetch_onnx(tmp_path)
    # Refused on the driver when the model is resolved, and by a worker handed bytes that changed since.
    with pytest.raises(WeightsError, match="sha256"):
        resolve_model(runtime="onnx", weights=str(path))
    with pytest.raises(WeightsError, match="handed to this worker .* not the .* checked on the driver"):
        Embedder(
            ModelSpec(
                runtime="onnx",
                precision="fp32",
                data=b"tampered model",
                sha256=hashlib.sha256(b"converted model").hexdigest(),
                source=str(path),
                weights="sha256:" + hashlib.sha256(b"converted model").hexdigest(),
            )
        )


def test_an_onnx_file_without_its_record_or_from_other_weights_is_refused(tmp_path):
    path = _fake_cache(tmp_path / "a", b"model", b"model", keras_weights_checksum="0" * 64)
    assert m9weights.read_onnx(path) == b"model"  # its bytes are intact …
    with pytest.raises(WeightsError, match="not converted from the verified ImageNet weights"):
        m9weights.fetch_onnx(tmp_path / "a")  # … but it is not the verified backbone's conversion
    m9weights.sidecar(path).unlink()
    with pytest.raises(WeightsError, match="no readable record of its check"):
        m9weights.read_onnx(path)


def test_runtime_and_precision_are_checked_where_the_model_is_resolved():
    with pytest.raises(InputError, match="--runtime tflite: expected one of onnx, keras"):
        resolve_model(runtime="tflite")
    with pytest.raises(InputError, match="--precision fp8: expected one of"):
        resolve_model(precision="fp8")


def test_the_model_identity_names_what_changes_features():
    spec = ModelSpec(runtime="onnx", precision="fp32", data=b"m", sha256="ab", source="m.onnx", weights="c0")
    assert spec.identity() == {
        "weights": "c0",
        "runtime": "onnx",
        "precision": "fp32",
        "preprocess": spec.preprocess_version,
        "decode_memory_mb": spec.decode_memory_mb,
    }
    same = ModelSpec(runtime="onnx", precision="fp32", data=b"other", sha256="ab", source="m.onnx", weights="c0")
    assert spec == same  # the bytes are stood for by their sha256
    assert "data" not in repr(spec)


def test_session_candidates_start_with_the_defaults_and_differ():
    cands = ort.candidates(2)
    assert next(iter(cands)) == "default" and cands["default"] == ort.SessionSettings(threads=2)
    assert len(set(cands.values())) == len(cands) == 6  # spinning × 3 optimisation levels


# --- slow: the real conversion, sessions and Ray --------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_path() -> Path:
    return m9weights.fetch_onnx()


@pytest.fixture(scope="module")
def onnx_model() -> ModelSpec:
    return resolve_model(runtime="onnx")


@pytest.fixture(scope="module")
def keras_model() -> ModelSpec:
    return resolve_model(runtime="keras")


def _images(paths: list[Path]) -> list[bytes]:
    return [p.read_bytes() for p in paths]


@pytest.mark.slow
def test_the_cached_conversion_records_its_check(onnx_path):
    meta = m9weights.onnx_metadata(onnx_path)
    assert meta["sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert 0 < meta["max_abs_diff"] <= meta["tolerance"] == TOLERANCE
    assert meta["keras_weights_checksum"] == m9weights.EXPECTED_CHECKSUM
    assert meta["opset"] == m9weights.ONNX_OPSET and set(meta["versions"]) >= {"tf2onnx", "onnxruntime", "keras"}


#: A single pixel scaled up is a flat 224×224 image, the one input where two float32 runtimes drift furthest
#: apart: measured against a float64 Keras forward pass of it, Keras float32 is 4.8e-5 off, ONNX Runtime 8.1e-5
#: off, in opposite directions, so they differ by 1.1e-4 (a constant image of -1: 9.3e-5 and 4.3e-5, 1.35e-4
#: apart). Neither is the less accurate, so it gets twice the tolerance; every photo-like input stays ≤ 1e-4.
FLAT_IMAGES = {"one-pixel.png": 2 * TOLERANCE}


@pytest.mark.slow
def test_onnx_features_equal_keras_on_the_sample_and_the_odd_images(onnx_model, keras_model, tmp_path):
    from tests.test_robustness import write_corpus

    write_corpus(tmp_path)
    odd = sorted(
        p
        for p in tmp_path.rglob("*")
        if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
        and p.is_file()  # not the dangling link
        and not any(part.startswith((".", "_")) for part in p.relative_to(tmp_path).parts)  # hidden: never ingested
    )
    files = sorted(SAMPLE.rglob("*.jpg")) + odd
    onnx = Embedder(onnx_model, threads=2, batch_size=16)
    keras = Embedder(keras_model, threads=2, batch_size=16)
    got, got_errors = onnx.embed(_images(files))
    want, want_errors = keras.embed(_images(files))
    assert got_errors == want_errors
    assert sum(e is None for e in got_errors) >= 240 + 13  # the sample, and the corpus's embeddable files
    assert np.isfinite(got).all() and got.std() > 0.1
    diffs = np.abs(got - want).max(axis=1)
    for path, diff in zip(files, diffs):
        assert diff <= FLAT_IMAGES.get(path.name, TOLERANCE), (path.name, diff)
    assert diffs[: len(files) - len(odd)].max() <= TOLERANCE  # the bundled sample, all photographs


@pytest.mark.slow
def test_a_tampered_copy_of_the_real_model_is_refused(onnx_path, tmp_path):
    copy = tmp_path / onnx_path.name
    shutil.copy(onnx_path, copy)
    shutil.copy(m9weights.sidecar(onnx_path), m9weights.sidecar(copy))
    Embedder(resolve_model(runtime="onnx", weights=str(copy)), threads=1)  # the intact copy loads
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    copy.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        resolve_model(runtime="onnx", weights=str(copy))


@pytest.mark.slow
def test_a_conversion_that_differs_from_keras_is_not_cached(weights_path, tmp_path):
    # The real conversion differs by ~2.5e-5; a tolerance of 0 must refuse it and leave nothing behind.
    target = tmp_path / "refused.onnx"
    with pytest.raises(WeightsError, match="differs from Keras by .* not cached"):
        m9weights.convert(weights_path, target, verify_weights=True, tolerance=0.0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_ray_actor_running_onnx_never_imports_tensorflow(onnx_model, ray_local, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from m9.stages.embed import EmbedActor, plan_slices

    contents = _images(sorted(SAMPLE.rglob("*.jpg"))[:4])
    rows = {k: [f"{k}{i}" for i in range(4)] for k in ("image_id", "path", "label", "split")}
    shard = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({**rows, "content": pa.array(contents, pa.binary())}), shard)
    [item] = plan_slices([str(shard)], 32)

    @ray.remote(num_cpus=0.5)
    class Probe(EmbedActor):
        """m9's embed actor, as `m9 embed` builds it, that also says which modules its process loaded."""

        def modules(self):
            return sorted(m for m in ("tensorflow", "keras", "onnxruntime") if m in sys.modules)

    probe = Probe.remote(ray.put(onnx_model), 1, 8)
    out = ray.get(probe.embed_item.remote(item))
    loaded = ray.get(probe.modules.remote())
    ray.kill(probe)
    assert loaded == ["onnxruntime"]
    assert list(out["image_id"]) == rows["image_id"] and list(out["shard"]) == [str(shard)] * 4
    assert list(out["error"]) == [""] * 4
    expected = Embedder(onnx_model, threads=1).embed(contents)[0]
    assert np.abs(out["features"] - expected).max() <= TOLERANCE


@pytest.mark.slow
def test_embed_with_runtime_keras_matches_the_default_onnx_output(pipeline, ray_local, tmp_path):
    import pyarrow.parquet as pq

    from m9.config import EmbedConfig
    from m9.stages.embed import embed

    result = embed(EmbedConfig(input=pipeline["dirs"]["images"], output=str(tmp_path), actors=2, runtime="keras"))
    assert result.details["runtime"] == "keras" and pipeline["embed"].details["runtime"] == "onnx"
    assert result.counts["embedded"] == pipeline["embed"].counts["embedded"]

    def features(folder):
        table = pq.read_table(str(Path(folder, "embeddings"))).sort_by("image_id")
        return np.stack(table["features"].to_numpy(zero_copy_only=False))

    assert np.abs(features(tmp_path) - features(pipeline["dirs"]["embed"])).max() <= TOLERANCE


@pytest.mark.slow
def test_the_bench_can_time_the_default_session_against_every_candidate(onnx_path):
    inputs = np.random.default_rng(0).uniform(-1, 1, (4, 224, 224, 3)).astype(np.float32)
    report = ort.defaults_vs_best(m9weights.read_onnx(onnx_path), 1, inputs, 2, rounds=1, seconds=0.05)
    assert set(report["images_per_s"]) == set(ort.candidates(1))
    assert all(rate > 0 for rate in report["images_per_s"].values())
    assert report["best"] in report["images_per_s"] and 0 < report["default_over_best"] <= 1
