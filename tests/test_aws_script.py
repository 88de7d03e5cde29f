"""infra/aws.sh without AWS: shellcheck, argument handling, dry runs, and stub terraform/aws executables."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "infra" / "aws.sh"
SAMPLE = REPO / "m9" / "sample"
OUTPUTS = {"bucket_name": "m9-test-bucket", "region": "eu-west-1", "cluster_id": "j-TEST"}
STEP_ARGS = [
    "/usr/bin/env",
    "M9_SPARK_MASTER=yarn",
    "/opt/m9/venv/bin/m9",
    "run",
    "--input",
    "s3://m9-test-bucket/inputs/",
    "--workdir",
    "s3://m9-test-bucket/runs/RUN_ID/",
    "--ray-address",
    "auto",
]


def _env(tmp_path: Path, dry_run: bool = True, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "TF_", "M9_TF_OUTPUT_", "M9_AWS_")) and k not in ("KEEP", "RUN_ID")
    }
    env.update({f"M9_TF_OUTPUT_{k}": v for k, v in OUTPUTS.items()})
    env["M9_TF_OUTPUT_run_step_args"] = json.dumps(STEP_ARGS)
    if dry_run:
        env["M9_AWS_DRY_RUN"] = "1"
    env.update(extra)
    return env


def _run(tmp_path: Path, *args: str, dry_run: bool = True, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=tmp_path,
        env=_env(tmp_path, dry_run, **extra),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _commands(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The commands a dry run printed, without the '+ '."""
    return [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]


def test_shellcheck_and_syntax() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, check=False).returncode == 0
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (apt-get install -y shellcheck)")
    proc = subprocess.run([shellcheck, "-x", str(SCRIPT)], capture_output=True, check=False, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_help_lists_every_command(tmp_path: Path) -> None:
    proc = _run(tmp_path, "--help")
    assert proc.returncode == 0
    for command in (
        "up",
        "upload [DIR]",
        "upload --fruits360",
        "run [RUN_ID]",
        "fetch RUN_ID",
        "down",
        "all",
        "shell",
        "notebook",
        "dashboard",
        "spark-history",
        "yarn",
    ):
        assert f"\n  {command}" in proc.stdout, command


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "no command given"),
        (("deploy",), "unknown command: deploy"),
        (("up", "extra"), "up takes no arguments"),
        (("fetch",), "fetch needs RUN_ID"),
        (("run", "a", "b"), "run takes at most one RUN_ID"),
        (("run", "../etc"), "RUN_ID must be"),
        (("fetch", "bad id"), "RUN_ID must be"),
        (("upload", "--force"), "unknown option: --force"),
        (("upload", "a", "b"), "upload takes at most one DIR"),
        (("upload", "--fruits360", "a.zip", "b"), "at most one ARCHIVE"),
        (("notebook", "extra"), "notebook takes no arguments"),
    ],
)
def test_bad_arguments_exit_2_and_say_why(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    proc = _run(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not _commands(proc)


def test_dry_run_up_builds_the_wheel_then_applies(tmp_path: Path) -> None:
    proc = _run(tmp_path, "up", AUTO_APPROVE="1")
    assert proc.returncode == 0, proc.stderr
    version = next(
        line.split('"')[1]
        for line in (REPO / "m9" / "__init__.py").read_text().splitlines()
        if line.startswith("__version__")
    )
    wheel = f"{REPO}/dist/m9-{version}-py3-none-any.whl"
    build, weights, wheelhouse, init, apply = _commands(proc)
    assert "-m pip wheel --no-deps" in build and f"-w {REPO}/dist {REPO}" in build
    # The nodes install only from the hashed wheelhouse, with the verified weights in it.
    assert weights.endswith("m9 weights fetch")
    assert wheelhouse.endswith(f"bash {REPO}/bootstrap/build_wheelhouse.sh {wheel} {REPO}/infra/wheelhouse")
    assert init == f"terraform -chdir={REPO}/infra init -input=false"
    assert apply == f"terraform -chdir={REPO}/infra apply -input=false -auto-approve -var m9_dist={wheel}"


def test_dry_run_upload_defaults_to_the_sample(tmp_path: Path) -> None:
    proc = _run(tmp_path, "upload")
    assert proc.returncode == 0, proc.stderr
    assert _commands(proc) == [
        f"aws s3 sync {SAMPLE} s3://m9-test-bucket/inputs/ --region eu-west-1 --only-show-errors"
    ]
    assert _run(tmp_path, "upload", str(tmp_path / "missing")).returncode == 1


def test_dry_run_upload_fruits360(tmp_path: Path) -> None:
    proc = _run(tmp_path, "upload", "--fruits360", "fruits.zip", M9="m9")
    assert proc.returncode == 0, proc.stderr
    assert _commands(proc) == [
        "env AWS_REGION=eu-west-1 m9 data fruits-360 --output s3://m9-test-bucket/inputs/ --archive fruits.zip"
    ]
    assert "--archive" not in _commands(_run(tmp_path, "upload", "--fruits360", M9="m9"))[0]


def test_dry_run_run_submits_the_terraform_step_with_the_run_id(tmp_path: Path) -> None:
    proc = _run(tmp_path, "run", "exp-1")
    assert proc.returncode == 0, proc.stderr
    add, wait = _commands(proc)
    assert add.startswith("aws emr add-steps --region eu-west-1 --cluster-id j-TEST --steps '")
    steps = json.loads(add.split("--steps '")[1].split("' --query")[0])
    assert steps == [
        {
            "Type": "CUSTOM_JAR",
            "Name": "m9-run exp-1",
            "ActionOnFailure": "CONTINUE",
            "Jar": "command-runner.jar",
            "Args": [a.replace("RUN_ID", "exp-1") for a in STEP_ARGS],
        }
    ]
    assert wait == "aws emr wait step-complete --region eu-west-1 --cluster-id j-TEST --step-id '<step-id>'"


def test_dry_run_fetch_copies_reduce_and_manifests(tmp_path: Path) -> None:
    proc = _run(tmp_path, "fetch", "exp-1")
    assert proc.returncode == 0, proc.stderr
    assert _commands(proc) == [
        "aws s3 sync s3://m9-test-bucket/runs/exp-1/reduce/ m9-aws-out/exp-1/reduce/ --region eu-west-1 "
        "--only-show-errors",
        "aws s3 sync s3://m9-test-bucket/runs/exp-1/ m9-aws-out/exp-1/ --region eu-west-1 --only-show-errors "
        "--exclude '*' --include '*/_m9.json'",
    ]


def test_dry_run_all_runs_every_step_in_order(tmp_path: Path) -> None:
    proc = _run(tmp_path, "all", RUN_ID="exp-2")
    assert proc.returncode == 0, proc.stderr
    kinds = [
        " ".join(c.split()[1:3])
        if c.startswith(("aws", "terraform"))
        else c.split()[2:4]
        if c.startswith("env ")
        else c.split()[1:4]
        for c in _commands(proc)
    ]
    assert kinds == [
        ["-m", "pip", "wheel"],
        ["weights", "fetch"],
        ["bash", f"{REPO}/bootstrap/build_wheelhouse.sh"],
        f"-chdir={REPO}/infra init",
        f"-chdir={REPO}/infra apply",
        "s3 sync",
        "emr add-steps",
        "emr wait",
        "s3 sync",
        "s3 sync",
        "emr terminate-clusters",
        f"-chdir={REPO}/infra apply",
        f"-chdir={REPO}/infra destroy",
    ]
    # Without AUTO_APPROVE, terraform asks; -input=false would make it fail instead.
    assert "-input=false" not in _commands(proc)[4] and "-auto-approve" not in _commands(proc)[-1]
    # After a successful fetch the bucket goes too, via force_destroy set on it first.
    force_apply, destroy = _commands(proc)[-2:]
    assert "-target=aws_s3_bucket.data" in force_apply and "force_destroy_bucket=true" in force_apply
    assert destroy.endswith("-var force_destroy_bucket=true")


def test_all_tears_down_after_a_failure_but_keeps_the_bucket(tmp_path: Path) -> None:
    # A step list without the RUN_ID placeholder makes `run` fail after up and upload.
    proc = _run(tmp_path, "all", M9_TF_OUTPUT_run_step_args='["m9", "run"]')
    assert proc.returncode == 1
    commands = _commands(proc)
    assert not any("add-steps" in c for c in commands)
    assert commands[-2] == "aws emr terminate-clusters --region eu-west-1 --cluster-ids j-TEST"
    assert "destroy" in commands[-1] and "force_destroy" not in commands[-1]
    assert "tearing the stack down" in proc.stderr


def test_all_with_keep_leaves_the_stack_up_after_a_failure(tmp_path: Path) -> None:
    proc = _run(tmp_path, "all", KEEP="1", M9_TF_OUTPUT_run_step_args='["m9", "run"]')
    assert proc.returncode == 1
    assert not any("destroy" in c or "terminate" in c for c in _commands(proc))


def test_all_checks_the_folder_before_creating_anything(tmp_path: Path) -> None:
    proc = _run(tmp_path, "all", str(tmp_path / "missing"))
    assert proc.returncode == 1
    assert "no such folder" in proc.stderr
    assert not _commands(proc)


# --- real mode against stub executables ------------------------------------------


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_run_keeps_waiting_while_the_step_runs_and_explains_a_failure(tmp_path: Path) -> None:
    """`aws emr wait` gives up after 30 minutes; the script must wait again while the step is RUNNING."""
    calls = tmp_path / "calls.log"
    states = tmp_path / "states"
    states.write_text("RUNNING\nFAILED\n")
    _stub(
        tmp_path / "aws",
        f"""\
echo "$*" >>{calls}
case "$1 $2" in
  "emr add-steps") echo s-STEP1 ;;
  "emr wait") exit 255 ;;
  "emr describe-step")
    if [[ $* == *State* ]]; then head -n1 {states}; sed -i 1d {states}; else echo "OOM in executor"; fi ;;
esac
""",
    )
    proc = _run(tmp_path, "run", "exp-3", dry_run=False, AWS=str(tmp_path / "aws"))
    assert proc.returncode == 1
    lines = calls.read_text().splitlines()
    assert [line.split()[1] for line in lines] == [
        "add-steps",
        "wait",
        "describe-step",
        "wait",
        "describe-step",
        "describe-step",
    ]
    assert "--step-id s-STEP1" in lines[1]
    assert "step s-STEP1 is RUNNING; still waiting" in proc.stderr
    assert "OOM in executor" in proc.stderr
    assert "ended FAILED; its logs: s3://m9-test-bucket/logs/emr/j-TEST/steps/s-STEP1/" in proc.stderr


def test_outputs_come_from_terraform_when_not_overridden(tmp_path: Path) -> None:
    calls = tmp_path / "calls.log"
    _stub(
        tmp_path / "terraform",
        f"""\
echo "$*" >>{calls}
case "$*" in
  *"output -raw bucket_name") printf real-bucket ;;
  *"output -raw region") printf eu-north-1 ;;
  *) exit 1 ;;
esac
""",
    )
    _stub(tmp_path / "aws", f'echo "aws $*" >>{calls}\n')
    env = {k: "" for k in ("M9_TF_OUTPUT_bucket_name", "M9_TF_OUTPUT_region")}
    proc = _run(
        tmp_path, "upload", dry_run=False, TERRAFORM=str(tmp_path / "terraform"), AWS=str(tmp_path / "aws"), **env
    )
    assert proc.returncode == 0, proc.stderr
    assert calls.read_text().splitlines() == [
        f"-chdir={REPO}/infra output -raw bucket_name",
        f"-chdir={REPO}/infra output -raw region",
        f"aws s3 sync {SAMPLE} s3://real-bucket/inputs/ --region eu-north-1 --only-show-errors",
    ]


@pytest.mark.parametrize(
    ("command", "port"), [("notebook", 8888), ("dashboard", 8265), ("spark-history", 18080), ("yarn", 8088)]
)
def test_dry_run_port_forwarding_opens_no_port(tmp_path: Path, command: str, port: int) -> None:
    """Session Manager port forwarding: the only way in, one command each. Jupyter and Ray's dashboard
    listen on the master's loopback; YARN and the History Server on its private DNS name."""
    proc = _run(tmp_path, command)
    assert proc.returncode == 0, proc.stderr
    if command in ("yarn", "spark-history"):
        assert _commands(proc)[-1] == (
            "aws ssm start-session --region eu-west-1 --target '<master-instance-id>' "
            "--document-name AWS-StartPortForwardingSessionToRemoteHost "
            f'--parameters \'{{"host":["<master-private-dns>"],"portNumber":["{port}"],"localPortNumber":["{port}"]}}\''
        )
    else:
        assert _commands(proc) == [
            "aws ssm start-session --region eu-west-1 --target '<master-instance-id>' "
            "--document-name AWS-StartPortForwardingSession "
            f'--parameters \'{{"portNumber":["{port}"],"localPortNumber":["{port}"]}}\''
        ]
    assert f"http://127.0.0.1:{port}" in proc.stderr
    other = _run(tmp_path, command, LOCAL_PORT="9999")
    assert '"localPortNumber":["9999"]' in _commands(other)[0]


def test_dry_run_shell_uses_the_logged_session_document(tmp_path: Path) -> None:
    proc = _run(tmp_path, "shell", M9_TF_OUTPUT_session_document="m9-shell")
    assert proc.returncode == 0, proc.stderr
    assert _commands(proc) == [
        "aws ssm start-session --region eu-west-1 --target '<master-instance-id>' --document-name m9-shell"
    ]


def test_the_ray_token_is_never_printed(tmp_path: Path) -> None:
    """notebook/dashboard say how to read the token; they never fetch or print it (it runs code as hadoop)."""
    text = (REPO / "infra" / "aws.sh").read_text()
    body = text[text.index("print_token_hint() {") : text.index("cmd_notebook() {")]
    assert "get-parameter" in body and '"$AWS" ssm get-parameter' not in body and "$token" not in body
