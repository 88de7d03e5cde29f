"""Simulated EMR cluster: bootstrap/bootstrap.sh starts a real 3-node Ray cluster on loopback.

The nodes run the systemd-less path (a supervising loop restarts Ray), with Ray's token authentication on;
m9-preflight (bootstrap/m9_preflight.py) is checked against the cluster, refusing a step when a node is missing.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = []
psutil = pytest.importorskip("psutil")
pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
BOOTSTRAP = REPO / "bootstrap" / "bootstrap.sh"
VENV_BIN = Path(sys.executable).parent
NODE_IP = "127.0.0.1"
# Ray refuses object stores below 75 MiB; three nodes share this machine.
OBJECT_STORE_BYTES = 80 * 1024 * 1024
START_TIMEOUT_S = 120
#: Several raylets share this host, each handing its workers (and every driver that connects through
#: it) ports from its own range without checking them: the ranges must not overlap, must sit below
#: the kernel's ephemeral ports (32768 on), and must be wide. Ray takes a while to give a finished
#: driver's or killed actor's port back; with 10 ports a node, about the tenth `m9 embed` in a row
#: was refused ("Failed to register worker to Raylet: No available ports") or hung.
WORKER_PORT_BASE = 20000
WORKER_PORTS = 200


def worker_port_range(index: int, base: int = WORKER_PORT_BASE) -> list[str]:
    """`ray start` options giving the index-th simulated node its own worker ports."""
    low = base + index * WORKER_PORTS
    return [f"--min-worker-port={low}", f"--max-worker-port={low + WORKER_PORTS - 1}"]


PREFLIGHT = REPO / "bootstrap" / "m9_preflight.py"
NODE_NAMES = ("master", "core1", "core2")
CORE_CPUS = 2

pytestmark.append(
    pytest.mark.skipif(
        shutil.which("ray", path=str(VENV_BIN)) is None,
        reason="no ray executable next to the test interpreter",
    )
)


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind((NODE_IP, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _job_flow_state(provisioned: bool) -> str:
    """The part of EMR's job-flow-state.txt (protobuf text) the bootstrap reads."""
    status = "SUCCESSFUL" if provisioned else "PROVISIONING"
    return f"""\
jobFlowId: "j-SIMULATED"
instanceCount: 3
localInstance {{
  instanceId: "i-sim"
  instanceGroupId: "ig-sim"
  nodeProvisionCheckinRecord {{
    nodeProvisionTime: 1700000000000
    status: {status}
  }}
}}
"""


def _fake_node(root: Path, name: str, master: bool, provisioned: bool) -> Path:
    info = root / name
    info.mkdir()
    (info / "instance.json").write_text(json.dumps({"isMaster": master, "instanceGroupId": f"ig-{name}"}))
    (info / "extraInstanceData.json").write_text(
        json.dumps(
            {
                "instanceRole": "Master" if master else "Core",
                "masterHost": NODE_IP,
                "jobFlowId": "j-SIMULATED",
            }
        )
    )
    (info / "job-flow-state.txt").write_text(_job_flow_state(provisioned))
    return info


def _node_env(info: Path, index: int, tag: str, gcs_port: int, temp_dir: str, token: Path) -> dict[str, str]:
    """Everything that makes bootstrap.sh treat this folder as an EMR node on loopback."""
    # Several raylets on one host: every port Ray would otherwise fix must differ.
    nm, om, agent, agent_grpc, metrics, runtime_env = _free_ports(6)
    extra = [
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
        *worker_port_range(index),
    ]
    env = dict(os.environ)
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        M9_SKIP_INSTALL="1",
        # The venv's parent folder holds the node's state (ray.env, the supervised copy of bootstrap.sh).
        M9_VENV=str(info / "m9" / "venv"),
        # As on EMR, where the bootstrap fetched it from SSM: one token for the whole cluster.
        M9_RAY_TOKEN_FILE=str(token),
        M9_NODE_ID=info.name,
        # This machine may or may not run systemd; the test is about the fallback either way.
        M9_NO_SYSTEMD="1",
        M9_RAY_RESTART_DELAY_S="1",
        M9_LOG_URI=str(info.parent / "shipped-logs"),
        M9_LOG_SHIP_INTERVAL_S="1",
        # No dashboard: its fixed port 8265 may belong to another Ray on this machine.
        M9_RAY_DASHBOARD="0",
        M9_EMR_INFO_DIR=str(info),
        M9_BOOTSTRAP_LOG=str(info / "bootstrap.log"),
        M9_RAY_PORT=str(gcs_port),
        M9_RAY_NODE_IP=NODE_IP,
        # One temp dir (sockets, logs, session) per simulated machine.
        M9_RAY_TEMP_DIR=f"{temp_dir}/{index}",
        M9_RAY_NUM_CPUS=str(CORE_CPUS),
        M9_RAY_OBJECT_STORE_BYTES=str(OBJECT_STORE_BYTES),
        M9_RAY_EXTRA_ARGS=" ".join(extra),
        M9_POLL_INTERVAL_S="0.2",
        M9_WAIT_TIMEOUT_S=str(START_TIMEOUT_S),
        # Teardown finds every process of this simulation (waiters, Ray daemons,
        # Ray workers) by this variable, and nothing else on the machine.
        M9_SIM_TAG=tag,
        RAY_USAGE_STATS_ENABLED="0",
    )
    return env


def _run_bootstrap(env: dict[str, str]) -> float:
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(BOOTSTRAP)],
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - start
    log = Path(env["M9_BOOTSTRAP_LOG"])
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{log.read_text() if log.exists() else ''}"
    return elapsed


def _auth_env(token: Path | None) -> dict[str, str]:
    """A driver's environment: the cluster's token, or (None) no token at all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
    if token is None:
        env["RAY_AUTH_MODE"] = "disabled"
    else:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    return env


def _alive_nodes(address: str, token: Path) -> list[dict]:
    """Alive Ray nodes, asked from a separate driver so this process never joins the cluster."""
    code = (
        "import json, sys, ray\n"
        f"ray.init(address=sys.argv[1], _node_ip_address={NODE_IP!r}, logging_level='ERROR', log_to_driver=False)\n"
        "print(json.dumps([n for n in ray.nodes() if n['Alive']]))\n"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, address],
            capture_output=True,
            check=False,
            text=True,
            timeout=60,
            env=_auth_env(token),
        )
    except subprocess.TimeoutExpired:  # a busy machine; the caller polls again
        return []
    if proc.returncode != 0:
        return []
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _tagged(tag: str) -> list[psutil.Process]:
    """Processes whose environment carries M9_SIM_TAG=tag.

    Reads /proc directly: Ray's processes rename themselves (setproctitle), which
    pads their environment block with NULs and stops psutil.environ() early.
    """
    needle = f"M9_SIM_TAG={tag}".encode()
    procs = []
    for p in psutil.process_iter():
        try:
            if needle in Path(f"/proc/{p.pid}/environ").read_bytes() and p.status() != psutil.STATUS_ZOMBIE:
                procs.append(p)
        except (
            OSError,
            psutil.NoSuchProcess,
            psutil.AccessDenied,
            psutil.ZombieProcess,
        ):
            continue
    return procs


def _kill_tagged(tag: str) -> None:
    """SIGTERM, then SIGKILL, every process of this simulation (Ray's agents may outlive their raylet)."""
    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
        procs = _tagged(tag)
        if not procs:
            return
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=3)
    left = _tagged(tag)
    assert not left, f"could not stop {left}"


def _logs(infos: list[Path]) -> str:
    return "\n".join(
        f"--- {i.name}\n{(i / 'bootstrap.log').read_text()}" for i in infos if (i / "bootstrap.log").exists()
    )


def _wait_for(what: str, predicate, timeout: float = START_TIMEOUT_S, detail=lambda: "") -> None:
    """Polls predicate() until it holds; a fixed sleep here was the race that made this test flaky."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what} after {timeout:.0f}s\n{detail()}"
        time.sleep(0.2)


@dataclass(frozen=True)
class SimCluster:
    address: str
    token: Path
    root: Path
    infos: tuple[Path, ...]
    tag: str


@pytest.fixture(scope="module")
def emr_sim_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimCluster]:
    """A Ray cluster started by bootstrap.sh on a fake master and two fake core nodes."""
    root = tmp_path_factory.mktemp("emr")
    # Ray's unix sockets live under the temp dir and must stay under ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="m9ray", dir="/tmp")
    tag = uuid.uuid4().hex
    (gcs_port,) = _free_ports(1)
    address = f"{NODE_IP}:{gcs_port}"
    token = root / "ray-auth-token"
    token.write_text(secrets.token_hex(32))

    master = _fake_node(root, "master", master=True, provisioned=False)
    cores = [_fake_node(root, f"core{i}", master=False, provisioned=True) for i in (1, 2)]
    infos = [master, *cores]
    try:
        t0 = time.monotonic()
        # As on EMR, all nodes bootstrap at once; each returns before Ray is up.
        for index, info in enumerate(infos):
            elapsed = _run_bootstrap(_node_env(info, index, tag, gcs_port, temp_dir, token))
            assert elapsed < 10, f"bootstrap on {info.name} blocked for {elapsed:.1f}s"

        # The master must hold the head back until EMR has provisioned it. The supervised half logs its
        # wait only once it has started, which a loaded machine may delay past any fixed sleep.
        master_log = master / "bootstrap.log"
        _wait_for(
            "the master to wait for provisioning",
            lambda: "waiting for EMR to finish provisioning" in master_log.read_text(),
            timeout=60,
            detail=lambda: _logs(infos),
        )
        with socket.socket() as s:
            assert s.connect_ex((NODE_IP, gcs_port)) != 0, "Ray head started before provisioning finished"
        (master / "job-flow-state.txt").write_text(_job_flow_state(provisioned=True))

        nodes: list[dict] = []

        def three_alive() -> bool:
            nonlocal nodes
            nodes = _alive_nodes(address, token)
            return len(nodes) >= 3

        _wait_for("3 alive Ray nodes", three_alive, detail=lambda: f"{len(nodes)} alive\n{_logs(infos)}")
        assert len(nodes) == 3
        print(f"emr_sim_cluster: 3 Ray nodes alive {time.monotonic() - t0:.1f}s after the first bootstrap")
        yield SimCluster(address=address, token=token, root=root, infos=tuple(infos), tag=tag)
    finally:
        _kill_tagged(tag)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_three_ray_nodes_join(emr_sim_cluster: SimCluster) -> None:
    nodes = _alive_nodes(emr_sim_cluster.address, emr_sim_cluster.token)
    assert len(nodes) == 3
    # Ray replaces --node-ip-address 127.0.0.1 by the host's own interface
    # address; either way the traffic never leaves this machine.
    local_addresses = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    assert {n["NodeManagerAddress"] for n in nodes} <= local_addresses
    # Named after the node (the EC2 instance id on EMR), which the step's preflight relies on; --num-cpus from
    # the bootstrap, not Ray's guess from the machine, and none on the head.
    cpus = {n["NodeName"]: n["Resources"].get("CPU", 0.0) for n in nodes}
    assert cpus == {"master": 0.0, "core1": float(CORE_CPUS), "core2": float(CORE_CPUS)}


@pytest.mark.slow
def test_bootstrap_logs_each_role(emr_sim_cluster: SimCluster) -> None:
    logs = {i.name: (i / "bootstrap.log").read_text() for i in emr_sim_cluster.infos}
    assert "node role: master" in logs["master"] and "starting Ray head" in logs["master"]
    assert "--num-cpus 0" in logs["master"]
    for name, log in logs.items():
        assert "no systemd here: Ray runs under a supervising loop" in log, name
        assert "bootstrap done" in log, name
    for core in ("core1", "core2"):
        assert "node role: worker" in logs[core] and f"joining Ray at {emr_sim_cluster.address}" in logs[core]
        assert "(token auth)" in logs[core]


@pytest.mark.slow
def test_a_driver_without_the_token_is_refused(emr_sim_cluster: SimCluster, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong-token"
    wrong.write_text(secrets.token_hex(32))
    for env in (_auth_env(None), _auth_env(wrong)):
        proc = subprocess.run(
            [sys.executable, str(PREFLIGHT), "--address", emr_sim_cluster.address, "--expect", "master",
             "--timeout", "0", "--", "true"],
            capture_output=True, text=True, check=False, timeout=180, env=env,
        )  # fmt: skip
        assert proc.returncode == 1, proc.stderr
        (line,) = [x for x in proc.stderr.splitlines() if x.startswith("Error:")]
        assert "Ray at" in line, line


def _preflight(
    cluster: SimCluster, tmp_path: Path, expect: str, timeout: str
) -> tuple[subprocess.CompletedProcess, Path]:
    marker = tmp_path / "step-ran"
    proc = subprocess.run(
        [sys.executable, str(PREFLIGHT), "--address", cluster.address, "--expect", expect, "--timeout", timeout,
         "--poll", "0.5", "--", sys.executable, "-c", f"open({str(marker)!r}, 'w').write('ran')"],
        capture_output=True, text=True, check=False, timeout=180, env=_auth_env(cluster.token),
    )  # fmt: skip
    return proc, marker


@pytest.mark.slow
def test_preflight_runs_the_step_when_every_node_joined(emr_sim_cluster: SimCluster, tmp_path: Path) -> None:
    proc, marker = _preflight(emr_sim_cluster, tmp_path, ",".join(NODE_NAMES), "30")
    assert proc.returncode == 0, proc.stderr
    assert marker.read_text() == "ran"
    assert "all 3 expected Ray nodes joined" in proc.stderr


@pytest.mark.slow
def test_preflight_refuses_the_step_when_a_node_is_missing(emr_sim_cluster: SimCluster, tmp_path: Path) -> None:
    proc, marker = _preflight(emr_sim_cluster, tmp_path, ",".join([*NODE_NAMES, "core3"]), "1")
    assert proc.returncode == 1
    errors = [x for x in proc.stderr.splitlines() if x.startswith("Error:")]
    assert errors == [errors[0]] and "Ray nodes missing after 1 s: core3 (joined: core1, core2, master)" in errors[0]
    assert not marker.exists(), "the step ran although a node was missing"


@pytest.mark.slow
def test_logs_are_shipped(emr_sim_cluster: SimCluster) -> None:
    shipped = emr_sim_cluster.root / "shipped-logs" / "j-SIMULATED"
    for name in NODE_NAMES:
        node = shipped / name
        _wait_for(f"{name}'s logs to be shipped", lambda node=node: (node / "bootstrap.log").exists(), timeout=30)
        assert "node role:" in (node / "bootstrap.log").read_text()
        _wait_for(f"{name}'s Ray logs to be shipped", lambda node=node: any((node / "ray").glob("raylet*")), timeout=30)


def _failing_env(tmp_path: Path, artifacts: Path) -> dict[str, str]:
    info = _fake_node(tmp_path, "node", master=False, provisioned=True)
    env = dict(os.environ)
    env.update(
        M9_EMR_INFO_DIR=str(info),
        M9_BOOTSTRAP_LOG=str(tmp_path / "bootstrap.log"),
        M9_ARTIFACTS_URI=str(artifacts),
        M9_VENV=str(tmp_path / "venv"),
        M9_PYTHON=sys.executable,
    )
    return env


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"m9-0.1.0-py3-none-any.whl": ""}, "constraints.txt missing"),
        (
            {
                "constraints.txt": "ray==2.0\n",
                "m9-0.1.0-py3-none-any.whl": "",
                "m9-0.2.0-py3-none-any.whl": "",
            },
            "expected exactly one m9 wheel or sdist",
        ),
    ],
)
def test_install_fails_loudly(tmp_path: Path, files: dict[str, str], message: str) -> None:
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    for name, content in files.items():
        (artifacts / name).write_text(content)
    proc = subprocess.run(
        ["bash", str(BOOTSTRAP)],
        env=_failing_env(tmp_path, artifacts),
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert message in (tmp_path / "bootstrap.log").read_text()
    assert not (tmp_path / "venv").exists(), "nothing may be installed from incomplete artifacts"


def test_unknown_argument_is_an_error() -> None:
    proc = subprocess.run(
        ["bash", str(BOOTSTRAP), "--nope"],
        capture_output=True,
        check=False,
        text=True,
        timeout=10,
    )
    assert proc.returncode == 2
    assert "unknown argument: --nope" in proc.stderr


@pytest.mark.slow
def test_embed_on_the_simulated_cluster_equals_the_local_run(
    emr_sim_cluster: SimCluster, pipeline, tmp_path: Path
) -> None:
    """`m9 embed --ray-address` against the bootstrapped 3-node cluster: actors on several nodes, same output."""
    import numpy as np
    import pyarrow.parquet as pq

    out = tmp_path / "embed"
    # The driver holds the cluster's token, as the EMR step does (RAY_AUTH_TOKEN_PATH).
    env = _auth_env(emr_sim_cluster.token)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "m9.cli",
            "embed",
            "--input",
            pipeline["dirs"]["images"],
            "--output",
            str(out),
            "--ray-address",
            emr_sim_cluster.address,
            "--actors",
            "3",
            "--batch-size",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    counts = json.loads((out / "_m9.json").read_text())["counts"]
    assert counts["model_loads"] == 3
    assert counts["model_load_nodes"] >= 2, counts
    cluster = pq.read_table(out / "embeddings").to_pandas().sort_values("image_id").reset_index(drop=True)
    local = pq.read_table(Path(pipeline["dirs"]["embed"], "embeddings")).to_pandas()
    local = local.sort_values("image_id").reset_index(drop=True)
    assert list(cluster["image_id"]) == list(local["image_id"])
    diff = np.abs(np.stack(cluster["features"].to_numpy()) - np.stack(local["features"].to_numpy())).max()
    assert diff <= 1e-5
    errors = pq.read_table(out / "errors").to_pandas()
    assert sorted(errors["image_id"]) == sorted(
        pq.read_table(Path(pipeline["dirs"]["embed"], "errors")).column("image_id").to_pylist()
    )


@pytest.mark.slow
def test_the_supervisor_restarts_a_dead_ray_node(emr_sim_cluster: SimCluster) -> None:
    """Kill core2's raylet: `ray start --block` exits, the supervising loop starts core2 again, and it rejoins."""
    cluster = emr_sim_cluster
    before = {n["NodeName"]: n["NodeID"] for n in _alive_nodes(cluster.address, cluster.token)}
    needle = b"M9_NODE_ID=core2"
    raylets = []
    for p in _tagged(cluster.tag):
        try:
            if p.name() == "raylet" and needle in Path(f"/proc/{p.pid}/environ").read_bytes():
                raylets.append(p)
        except (OSError, psutil.Error):
            continue
    assert len(raylets) == 1, raylets
    raylets[0].kill()
    log = cluster.root / "core2" / "bootstrap.log"
    _wait_for("the supervisor to notice", lambda: "Ray node exited" in log.read_text(), timeout=120)

    def rejoined() -> bool:
        return any(
            n["NodeName"] == "core2" and n["NodeID"] != before["core2"]
            for n in _alive_nodes(cluster.address, cluster.token)
        )

    _wait_for("core2 to rejoin", rejoined, detail=lambda: log.read_text()[-3000:])
    assert log.read_text().count("joining Ray at") >= 2


# --- the hashed wheelhouse ------------------------------------------------------------

WHEELHOUSE_SCRIPT = REPO / "bootstrap" / "build_wheelhouse.sh"


def _toy_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    """A minimal pure-Python wheel, built by hand so the test needs neither an index nor a build backend."""
    import zipfile

    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist_info}/METADATA": "Metadata-Version: 2.1\n"
        f"Name: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist_info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{dist_info}/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for arcname, text in files.items():
            zf.writestr(arcname, text)
    return path


@pytest.mark.slow
def test_wheelhouse_is_hashed_and_installs_only_what_was_built(tmp_path: Path) -> None:
    index = tmp_path / "index"
    index.mkdir()
    _toy_wheel(index, "toydep", "1.0", [])
    _toy_wheel(index, "toydep", "2.0", [])
    m9_wheel = _toy_wheel(tmp_path, "m9", "0.0.1", ["toydep"])
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("toydep==1.0\nunrelated==9.9\n")  # read generically: pins for absent packages are fine
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "model.weights.h5").write_bytes(b"h5")
    (cache / "model.onnx").write_bytes(b"onnx")
    (cache / "model.onnx.json").write_text("{}")
    (cache / "jars").mkdir()  # not weights: not copied
    out = tmp_path / "wheelhouse"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "M9_CACHE_DIR": str(cache),
        "M9_WHEELHOUSE_NODE": "",
        "M9_WHEELHOUSE_EXTRA": "",
        "M9_UV_ARGS": f"--no-index --find-links {index}",
        "M9_PIP_DOWNLOAD_ARGS": f"--no-index --find-links {index}",
    }
    proc = subprocess.run(
        ["bash", str(WHEELHOUSE_SCRIPT), str(m9_wheel), str(out), str(constraints)],
        capture_output=True, text=True, check=False, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = (out / "requirements.txt").read_text().splitlines()
    assert [line.split(" ")[0] for line in lines] == ["m9==0.0.1", "toydep==1.0"]  # the constraint won
    assert all(re.search(r" --hash=sha256:[0-9a-f]{64}$", line) for line in lines)
    assert sorted(p.name for p in (out / "weights").iterdir()) == ["model.onnx", "model.onnx.json", "model.weights.h5"]

    def install(target: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-index",
             "--find-links", str(out), "--require-hashes", "-r", str(out / "requirements.txt"),
             "--target", str(target)],
            capture_output=True, text=True, check=False, timeout=300,
        )  # fmt: skip

    assert install(tmp_path / "site").returncode == 0
    assert (tmp_path / "site" / "toydep" / "__init__.py").read_text() == "VERSION = '1.0'\n"
    # A wheel changed after the build is refused.
    with (out / "toydep-1.0-py3-none-any.whl").open("ab") as f:
        f.write(b"\0")
    tampered = install(tmp_path / "site2")
    assert tampered.returncode != 0 and "HASHES" in tampered.stderr.upper()


def _wheelhouse_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("wheelhouse", REPO / "bootstrap" / "wheelhouse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "fits"),
    [
        ("tensorflow_cpu-2.21.0-cp311-cp311-manylinux_2_27_x86_64.whl", True),  # not in pip's old --platform list
        ("ray-2.60.0-cp311-cp311-manylinux2014_x86_64.whl", True),
        ("numpy-1.26.4-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", True),
        ("six-1.17.0-py2.py3-none-any.whl", True),
        ("cryptography-50.0.2-cp311-abi3-manylinux_2_34_x86_64.whl", True),
        ("numpy-1.26.4-cp311-cp311-macosx_11_0_arm64.whl", False),  # what a Mac deployer's pip would pick
        ("numpy-1.26.4-cp311-cp311-manylinux_2_17_aarch64.whl", False),
        ("numpy-1.26.4-cp312-cp312-manylinux_2_17_x86_64.whl", False),
        ("foo-1.0-cp311-cp311-manylinux_2_35_x86_64.whl", False),  # newer glibc than Amazon Linux 2023's 2.34
        ("foo-1.0-cp311-cp311-linux_x86_64.whl", False),
    ],
)
def test_wheelhouse_refuses_wheels_that_do_not_fit_the_nodes(tmp_path: Path, name: str, fits: bool) -> None:
    wheelhouse = _wheelhouse_module()
    (tmp_path / name).write_bytes(b"")
    assert (wheelhouse.misfits(tmp_path) == []) is fits


def test_wheelhouse_build_refuses_without_uv(tmp_path: Path) -> None:
    wheel = _toy_wheel(tmp_path, "m9", "0.0.1", [])
    proc = subprocess.run(
        ["bash", str(WHEELHOUSE_SCRIPT), str(wheel), str(tmp_path / "out"), str(REPO / "constraints.txt")],
        capture_output=True, text=True, check=False, timeout=60,
        env={**os.environ, "PYTHON": sys.executable, "UV": str(tmp_path / "no-uv")},
    )  # fmt: skip
    assert proc.returncode == 1 and "uv not found" in proc.stderr and "uv==" in proc.stderr


def test_preflight_expects_nodes_that_are_still_bootstrapping(tmp_path: Path) -> None:
    """`--emr` asks EMR for instances still coming up too, so a late node is named, not forgotten."""
    info = _fake_node(tmp_path, "node", master=True, provisioned=True)
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "aws").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\necho \'["i-boot"]\'\n')
    (stub / "aws").chmod(0o755)
    sys.path.insert(0, str(PREFLIGHT.parent))
    try:
        import m9_preflight
    finally:
        sys.path.pop(0)
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{stub}{os.pathsep}{old}"
    try:
        assert m9_preflight.emr_instances(str(info)) == ["i-boot"]
    finally:
        os.environ["PATH"] = old
    args = (tmp_path / "args").read_text().split()
    states = args[args.index("--instance-states") + 1 : args.index("--query")]
    assert states == ["AWAITING_FULFILLMENT", "PROVISIONING", "BOOTSTRAPPING", "RUNNING"]
