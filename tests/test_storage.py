"""S3 settings travel with the command (storage.using), never through the process's environment."""

from __future__ import annotations

import os

from click.testing import CliRunner

from m9.cli import main
from m9.io import storage
from m9.ui import quiet


def test_using_scopes_the_settings_and_restores_them(monkeypatch):
    monkeypatch.delenv(storage.S3_ENDPOINT_ENV, raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert storage.current_settings().endpoint is None
    with storage.using(storage.S3Settings(endpoint="http://127.0.0.1:9")):
        assert storage.current_settings().endpoint == "http://127.0.0.1:9"
        with storage.using(storage.S3Settings(endpoint="http://127.0.0.1:8")):
            assert storage.current_settings().endpoint == "http://127.0.0.1:8"
        assert storage.current_settings().endpoint == "http://127.0.0.1:9"
    assert storage.current_settings().endpoint is None


def test_the_s3_endpoint_option_leaves_the_environment_alone(monkeypatch):
    monkeypatch.delenv(storage.S3_ENDPOINT_ENV, raising=False)
    before = dict(os.environ)
    result = CliRunner().invoke(main, ["--s3-endpoint", "http://127.0.0.1:9", "ingest", "--help"])
    assert result.exit_code == 0, result.output
    changed = {k for k in set(os.environ) | set(before) if os.environ.get(k) != before.get(k)}
    # The engines' native log levels (TensorFlow and Ray read them only from the environment) are set once.
    assert changed <= set(quiet.QUIET_ENV)
    assert storage.S3_ENDPOINT_ENV not in os.environ
    assert storage.current_settings().endpoint != "http://127.0.0.1:9"


def test_a_refused_request_is_not_called_an_outage():
    """pyarrow's report of a 403 names the missing right, not S3 failing after m9's retries."""
    refused = OSError(
        "When getting information for key 'inputs' in bucket 'b': AWS Error ACCESS_DENIED during HeadObject "
        "operation: No response body."
    )
    error = storage.outage(refused)
    assert "S3 refused a request" in str(error) and "lack a right on that key" in str(error)
    assert "kept failing" not in str(error)
    busy = OSError("When reading 'b/k': AWS Error SLOW_DOWN during GetObject operation: Please reduce your rate.")
    assert "kept failing after 10 attempts" in str(storage.outage(busy))


class Py4JJavaError(Exception):
    """Stands in for py4j's class, which storage recognises by name (it does not import Spark)."""


def test_a_refused_s3a_request_names_the_key_and_the_right():
    """Spark's Java error for a 403 from s3a (as Hadoop 3.3 words it) becomes one line: the key, the right."""
    java = Py4JJavaError(
        "An error occurred while calling o102.load.\n: java.nio.file.AccessDeniedException: s3a://b/logs/x: "
        "getFileStatus on s3a://b/logs/x: com.amazonaws.services.s3.model.AmazonS3Exception: Forbidden "
        "(Service: Amazon S3; Status Code: 403; Error Code: 403 Forbidden)\n\tat org.apache.hadoop.fs.s3a.S3AUtils"
    )
    error = storage.outage(RuntimeError("wrapped")) or storage.outage(java)
    assert str(error).startswith("S3 refused Spark's getFileStatus of s3://b/logs/x (403)")
    assert "s3:GetObject" in str(error) and "\n" not in str(error)
    other = Py4JJavaError("An error occurred while calling o1.load.\n: java.lang.OutOfMemoryError: Java heap space")
    assert storage.outage(other) is None


def test_check_access_asks_s3_once_per_uri_and_settings_in_a_process(monkeypatch):
    """`m9 run` and each stage check the same prefixes: a write check (a PUT and a DELETE) is made once.
    Counted at m9's client factory, each request made through the real client against moto."""
    import pytest

    from tests.conftest import moto_server, point_aws_at

    with moto_server() as port:
        point_aws_at(monkeypatch, f"http://127.0.0.1:{port}", "k", "s")
        storage.s3_client().create_bucket(Bucket="checked")
        calls = []
        real = storage._s3_client

        def counting(settings):
            calls.append(settings)
            return real(settings)

        monkeypatch.setattr(storage, "_s3_client", counting)
        for _ in range(3):
            storage.check_access(read="s3://checked/in", write="s3://checked/w")
        assert len(calls) == 2  # one read check, one write check
        storage.check_access(read="s3://checked/other")
        assert len(calls) == 3
        for _ in range(2):  # a refusal is asked again each time (the bucket may be made meanwhile)
            with pytest.raises(storage.StorageError):
                storage.check_access(read="s3://missing/in")
        assert len(calls) == 5
        point_aws_at(monkeypatch, f"http://127.0.0.1:{port}", "k2", "s2")  # other credentials: asked again
        storage.check_access(read="s3://checked/in")
        assert len(calls) == 6
