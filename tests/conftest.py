"""Shared fixtures: one real Spark session, one real local Ray and one pipeline run for the whole suite."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The suite's stages run without a feature store unless a test names one (--store, EmbedConfig.store): a
# test's embed then computes what it exercises instead of finding an earlier test's features in the cache.
os.environ["M9_STORE"] = "none"

SAMPLE = Path(__file__).resolve().parent.parent / "m9" / "sample"

#: Small resources for the suite's own Ray (as Ray's own tests do): two CPUs, a small object store.
TEST_RAY_CPUS = 2
TEST_OBJECT_STORE_BYTES = 512 * 1024**2

#: k for the suite's PCA: small enough to be quick, large enough to compare a real spectrum.
TEST_K = 12

# ---------------------------------------------------------------------------------------------------------
# The fast tier (`pytest -m "not slow"`) must stay fast: a test that starts an engine without the `slow`
# marker fails, so forgetting the marker cannot quietly make everyday runs slow.
# ---------------------------------------------------------------------------------------------------------

#: Engines whose import alone costs seconds (and whose use costs more): only slow tests may load them.
HEAVY_MODULES = ("pyspark", "ray", "tensorflow", "keras")

#: Fixtures that start Spark, Ray, TensorFlow (weights), terraform, a moto server or a simulated cluster.
#: item.fixturenames is the transitive closure, so a module fixture built on one of these counts too.
HEAVY_FIXTURES = frozenset(
    {"spark", "ray_local", "weights_path", "pipeline", "moto_port", "tf_workdir", "emr_sim_cluster"}
)

_HEAVY_BEFORE = pytest.StashKey[frozenset]()


def _heavy_loaded() -> frozenset:
    return frozenset(name for name in HEAVY_MODULES if name in sys.modules)


def _is_slow(item: pytest.Item) -> bool:
    return item.get_closest_marker("slow") is not None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Refuse, before any fixture starts, a fast-tier test that asks for an engine fixture."""
    item.stash[_HEAVY_BEFORE] = _heavy_loaded()
    heavy = sorted(HEAVY_FIXTURES.intersection(getattr(item, "fixturenames", ())))
    if heavy and not _is_slow(item):
        pytest.fail(
            f"{item.nodeid} uses {', '.join(heavy)} but is not marked slow: add @pytest.mark.slow "
            f"(or pytestmark = pytest.mark.slow for the module)",
            pytrace=False,
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Fail a fast-tier test that imported an engine (directly or through m9's lazy imports)."""
    result = yield
    loaded = _heavy_loaded() - item.stash.get(_HEAVY_BEFORE, frozenset())
    if loaded and not _is_slow(item):
        pytest.fail(
            f"{item.nodeid} imported {', '.join(sorted(loaded))} but is not marked slow: mark it "
            f"@pytest.mark.slow, or keep the engine out of it",
            pytrace=False,
        )
    return result


def kill_session(proc) -> None:
    """kill -9 a command started with start_new_session=True and every process of its session (the Spark
    JVM and the local Ray it started, which outlive a kill of the command alone), as a kill of a job does."""
    import signal
    import subprocess

    ps = subprocess.run(["ps", "-e", "-o", "pid=,sid="], capture_output=True, text=True, check=True).stdout
    for pid, sid in (line.split() for line in ps.splitlines()):
        if int(sid) == proc.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    proc.wait()


def write_bad_images(folder: Path) -> dict[str, str]:
    """A truncated JPEG, a zero-byte .jpg and a text file named .png; returns name → expected reason start."""
    folder.mkdir(parents=True, exist_ok=True)
    good = next(SAMPLE.glob("Training/*/*.jpg")).read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("this is not a picture\n")
    return {"truncated.jpg": "cannot decode", "empty.jpg": "empty file", "notes.png": "cannot decode"}


@pytest.fixture(scope="session")
def spark():
    """A real local Spark session for the whole suite (m9's stages reuse an active session)."""
    from m9.engines import spark as m9spark

    # s3=True: the s3a jars must be on the JVM's classpath from the start for tests/test_s3.py.
    with m9spark.session("m9-tests", master="local[2]", s3=True) as session:
        yield session


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with small resources, started once."""
    import ray

    ray.init(
        num_cpus=TEST_RAY_CPUS,
        object_store_memory=TEST_OBJECT_STORE_BYTES,
        include_dashboard=False,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def weights_path() -> Path:
    from m9.model import weights

    return weights.fetch()


@pytest.fixture(scope="session")
def images_tree(tmp_path_factory) -> Path:
    """The bundled sample plus three broken files under Training/broken/."""
    root = tmp_path_factory.mktemp("images")
    shutil.copytree(SAMPLE, root, dirs_exist_ok=True)
    write_bad_images(root / "Training" / "broken")
    return root


@pytest.fixture(scope="session")
def pipeline(spark, ray_local, weights_path, images_tree, tmp_path_factory) -> dict:
    """ingest → embed → reduce on images_tree, once; returns folders and each stage's manifest."""
    from m9.config import EmbedConfig, IngestConfig, ReduceConfig
    from m9.stages.embed import embed
    from m9.stages.ingest import ingest
    from m9.stages.reduce import reduce

    work = tmp_path_factory.mktemp("work")
    dirs = {name: str(work / name) for name in ("images", "embed", "reduce")}
    return {
        "dirs": dirs,
        "ingest": ingest(IngestConfig(input=str(images_tree), output=dirs["images"], images_per_file=100)),
        "embed": embed(EmbedConfig(input=dirs["images"], output=dirs["embed"], actors=2, batch_size=8)),
        "reduce": reduce(ReduceConfig(input=dirs["embed"], output=dirs["reduce"], k=TEST_K)),
    }


@contextlib.contextmanager
def moto_server() -> Iterator[int]:
    """moto's S3 API server on a free loopback port (never AWS); yields the port."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    try:
        yield port
    finally:
        server.stop()


def point_aws_at(mp: pytest.MonkeyPatch, endpoint: str, access_key: str, secret_key: str) -> None:
    """The AWS environment m9 reads (credentials, region, m9's endpoint variable) pointed at endpoint, and
    nothing that could send it elsewhere (profiles, other endpoints, the instance metadata service)."""
    from m9.io.storage import S3_ENDPOINT_ENV

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(name, raising=False)
    mp.setenv("AWS_ACCESS_KEY_ID", access_key)
    mp.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
    mp.setenv("AWS_REGION", "us-east-1")
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask 169.254.169.254: loopback only
    mp.setenv(S3_ENDPOINT_ENV, endpoint)
