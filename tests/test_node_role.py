"""The nodes' IAM policy as Terraform plans it, enforced by moto's IAM on loopback, against what m9 and the
bootstrap do in the bucket: `m9 run` on s3://, the prefix HEADs EMRFS sends, and the bootstrap's aws s3 calls.

moto checks each request's action and resource against the caller's policies once INITIAL_NO_AUTH_ACTION_COUNT
unauthenticated requests (the setup here: bucket, user, policy, key, uploads) have been served.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from m9.cli import main
from tests.conftest import SAMPLE, point_aws_at
from tests.test_infra import PLAN_BUCKET, free_port, needs_terraform, plan, tf_workdir, wait_for_server  # noqa: F401 (fixtures)

REGION = "us-east-1"
USER = "m9-node"

#: moto 5.2.5 matches a policy's Resource as a regular expression with `*` widened to `.*`, so the `$` of
#: EMRFS's `<prefix>_$folder$` marker is an end-of-line anchor there and the literal grant never matches (IAM
#: itself matches `$` literally). The grant is checked in the rendered policy; moto's answer is expected 403.
MOTO_DOLLAR = "moto reads `$` in a policy Resource as a regex anchor"

#: Classes of the bundled sample the run here uses (each has Training and Test images): enough for
#: every stage, few enough that the run stays short on a loaded machine.
#: Ray's token as the test stores it, and a parameter of another application in the same account.
TOKEN = "0123456789abcdef" * 4
OTHER_PARAMETER = "/another-app/db-password"

#: A prefix the nodes' policy lets them list but not read.
UNREADABLE = "logs/strays/apple/"

CLASSES = ("almond", "apple_fuji", "apricot", "avocado", "banana", "cherry")


#: The nodes' statement that lets the bootstrap read Ray's token from SSM (bootstrap.sh fetch_ray_token).
TOKEN_SID = "ReadRayToken"
#: moto's account id, in the ARNs it matches policies against.
MOTO_ACCOUNT = "123456789012"


def token_parameter(planned: dict) -> str:
    """The name of the SSM parameter holding Ray's token, as planned (known before apply)."""
    (after,) = [
        rc["change"]["after"] for rc in planned["resource_changes"] if rc["address"] == "aws_ssm_parameter.ray_token"
    ]
    return after["name"]


def token_arn(planned: dict) -> str:
    return f"arn:aws:ssm:{REGION}:{MOTO_ACCOUNT}:parameter{token_parameter(planned)}"


def _references(planned: dict, sid: str) -> list[str]:
    """What a statement of the nodes' policy names as its resources, in the plan's configuration."""
    (policy,) = [
        r
        for r in planned["configuration"]["root_module"]["resources"]
        if r["address"] == "data.aws_iam_policy_document.emr_ec2"
    ]
    (statement,) = [st for st in policy["expressions"]["statement"] if st.get("sid", {}).get("constant_value") == sid]
    return statement["resources"]["references"]


def node_policy(planned: dict) -> dict:
    """The IAM JSON of the nodes' policy (data.aws_iam_policy_document.emr_ec2) from the plan's statement
    blocks. Statements whose resources are only known after apply (the KMS key, the SSM parameter, the
    account's clusters and instances) are left out; none of them grants an S3 action."""
    (doc,) = [
        rc["change"] for rc in planned["resource_changes"] if rc["address"] == "data.aws_iam_policy_document.emr_ec2"
    ]
    statements = []
    for i, block in enumerate(doc["after"]["statement"]):
        unknown = (doc["after_unknown"].get("statement") or [{}] * (i + 1))[i]
        resources_unknown = unknown.get("resources")
        if block["sid"] == TOKEN_SID:
            # Known only after apply: the parameter's ARN, rendered here as AWS forms it (moto's account).
            assert block["actions"] == ["ssm:GetParameter"], block
            assert _references(planned, TOKEN_SID) == ["aws_ssm_parameter.ray_token.arn", "aws_ssm_parameter.ray_token"]
            statements.append(
                {"Sid": TOKEN_SID, "Effect": "Allow", "Action": block["actions"], "Resource": [token_arn(planned)]}
            )
            continue
        if resources_unknown is True or any(resources_unknown or []) or block["resources"] is None:
            assert not any(a.startswith("s3:") for a in block["actions"]), block["sid"]
            continue
        assert not block["not_actions"] and not block["not_resources"] and not block["principals"], block["sid"]
        statement = {
            "Sid": block["sid"],
            "Effect": block["effect"] or "Allow",
            "Action": block["actions"],
            "Resource": block["resources"],
        }
        for condition in block["condition"] or []:
            statement.setdefault("Condition", {}).setdefault(condition["test"], {})[condition["variable"]] = condition[
                "values"
            ]
        statements.append(statement)
    return {"Version": "2012-10-17", "Statement": statements}


#: moto's server with two of its S3 checks made to match AWS's, where they differ on what s3a sends:
#:  - a signature is checked over every header the client signed. botocore (which moto signs with to compare)
#:    never signs User-Agent; the AWS SDK for Java 1 in hadoop-aws does, so moto would answer every s3a
#:    request 403 SignatureDoesNotMatch before looking at the policy at all;
#:  - DeleteObjects (s3a's commit and cleanup) is allowed key by key, by s3:DeleteObject on each key; moto
#:    asks for s3:DeleteObject on the bucket's own ARN, which a policy scoped to prefixes never grants;
#:  - an SSM request naming a parameter is authorised against that parameter's ARN, as IAM does; moto asks
#:    for Resource "*", which a policy scoped to one parameter never grants.
MOTO_SERVER = """
import sys

import xmltodict
from botocore.auth import S3SigV4Auth
from moto.iam import access_control
from moto.s3.responses import S3Response
from moto.ssm.responses import SimpleSystemManagerResponse
from moto.server import main


class SignedAsSent(S3SigV4Auth):
    def headers_to_sign(self, request):
        headers = super().headers_to_sign(request)
        for name, value in request.headers.items():  # moto keeps only the headers named in SignedHeaders
            if name.lower() not in headers:  # (setting a present name would add a second value)
                headers[name.lower()] = value
        return headers


def delete_objects_per_key(self, bucket_name=None, key_name=None):
    # DeleteObjects needs s3:DeleteObject on each key it names, as in IAM; moto asks for it on the bucket.
    if key_name is None and self.data.get("Action") == "DeleteObject" and self.is_delete_keys():
        objects = xmltodict.parse(self.body)["Delete"].get("Object", [])
        for obj in objects if isinstance(objects, list) else [objects]:
            authorize(self, bucket_name=bucket_name, key_name=obj["Key"])
        return None
    return authorize(self, bucket_name=bucket_name, key_name=key_name)


def parameter_arn(self):
    name = self._get_param("Name")
    if not name:
        return "*"
    return f"arn:aws:ssm:{self.region}:{self.current_account}:parameter/{name.lstrip('/')}"


SimpleSystemManagerResponse._determine_resource = parameter_arn
access_control.S3IAMRequest._create_auth = lambda self, credentials: SignedAsSent(
    credentials, self._service, self._region
)
authorize = S3Response._authenticate_and_authorize_s3_action
S3Response._authenticate_and_authorize_s3_action = delete_objects_per_key
sys.exit(main(sys.argv[1:]))
"""


def _moto_enforcing(tmp_path: Path, unauthenticated: int) -> Iterator[str]:
    """moto's server (all services) on loopback enforcing IAM after `unauthenticated` requests."""
    port = free_port()
    log = (tmp_path / "moto.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-c", MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(unauthenticated)},
    )
    try:
        wait_for_server(proc, port, tmp_path / "moto.log")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _sample_subset() -> list[Path]:
    return sorted(p for c in CLASSES for split in ("Training", "Test") for p in (SAMPLE / split / c).glob("*.jpg"))


@pytest.fixture(scope="module")
def node_user(plan: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:  # noqa: F811 (the imported plan fixture)
    """moto enforcing IAM, the plan's bucket holding the bootstrap files and a sample subset under inputs/, and
    an IAM user with exactly the nodes' policy; yields its endpoint, keys and the policy."""
    import boto3

    policy = node_policy(plan)
    images = _sample_subset()
    bootstrap = {
        "bootstrap/bootstrap.sh": b"#!/bin/bash\n",
        "bootstrap/constraints.txt": b"ray==0.0.0\n",
        "bootstrap/m9_preflight.py": b"",
        "bootstrap/m9-0.0.0-py3-none-any.whl": b"wheel",
        "bootstrap/wheelhouse/requirements.txt": b"m9==0.0.0\n",
        "bootstrap/wheelhouse/weights/mobilenet_v2_imagenet_no_top.weights.h5": b"weights",
    }
    created: dict = {}
    admin = {"endpoint_url": None, "region_name": REGION, "aws_access_key_id": "x", "aws_secret_access_key": "x"}
    # Every setup request, in order: moto serves exactly these without checking, then enforces IAM.
    setup: list[Callable[[], object]] = [
        lambda: s3().create_bucket(Bucket=PLAN_BUCKET),
        lambda: iam().create_user(UserName=USER),
        lambda: iam().put_user_policy(UserName=USER, PolicyName="m9-node", PolicyDocument=json.dumps(policy)),
        lambda: created.update(iam().create_access_key(UserName=USER)["AccessKey"]),
        lambda: ssm().put_parameter(Name=token_parameter(plan), Type="SecureString", Value=TOKEN),
        lambda: ssm().put_parameter(Name=OTHER_PARAMETER, Type="SecureString", Value="not for the nodes"),
        *[
            (
                lambda p=p: s3().put_object(
                    Bucket=PLAN_BUCKET, Key=f"inputs/{p.relative_to(SAMPLE)}", Body=p.read_bytes()
                )
            )
            for p in images
        ],
        *[(lambda k=k, v=v: s3().put_object(Bucket=PLAN_BUCKET, Key=k, Body=v)) for k, v in bootstrap.items()],
        # Images where the nodes may list but not read (logs/ is append-only for them).
        *[
            (lambda p=p: s3().put_object(Bucket=PLAN_BUCKET, Key=f"{UNREADABLE}{p.name}", Body=p.read_bytes()))
            for p in images[:2]
        ],
    ]

    def s3():
        return boto3.client("s3", **admin)

    def iam():
        return boto3.client("iam", **admin)

    def ssm():
        return boto3.client("ssm", **admin)

    for endpoint in _moto_enforcing(tmp_path_factory.mktemp("moto"), len(setup)):
        admin["endpoint_url"] = endpoint
        for call in setup:
            call()
        yield {
            "endpoint": endpoint,
            "access_key": created["AccessKeyId"],
            "secret_key": created["SecretAccessKey"],
            "policy": policy,
            "images": len(images),
            "bootstrap": sorted(bootstrap),
            "token_parameter": token_parameter(plan),
        }


def _as_user(user: dict, service: str = "s3"):
    import boto3

    return boto3.client(
        service,
        endpoint_url=user["endpoint"],
        region_name=REGION,
        aws_access_key_id=user["access_key"],
        aws_secret_access_key=user["secret_key"],
    )


def _cli_env(user: dict) -> dict[str, str]:
    """The environment the AWS CLI runs in as the nodes' user (no other AWS variable, no metadata service)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID=user["access_key"],
        AWS_SECRET_ACCESS_KEY=user["secret_key"],
        AWS_DEFAULT_REGION=REGION,
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


def _denied(call: Callable[[], object]) -> bool:
    from botocore.exceptions import ClientError

    try:
        call()
    except ClientError as exc:
        return exc.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    return False


@needs_terraform
def test_the_node_policy_is_what_moto_enforces(node_user: dict) -> None:
    """IAM is on: the user may not write inputs/ or delete logs, and may read inputs/."""
    s3 = _as_user(node_user)
    assert _denied(lambda: s3.put_object(Bucket=PLAN_BUCKET, Key="inputs/x.jpg", Body=b""))
    assert _denied(lambda: s3.put_object(Bucket=PLAN_BUCKET, Key="elsewhere/x", Body=b""))
    s3.put_object(Bucket=PLAN_BUCKET, Key="logs/emr/x.log", Body=b"")
    assert _denied(lambda: s3.delete_object(Bucket=PLAN_BUCKET, Key="logs/emr/x.log"))
    assert s3.list_objects_v2(Bucket=PLAN_BUCKET, Prefix="inputs/")["KeyCount"] == node_user["images"]


@needs_terraform
@pytest.mark.parametrize(
    "key",
    [
        "inputs",
        "inputs/",
        "runs",
        "runs/",
        "tmp",
        *(
            pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=MOTO_DOLLAR))
            for k in ("inputs_$folder$", "runs_$folder$", "tmp_$folder$")
        ),
    ],
)
def test_prefix_keys_can_be_checked(node_user: dict, key: str) -> None:
    """EMRFS HEADs a folder's key and its `_$folder$` marker before it lists or creates below it, and pyarrow
    HEADs a prefix's key before listing it: the answer must be 404 (not there), not 403 (not allowed)."""
    from botocore.exceptions import ClientError

    granted = {r for s in node_user["policy"]["Statement"] if "s3:GetObject" in s["Action"] for r in s["Resource"]}
    assert (
        f"arn:aws:s3:::{PLAN_BUCKET}/{key}" in granted or f"arn:aws:s3:::{PLAN_BUCKET}/{key.split('/')[0]}/*" in granted
    )

    with pytest.raises(ClientError) as info:
        _as_user(node_user).head_object(Bucket=PLAN_BUCKET, Key=key)
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


@needs_terraform
def test_bootstrap_s3_calls_work_with_the_node_policy(node_user: dict, tmp_path: Path) -> None:
    """The aws s3 commands bootstrap/bootstrap.sh runs (artifacts with the wheelhouse and weights, log
    shipping), with the CLI, as the nodes' user."""
    env = _cli_env(node_user)
    aws = ["aws", "--endpoint-url", node_user["endpoint"]]
    bootstrap_text = (Path(__file__).resolve().parents[1] / "bootstrap" / "bootstrap.sh").read_text()
    includes = ["--exclude", "*", "--include", "constraints.txt", "--include", "m9-*.whl", "--include", "m9-*.tar.gz",
                "--include", "m9_preflight.py", "--include", "*.ipynb", "--include", "wheelhouse/*"]  # fmt: skip
    # The same selection the bootstrap makes (so a change there shows here).
    assert "--exclude '*' --include 'constraints.txt' --include 'm9-*.whl'" in bootstrap_text
    artifacts = tmp_path / "artifacts"
    logs = tmp_path / "ray-logs"
    (logs / "session_latest" / "logs").mkdir(parents=True)
    (logs / "session_latest" / "logs" / "raylet.out").write_text("raylet\n")
    (tmp_path / "bootstrap.log").write_text("bootstrap\n")
    dest = f"s3://{PLAN_BUCKET}/logs/m9/j-TEST/i-test"
    commands = [
        ["s3", "cp", "--recursive", "--only-show-errors", f"s3://{PLAN_BUCKET}/bootstrap/", str(artifacts), *includes],
        ["s3", "cp", "--only-show-errors", str(tmp_path / "bootstrap.log"), f"{dest}/bootstrap.log"],
        ["s3", "sync", "--only-show-errors", f"{logs}/session_latest/logs/", f"{dest}/ray/"],
    ]
    for command in commands:
        proc = subprocess.run([*aws, *command], env=env, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, (command, proc.stderr)
    fetched = sorted(p.relative_to(artifacts).as_posix() for p in artifacts.rglob("*") if p.is_file())
    assert fetched == sorted(k.removeprefix("bootstrap/") for k in node_user["bootstrap"] if not k.endswith(".sh"))
    shipped = _as_user(node_user).list_objects_v2(Bucket=PLAN_BUCKET, Prefix="logs/m9/")["Contents"]
    assert sorted(o["Key"] for o in shipped) == [f"{dest[len(f's3://{PLAN_BUCKET}/') :]}/{n}"
                                                 for n in ("bootstrap.log", "ray/raylet.out")]  # fmt: skip


@needs_terraform
def test_the_bootstrap_reads_rays_token_and_nothing_else(node_user: dict) -> None:
    """bootstrap.sh's `aws ssm get-parameter` for Ray's token, with the CLI, as the nodes' user; another
    parameter in the account is refused. (moto does not check the KMS grant SecureString decryption needs;
    the policy's UseDataKey statement covers it on AWS.)"""
    bootstrap_text = (Path(__file__).resolve().parents[1] / "bootstrap" / "bootstrap.sh").read_text()
    command = ["ssm", "get-parameter", "--with-decryption", "--query", "Parameter.Value", "--output", "text"]
    spelled = 'aws ssm get-parameter --name "$TOKEN_PARAMETER" --with-decryption \\\n      --query Parameter.Value'
    assert f"{spelled} --output text" in bootstrap_text  # the same call as the bootstrap's (a change shows here)
    env = _cli_env(node_user)

    def get(name: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["aws", "--endpoint-url", node_user["endpoint"], *command, "--name", name],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    token = get(node_user["token_parameter"])
    assert token.returncode == 0 and token.stdout.strip() == TOKEN, token.stderr
    other = get(OTHER_PARAMETER)
    assert other.returncode != 0 and "AccessDenied" in other.stderr, (other.stdout, other.stderr)


@needs_terraform
@pytest.mark.slow
def test_m9_run_on_s3_with_the_node_policy(node_user: dict, spark, ray_local, weights_path) -> None:
    """`m9 run --input s3://…/inputs/ --workdir s3://…/runs/<id>/`, as the EMR step spells it, as the nodes' user."""
    with pytest.MonkeyPatch.context() as mp:
        point_aws_at(mp, node_user["endpoint"], node_user["access_key"], node_user["secret_key"])
        result = CliRunner().invoke(
            main,
            [
                "run",
                "--input",
                f"s3://{PLAN_BUCKET}/inputs/",
                "--workdir",
                f"s3://{PLAN_BUCKET}/runs/r1/",
                "--actors",
                "1",
                "--k",
                "3",
                "--batch-size",
                "8",
            ],  # fmt: skip
        )
    assert result.exit_code == 0, result.output + str(result.exception)[:4000]  # a Java error is long
    assert "m9 run finished" in result.output
    s3 = _as_user(node_user)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=PLAN_BUCKET, Prefix="runs/r1/")["Contents"]}
    assert {"runs/r1/images/_m9.json", "runs/r1/embed/_m9.json", "runs/r1/reduce/_m9.json"} <= keys


@needs_terraform
def test_exists_lists_when_the_prefix_key_may_not_be_read(node_user: dict) -> None:
    """`bootstrap` is a prefix the nodes may list but whose own key they may not read: HeadObject is refused
    (403) and storage.exists answers from the listing instead of failing."""
    from botocore.exceptions import ClientError

    from m9.io import storage

    with pytest.raises(ClientError) as info:
        _as_user(node_user).head_object(Bucket=PLAN_BUCKET, Key="bootstrap")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    settings = storage.S3Settings(
        endpoint=node_user["endpoint"],
        region=REGION,
        access_key=node_user["access_key"],
        secret_key=node_user["secret_key"],
    )
    with storage.using(settings):
        assert storage.exists(f"s3://{PLAN_BUCKET}/bootstrap")
        assert not storage.exists(f"s3://{PLAN_BUCKET}/nothing-here")


@needs_terraform
@pytest.mark.slow
def test_images_that_may_be_listed_but_not_read_are_one_error_line(node_user: dict, spark) -> None:
    """Spark's s3a reader is refused (403) on images the credentials may list but not read: the user sees one
    `Error:` line naming the missing right, not Spark's Java stack."""
    with pytest.MonkeyPatch.context() as mp:
        point_aws_at(mp, node_user["endpoint"], node_user["access_key"], node_user["secret_key"])
        result = CliRunner().invoke(
            main,
            ["ingest", "--input", f"s3://{PLAN_BUCKET}/{UNREADABLE}", "--output", f"s3://{PLAN_BUCKET}/runs/r2/images"],
        )
    assert isinstance(result.exception, SystemExit), repr(result.exception)[:6000]
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output[:4000]
    assert "s3:GetObject" in lines[0] and UNREADABLE.split("/")[0] in lines[0], lines[0]
