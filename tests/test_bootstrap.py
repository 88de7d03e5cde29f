"""Simulated EMR cluster: bootstrap/bootstrap.sh starts a real 3-node Ray cluster on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")
pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
BOOTSTRAP = REPO / "bootstrap" / "bootstrap.sh"
VENV_BIN = Path(sys.executable).parent
NODE_IP = "127.0.0.1"
# Ray refuses object stores below 75 MiB; three nodes share this machine.
OBJECT_STORE_BYTES = 80 * 1024 * 1024
START_TIMEOUT_S = 120
WORKER_PORT_BASE = 36100

pytestmark = pytest.mark.skipif(
    shutil.which("ray", path=str(VENV_BIN)) is None,
    reason="no ray executable next to the test interpreter",
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


def _node_env(info: Path, index: int, tag: str, gcs_port: int, temp_dir: str) -> dict[str, str]:
    """Everything that makes bootstrap.sh treat this folder as an EMR node on loopback."""
    # Several raylets on one host: every port Ray would otherwise fix must differ.
    nm, om, agent, agent_grpc, metrics, runtime_env = _free_ports(6)
    base = WORKER_PORT_BASE + index * 20  # worker ports are picked from a range, not checked
    extra = [
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--min-worker-port={base}",
        f"--max-worker-port={base + 9}",
    ]
    env = dict(os.environ)
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        # As on EMR: no token auth. Without this the nodes inherit RAY_AUTH_MODE=token whenever this test
        # process started a local Ray before (ray.init sets it in os.environ).
        RAY_AUTH_MODE="disabled",
        M9_SKIP_INSTALL="1",
        M9_EMR_INFO_DIR=str(info),
        M9_BOOTSTRAP_LOG=str(info / "bootstrap.log"),
        M9_RAY_PORT=str(gcs_port),
        M9_RAY_NODE_IP=NODE_IP,
        # One temp dir (sockets, logs, session) per simulated machine.
        M9_RAY_TEMP_DIR=f"{temp_dir}/{index}",
        M9_RAY_NUM_CPUS="1",
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


def _alive_nodes(address: str) -> list[dict]:
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
            env={**os.environ, "RAY_AUTH_MODE": "disabled"},  # as the simulated cluster runs
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


@pytest.fixture(scope="module")
def emr_sim_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Ray cluster started by bootstrap.sh on a fake master and two fake core nodes; yields its address."""
    root = tmp_path_factory.mktemp("emr")
    # Ray's unix sockets live under the temp dir and must stay under ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="m9ray", dir="/tmp")
    tag = uuid.uuid4().hex
    (gcs_port,) = _free_ports(1)
    address = f"{NODE_IP}:{gcs_port}"

    master = _fake_node(root, "master", master=True, provisioned=False)
    cores = [_fake_node(root, f"core{i}", master=False, provisioned=True) for i in (1, 2)]
    infos = [master, *cores]
    try:
        t0 = time.monotonic()
        # As on EMR, all nodes bootstrap at once; each returns before Ray is up.
        for index, info in enumerate(infos):
            elapsed = _run_bootstrap(_node_env(info, index, tag, gcs_port, temp_dir))
            assert elapsed < 10, f"bootstrap on {info.name} blocked for {elapsed:.1f}s"

        # The master must hold the head back until EMR has provisioned it.
        time.sleep(1.5)
        assert "waiting for EMR to finish provisioning" in (master / "bootstrap.log").read_text()
        with socket.socket() as s:
            assert s.connect_ex((NODE_IP, gcs_port)) != 0, "Ray head started before provisioning finished"
        (master / "job-flow-state.txt").write_text(_job_flow_state(provisioned=True))

        deadline = time.monotonic() + START_TIMEOUT_S
        nodes: list[dict] = []
        while time.monotonic() < deadline:
            nodes = _alive_nodes(address)
            if len(nodes) >= 3:
                break
            time.sleep(1)
        assert len(nodes) == 3, f"{len(nodes)} alive Ray nodes\n{_logs(infos)}"
        print(f"emr_sim_cluster: 3 Ray nodes alive {time.monotonic() - t0:.1f}s after the first bootstrap")
        yield address
    finally:
        _kill_tagged(tag)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_three_ray_nodes_join(emr_sim_cluster: str) -> None:
    nodes = _alive_nodes(emr_sim_cluster)
    assert len(nodes) == 3
    # Ray replaces --node-ip-address 127.0.0.1 by the host's own interface
    # address; either way the traffic never leaves this machine.
    local_addresses = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    assert {n["NodeManagerAddress"] for n in nodes} <= local_addresses
    # --num-cpus from the bootstrap, not Ray's guess from the machine.
    assert [n["Resources"]["CPU"] for n in nodes] == [1.0, 1.0, 1.0]


@pytest.mark.slow
def test_bootstrap_logs_each_role(emr_sim_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.getbasetemp()
    logs = {p.parent.name: p.read_text() for p in root.glob("emr*/*/bootstrap.log")}
    assert set(logs) == {"master", "core1", "core2"}
    assert "node role: master" in logs["master"] and "starting Ray head" in logs["master"]
    for core in ("core1", "core2"):
        assert "node role: worker" in logs[core] and f"joining Ray at {emr_sim_cluster}" in logs[core]
        assert "Ray node is up" in logs[core]


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
def test_embed_on_the_simulated_cluster_equals_the_local_run(emr_sim_cluster: str, pipeline, tmp_path: Path) -> None:
    """`m9 embed --ray-address` against the bootstrapped 3-node cluster: actors on several nodes, same output."""
    import numpy as np
    import pyarrow.parquet as pq

    out = tmp_path / "embed"
    # This test process runs its own local Ray, whose ray.init set RAY_AUTH_MODE=token here; the bootstrapped
    # cluster runs without token auth, and so must its driver.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
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
            emr_sim_cluster,
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
