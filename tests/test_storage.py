"""S3 settings travel with the command (storage.using), never through the process's environment."""

from __future__ import annotations

import os

from click.testing import CliRunner

from m9.cli import main
from m9.io import storage


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
    assert changed <= {"TF_CPP_MIN_LOG_LEVEL"}  # TensorFlow takes its log level only from the environment
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
