"""m9-preflight: check that the expected Ray nodes joined, then run the command after `--`.

The EMR step runs this before `m9 run`: the cluster reaches WAITING whether or not Ray formed, and an embed
on a cluster missing nodes would run slowly or wait forever for actors. So the step first compares Ray's
alive nodes (named by the bootstrap after their EC2 instance ids, `ray start --node-name`) with the nodes
it expects, waits up to --timeout for late joiners, and otherwise fails with one line:

    Error: Ray nodes missing after 600 s: i-0abc, i-0def (joined: i-0123); ...

Usage:
    m9-preflight [--address auto] (--emr | --expect NAME[,NAME...]) [--timeout S] [--poll S] -- COMMAND...

--emr expects every instance of this EMR cluster that is running or still coming up (`aws emr list-instances`; the cluster id comes from
$M9_EMR_INFO_DIR/extraInstanceData.json). Ray's token comes from the environment (RAY_AUTH_MODE=token,
RAY_AUTH_TOKEN_PATH), as for any Ray driver; a refused connection is an `Error:` line too.
Installed by bootstrap/bootstrap.sh as <venv>/bin/m9-preflight; standard library and Ray only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_INFO_DIR = "/emr/instance-controller/lib/info"
# How long one attempt to connect to Ray may take: a driver without the right token is not refused at
# once by every Ray version, it can hang in its handshake; this turns a hang into a clear error.
CONNECT_TIMEOUT_S = 60
#: EMR instance states of a node that is, or is about to be, part of the cluster.
INSTANCE_STATES = ("AWAITING_FULFILLMENT", "PROVISIONING", "BOOTSTRAPPING", "RUNNING")


class PreflightError(Exception):
    """A reason not to run the step; printed as one `Error:` line."""


def emr_instances(info_dir: str) -> list[str]:
    """EC2 ids of the cluster's instances that are up or coming up, from EMR itself: a node still
    bootstrapping is expected too, so the step waits for it (or names it) instead of starting without it."""
    extra = Path(info_dir, "extraInstanceData.json")
    try:
        cluster = json.loads(extra.read_text())["jobFlowId"]
    except (OSError, ValueError, KeyError) as exc:
        raise PreflightError(f"cannot read the EMR cluster id from {extra}: {exc}") from exc
    cmd = [
        "aws", "emr", "list-instances", "--cluster-id", cluster, "--instance-states", *INSTANCE_STATES,
        "--query", "Instances[].Ec2InstanceId", "--output", "json",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    if proc.returncode != 0:
        raise PreflightError(f"aws emr list-instances failed: {proc.stderr.strip().splitlines()[-1:]}")
    return sorted(json.loads(proc.stdout))


def alive_node_names(address: str) -> list[str]:
    """Names of Ray's alive nodes, asked from a child process so a hung handshake can be timed out."""
    code = (
        "import json, sys, ray\n"
        "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
        "print(json.dumps([n.get('NodeName') or n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]))\n"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, address],
            capture_output=True,
            text=True,
            check=False,
            timeout=CONNECT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        raise PreflightError(
            f"no answer from Ray at {address} within {CONNECT_TIMEOUT_S} s"
            " (does RAY_AUTH_TOKEN_PATH hold the cluster's token?)"
        ) from exc
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PreflightError(f"cannot connect to Ray at {address}: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(address: str, expected: list[str], timeout: float, poll: float) -> list[str]:
    """Waits until every expected node is alive in Ray; returns the alive names or raises PreflightError."""
    deadline = time.monotonic() + timeout
    while True:
        alive = alive_node_names(address)
        missing = sorted(set(expected) - set(alive))
        if not missing:
            return alive
        if time.monotonic() >= deadline:
            joined = ", ".join(sorted(alive)) or "none"
            raise PreflightError(
                f"Ray nodes missing after {timeout:g} s: {', '.join(missing)} (joined: {joined}); "
                "see /var/log/m9/bootstrap.log on those nodes, or their copy under the bucket's logs/m9/"
            )
        time.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("Error: m9-preflight needs `-- COMMAND...` to run after the check", file=sys.stderr)
        return 2
    split = argv.index("--")
    own, command = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(prog="m9-preflight")
    parser.add_argument("--address", default="auto")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--emr", action="store_true", help="expect every running or starting instance of this EMR cluster")
    source.add_argument("--expect", help="comma-separated Ray node names to expect")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--poll", type=float, default=5.0)
    args = parser.parse_args(own)
    if not command:
        print("Error: nothing to run after --", file=sys.stderr)
        return 2
    try:
        if args.emr:
            expected = emr_instances(os.environ.get("M9_EMR_INFO_DIR", DEFAULT_INFO_DIR))
        else:
            expected = [n for n in args.expect.split(",") if n]
        alive = check(args.address, expected, args.timeout, args.poll)
    except PreflightError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(f"m9-preflight: all {len(expected)} expected Ray nodes joined ({len(alive)} alive)", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
