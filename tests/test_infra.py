"""Static checks of the AWS deployment: terraform fmt/validate/plan, checkov, shellcheck, compose."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
BOOTSTRAP = REPO / "bootstrap"
TERRAFORM_VERSION = "1.11.4"
PLAN_BUCKET = "m9-plan-test"
PLAN_BUCKET_ARN = f"arn:aws:s3:::{PLAN_BUCKET}"

TERRAFORM = shutil.which("terraform")
_no_terraform = pytest.mark.skipif(TERRAFORM is None, reason="terraform is not installed")


def needs_terraform(test):
    """Runs terraform: skipped without it, and in the slow tier."""
    return pytest.mark.slow(_no_terraform(test))


# Dummy credentials and no account lookups: the plan runs offline and only in
# the test's copy of infra/, so real users never get these settings.
PROVIDER_OVERRIDE = """\
provider "aws" {
  access_key                  = "test"
  secret_key                  = "test"
  skip_credentials_validation = true
  skip_requesting_account_id  = true
  skip_metadata_api_check     = true
  skip_region_validation      = true
}
"""


def _terraform_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TF_"))}
    env.update(
        TF_CLI_CONFIG_FILE=str(INFRA / "terraformrc.offline"),
        TF_IN_AUTOMATION="1",
        CHECKPOINT_DISABLE="1",
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


def _tf(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [TERRAFORM, *args, "-no-color"],
        cwd=workdir,
        env=_terraform_env(),
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"terraform {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _fake_wheelhouse(folder: Path) -> None:
    """What bootstrap/build_wheelhouse.sh leaves (its own test builds a real one): the plan only uploads it."""
    (folder / "weights").mkdir(parents=True)
    (folder / "m9-0.0.0-py3-none-any.whl").write_bytes(b"not a real wheel")
    (folder / "requirements.txt").write_text("m9==0.0.0 --hash=sha256:" + "0" * 64 + "\n")
    (folder / "weights" / "mobilenet_v2_imagenet_no_top.weights.h5").write_bytes(b"not real weights")


@pytest.fixture(scope="module")
def tf_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of infra/ (+ the files it uploads) with the provider override, initialised offline."""
    root = tmp_path_factory.mktemp("tf")
    shutil.copytree(
        INFRA,
        root / "infra",
        ignore=shutil.ignore_patterns(".terraform", "*.tfplan", "terraform.tfstate*", "wheelhouse"),
    )
    shutil.copytree(BOOTSTRAP, root / "bootstrap")
    constraints = REPO / "constraints.txt"
    if constraints.exists():
        shutil.copy(constraints, root / "constraints.txt")
    else:  # the pins are not the subject here; the plan only needs the file to upload
        (root / "constraints.txt").write_text("ray==0.0.0\n")
    (root / "dist").mkdir()
    (root / "dist" / "m9-0.0.0-py3-none-any.whl").write_bytes(b"not a real wheel")
    workdir = root / "infra"
    _fake_wheelhouse(workdir / "wheelhouse")
    (workdir / "test_provider_override.tf").write_text(PROVIDER_OVERRIDE)
    _tf(workdir, "init", "-input=false", "-backend=false")
    return workdir


def _plan_args(*extra: str) -> list[str]:
    return [
        "plan",
        "-input=false",
        "-refresh=false",
        "-var=m9_dist=../dist/m9-0.0.0-py3-none-any.whl",
        f"-var=bucket_name={PLAN_BUCKET}",
        *extra,
    ]


@pytest.fixture(scope="module")
def plan(tf_workdir: Path) -> dict:
    """The JSON form of the default plan (terraform plan -out, then terraform show -json)."""
    _tf(tf_workdir, *_plan_args("-out=default.tfplan"))
    return json.loads(_tf(tf_workdir, "show", "-json", "default.tfplan").stdout)


def _changes(plan: dict, type_: str) -> list[dict]:
    """Planned 'after' values of every resource (or data source) of one type."""
    return [rc["change"]["after"] for rc in plan["resource_changes"] if rc["type"] == type_]


def _one(plan: dict, type_: str, name: str) -> dict:
    hits = [rc["change"]["after"] for rc in plan["resource_changes"] if rc["type"] == type_ and rc["name"] == name]
    assert len(hits) == 1, f"expected one {type_}.{name}, found {len(hits)}"
    return hits[0]


# --- terraform ------------------------------------------------------------------


@needs_terraform
def test_terraform_fmt() -> None:
    proc = subprocess.run(
        [TERRAFORM, "fmt", "-check", "-recursive", "-diff", str(INFRA)],
        capture_output=True,
        check=False,
        text=True,
        env=_terraform_env(),
    )
    assert proc.returncode == 0, f"run `terraform fmt -recursive infra`:\n{proc.stdout}{proc.stderr}"


@needs_terraform
def test_offline_mirror_pins_provider() -> None:
    versions = (INFRA / "versions.tf").read_text()
    pinned = re.search(r'version\s*=\s*"~>\s*([0-9.]+)"', versions)
    assert pinned, "the aws provider must be pinned with ~>"
    mirrored = sorted(p.name for p in Path("/opt/tf-plugins/registry.terraform.io/hashicorp/aws").glob("*"))
    if mirrored:
        assert any(v.startswith(pinned.group(1)) for v in mirrored), (
            pinned.group(1),
            mirrored,
        )


def test_provider_lock_file_is_committed() -> None:
    """infra/.terraform.lock.hcl pins the provider build (made offline: terraform providers lock -fs-mirror)."""
    lock = (INFRA / ".terraform.lock.hcl").read_text()
    pinned = re.search(r'version\s*=\s*"~>\s*([0-9.]+)"', (INFRA / "versions.tf").read_text()).group(1)
    locked = re.search(r'provider "registry.terraform.io/hashicorp/aws" \{\n\s+version\s+=\s+"([0-9.]+)"', lock)
    assert locked and locked.group(1).startswith(pinned)
    assert re.search(r'"h1:[A-Za-z0-9+/=]+"', lock)


@needs_terraform
def test_terraform_validate(tf_workdir: Path) -> None:
    _tf(tf_workdir, "validate")


def test_every_variable_and_output_is_documented() -> None:
    text = "\n".join(p.read_text() for p in INFRA.glob("*.tf"))
    blocks = re.findall(r'^(variable|output) "(\w+)" \{\n(.*?)^\}', text, flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) > 20
    for kind, name, body in blocks:
        assert re.search(r"^  description\s*=", body, re.MULTILINE), f"{kind} {name} has no description"
        # Terraform outputs have no type argument; variables must declare one.
        if kind == "variable":
            assert re.search(r"^  type\s*=", body, re.MULTILINE), f"variable {name} has no type"


@needs_terraform
def test_plan_uses_eu_west_1(plan: dict) -> None:
    assert plan["variables"]["region"]["value"] == "eu-west-1"
    assert _one(plan, "aws_subnet", "private")["availability_zone"] == "eu-west-1a"
    assert _one(plan, "aws_vpc_endpoint", "s3")["service_name"] == "com.amazonaws.eu-west-1.s3"


@needs_terraform
@pytest.mark.parametrize("region", ["us-east-1", "eu-west-2", "ap-southeast-1"])
def test_non_eu_region_is_rejected(tf_workdir: Path, region: str) -> None:
    proc = _tf(tf_workdir, *_plan_args(f"-var=region={region}"), check=False)
    assert proc.returncode != 0
    assert "EU member state" in proc.stderr


@needs_terraform
def test_ssh_from_everywhere_is_rejected(tf_workdir: Path) -> None:
    proc = _tf(tf_workdir, *_plan_args('-var=allowed_ssh_cidrs=["0.0.0.0/0"]'), check=False)
    assert proc.returncode != 0
    assert "0.0.0.0/0 is never allowed" in " ".join(proc.stderr.split())


@needs_terraform
def test_bucket_is_encrypted_versioned_and_owner_enforced(plan: dict) -> None:
    sse = _one(plan, "aws_s3_bucket_server_side_encryption_configuration", "data")
    default = sse["rule"][0]["apply_server_side_encryption_by_default"][0]
    assert default["sse_algorithm"] in {"aws:kms", "AES256"}
    assert _one(plan, "aws_s3_bucket_versioning", "data")["versioning_configuration"][0]["status"] == "Enabled"
    ownership = _one(plan, "aws_s3_bucket_ownership_controls", "data")
    assert ownership["rule"][0]["object_ownership"] == "BucketOwnerEnforced"
    assert _one(plan, "aws_s3_bucket", "data")["bucket"] == PLAN_BUCKET


@needs_terraform
def test_bucket_blocks_public_access(plan: dict) -> None:
    pab = _one(plan, "aws_s3_bucket_public_access_block", "data")
    for key in (
        "block_public_acls",
        "block_public_policy",
        "ignore_public_acls",
        "restrict_public_buckets",
    ):
        assert pab[key] is True, key


@needs_terraform
def test_bucket_policy_denies_plain_http(plan: dict) -> None:
    statements = _one(plan, "aws_iam_policy_document", "bucket")["statement"]
    deny = [s for s in statements if s["effect"] == "Deny"]
    assert len(deny) == 1
    (deny,) = deny
    assert deny["actions"] == ["s3:*"]
    assert set(deny["resources"]) == {PLAN_BUCKET_ARN, f"{PLAN_BUCKET_ARN}/*"}
    assert deny["principals"] == [{"type": "*", "identifiers": ["*"]}]
    assert deny["condition"] == [{"test": "Bool", "variable": "aws:SecureTransport", "values": ["false"]}]


@needs_terraform
def test_bucket_lifecycle_expires_logs_and_tmp(plan: dict) -> None:
    rules = _one(plan, "aws_s3_bucket_lifecycle_configuration", "data")["rule"]
    expiring = {r["filter"][0]["prefix"]: r["expiration"][0]["days"] for r in rules if r["expiration"]}
    assert set(expiring) == {"logs/", "tmp/"}
    assert all(days >= 1 for days in expiring.values())


def _ingress_cidrs(plan: dict) -> list[str]:
    cidrs = []
    for sg in _changes(plan, "aws_security_group"):
        for rule in sg.get("ingress") or []:
            cidrs += rule.get("cidr_blocks") or []
            cidrs += rule.get("ipv6_cidr_blocks") or []
    for rule in _changes(plan, "aws_vpc_security_group_ingress_rule"):
        cidrs += [rule.get("cidr_ipv4"), rule.get("cidr_ipv6")]
    for rule in _changes(plan, "aws_security_group_rule"):
        if rule["type"] == "ingress":
            cidrs += (rule.get("cidr_blocks") or []) + (rule.get("ipv6_cidr_blocks") or [])
    return [c for c in cidrs if c]


@needs_terraform
def test_no_ingress_from_the_internet(plan: dict) -> None:
    cidrs = _ingress_cidrs(plan)
    assert cidrs, "expected at least the VPC-internal endpoint rule"
    assert "0.0.0.0/0" not in cidrs and "::/0" not in cidrs
    # No SSH at all unless allowed_ssh_cidrs is set.
    assert not [r for r in _changes(plan, "aws_vpc_security_group_ingress_rule") if r["from_port"] == 22]


@needs_terraform
def test_ssh_only_from_allowed_cidrs(tf_workdir: Path) -> None:
    _tf(
        tf_workdir,
        *_plan_args('-var=allowed_ssh_cidrs=["10.20.0.0/16"]', "-out=ssh.tfplan"),
    )
    ssh_plan = json.loads(_tf(tf_workdir, "show", "-json", "ssh.tfplan").stdout)
    ssh = [r for r in _changes(ssh_plan, "aws_vpc_security_group_ingress_rule") if r["from_port"] == 22]
    assert [r["cidr_ipv4"] for r in ssh] == ["10.20.0.0/16"]
    assert "0.0.0.0/0" not in _ingress_cidrs(ssh_plan)


@needs_terraform
@pytest.mark.parametrize("cidr", ["203.0.113.0/24", "8.0.0.0/8", "172.32.0.0/16"])
def test_ssh_from_a_public_network_is_rejected(tf_workdir: Path, cidr: str) -> None:
    """The subnet has no route from the internet: a public CIDR could never connect, so it is refused."""
    proc = _tf(tf_workdir, *_plan_args(f'-var=allowed_ssh_cidrs=["{cidr}"]'), check=False)
    assert proc.returncode != 0
    assert "must be private IPv4 CIDR blocks" in " ".join(proc.stderr.split())


@needs_terraform
def test_emr_cluster(plan: dict) -> None:
    cluster = _one(plan, "aws_emr_cluster", "main")
    assert cluster["release_label"].startswith("emr-7")
    assert set(cluster["applications"]) == {"Hadoop", "Spark"}
    assert cluster["auto_termination_policy"][0]["idle_timeout"] > 0
    assert cluster["log_uri"] == f"s3://{PLAN_BUCKET}/logs/emr/"
    (action,) = cluster["bootstrap_action"]
    assert action["path"] == f"s3://{PLAN_BUCKET}/bootstrap/bootstrap.sh"
    args = action["args"]
    assert args[args.index("--artifacts") + 1] == f"s3://{PLAN_BUCKET}/bootstrap/"
    # Spark must run the interpreter of the venv the bootstrap installs m9 into.
    venv = args[args.index("--venv") + 1]
    configurations = {c["Classification"]: c for c in json.loads(cluster["configurations_json"])}
    spark_env = configurations["spark-env"]["Configurations"][0]["Properties"]
    assert spark_env["PYSPARK_PYTHON"] == f"{venv}/bin/python"
    assert configurations["spark-defaults"]["Properties"]["spark.pyspark.python"] == f"{venv}/bin/python"
    # The weights the bootstrap fetches are where Spark and the step look.
    cache_dir = args[args.index("--cache-dir") + 1]
    assert spark_env["M9_CACHE_DIR"] == cache_dir
    spark_defaults = configurations["spark-defaults"]["Properties"]
    assert spark_defaults["spark.executorEnv.M9_CACHE_DIR"] == cache_dir
    # No task group unless asked for.
    assert _changes(plan, "aws_emr_instance_group") == []


@needs_terraform
def test_run_step_uses_yarn_ray_and_the_bucket(plan: dict) -> None:
    args = plan["planned_values"]["outputs"]["run_step_args"]["value"]
    m9 = args.index("/mnt/m9/venv/bin/m9")
    assert args[:m9] == [
        "/usr/bin/env",
        "M9_SPARK_MASTER=yarn",
        "M9_CACHE_DIR=/mnt/m9/cache",
        "AWS_REGION=eu-west-1",
        "RAY_AUTH_MODE=token",
        "RAY_AUTH_TOKEN_PATH=/mnt/m9/ray-auth-token",
        # Every running EMR instance must have joined Ray before m9 starts.
        "/mnt/m9/venv/bin/m9-preflight",
        "--emr",
        "--timeout",
        "600",
        "--",
    ]
    opts = dict(zip(args[m9 + 2 :: 2], args[m9 + 3 :: 2], strict=True))
    assert args[m9 + 1] == "run"
    assert opts["--input"] == f"s3://{PLAN_BUCKET}/inputs/"
    assert opts["--workdir"].startswith(f"s3://{PLAN_BUCKET}/runs/")
    assert opts["--ray-address"] == "auto"


@needs_terraform
def test_bootstrap_files_are_uploaded_next_to_each_other(plan: dict) -> None:
    keys = {o["key"] for o in _changes(plan, "aws_s3_object")}
    assert keys == {
        "bootstrap/bootstrap.sh",
        "bootstrap/constraints.txt",
        "bootstrap/m9_preflight.py",
        "bootstrap/m9-0.0.0-py3-none-any.whl",
        # The nodes install only from here (no route to PyPI).
        "bootstrap/wheelhouse/m9-0.0.0-py3-none-any.whl",
        "bootstrap/wheelhouse/requirements.txt",
        "bootstrap/wheelhouse/weights/mobilenet_v2_imagenet_no_top.weights.h5",
    }


@needs_terraform
def test_emr_security_configuration_encrypts_at_rest(plan: dict) -> None:
    sc = _one(plan, "aws_emr_security_configuration", "main")
    # The configuration embeds the KMS key ARN, which is only known after apply.
    assert sc.get("configuration") is None
    sc_config = next(
        r
        for r in plan["configuration"]["root_module"]["resources"]
        if r["address"] == "aws_emr_security_configuration.main"
    )
    assert "aws_kms_key.data.arn" in sc_config["expressions"]["configuration"]["references"]
    text = (INFRA / "main.tf").read_text()
    for needle in (
        "EnableAtRestEncryption    = true",
        'EncryptionMode = "SSE-KMS"',
        "EnableEbsEncryption       = true",
    ):
        assert needle in text


def _s3_statements(policy: dict) -> list[dict]:
    return [s for s in policy["statement"] if any(a.startswith("s3:") for a in s["actions"])]


@needs_terraform
def test_instance_profile_is_scoped_to_the_bucket(plan: dict) -> None:
    policy = _one(plan, "aws_iam_policy_document", "emr_ec2")
    statements = _s3_statements(policy)
    assert statements
    allowed = (PLAN_BUCKET_ARN, "arn:aws:s3:::eu-west-1.elasticmapreduce/")
    for s in statements:
        assert s["resources"], s["sid"]
        for resource in s["resources"]:
            assert resource != "*" and resource.startswith(allowed), (
                s["sid"],
                resource,
            )
        assert not any(a in ("s3:*", "*") for a in s["actions"]), s["sid"]
    writes = [s for s in statements if "s3:PutObject" in s["actions"]]
    deletes = [s for s in statements if "s3:DeleteObject" in s["actions"]]
    assert {r.removeprefix(PLAN_BUCKET_ARN) for s in writes for r in s["resources"]} == {
        "/runs/*",
        "/tmp/*",
        "/logs/emr/*",
        "/logs/m9/*",
        "/logs/ssm/*",
    }
    # Logs are append-only for the nodes.
    assert {r.removeprefix(PLAN_BUCKET_ARN) for s in deletes for r in s["resources"]} == {"/runs/*", "/tmp/*"}
    # "*" only for SSM channel actions, which have no resource type in IAM.
    for s in policy["statement"]:
        if "*" in (s.get("resources") or []):
            assert all(a.startswith(("ssmmessages:", "ec2messages:")) for a in s["actions"]), s["sid"]


@needs_terraform
def test_no_broad_managed_policies(plan: dict) -> None:
    attached = [a["policy_arn"] for a in _changes(plan, "aws_iam_role_policy_attachment")]
    assert attached == ["arn:aws:iam::aws:policy/service-role/AmazonEMRServicePolicy_v2"]


def _config(plan: dict, address: str) -> dict:
    """The configuration expressions of one resource (which other resources its arguments reference)."""
    (resource,) = [r for r in plan["configuration"]["root_module"]["resources"] if r["address"] == address]
    return resource["expressions"]


def _ref(expressions: dict, key: str) -> str:
    """The resource an argument points at, e.g. 'aws_security_group.emr_core'."""
    return next(r for r in expressions[key]["references"] if r.count(".") == 1)


def _sg_rules(plan: dict, kind: str) -> dict[tuple[str, str], tuple[str, int | None]]:
    """(group, peer group) -> (protocol, port) for every group-to-group rule of one kind (ingress/egress)."""
    rules = {}
    for rc in plan["resource_changes"]:
        after = rc["change"]["after"]
        if rc["type"] != f"aws_vpc_security_group_{kind}_rule" or after.get("cidr_ipv4") or "index" in rc:
            continue
        expressions = _config(plan, rc["address"])
        if "referenced_security_group_id" not in expressions:
            continue
        key = (
            _ref(expressions, "security_group_id").split(".")[1],
            _ref(expressions, "referenced_security_group_id").split(".")[1],
        )
        after = rc["change"]["after"]
        assert key not in rules, f"two {kind} rules for {key}"
        rules[key] = (after["ip_protocol"], after.get("from_port"))
    return rules


@needs_terraform
def test_security_groups_follow_emrs_rules_for_private_subnets(plan: dict) -> None:
    """AWS's minimum for EMR-managed groups in a private subnet (finding 1 of issue 12)."""
    everything = ("-1", None)
    assert _sg_rules(plan, "egress") == {
        ("emr_master", "emr_master"): everything,
        ("emr_master", "emr_core"): everything,
        ("emr_core", "emr_core"): everything,
        ("emr_core", "emr_master"): everything,  # HDFS, YARN and Ray's GCS (6379) on the master
        ("emr_master", "emr_service_access"): ("tcp", 9443),
        ("emr_core", "emr_service_access"): ("tcp", 9443),
        ("emr_service_access", "emr_master"): ("tcp", 8443),
        ("emr_service_access", "emr_core"): ("tcp", 8443),
    }
    assert _sg_rules(plan, "ingress") == {
        ("emr_master", "emr_master"): everything,
        ("emr_master", "emr_core"): everything,
        ("emr_core", "emr_core"): everything,
        ("emr_core", "emr_master"): everything,
        ("emr_master", "emr_service_access"): ("tcp", 8443),
        ("emr_core", "emr_service_access"): ("tcp", 8443),
        # Without it, cluster creation fails with a VALIDATION_ERROR.
        ("emr_service_access", "emr_master"): ("tcp", 9443),
    }
    # The cluster is created only after the rules EMR validates exist.
    depends = set(_config_resource(plan, "aws_emr_cluster.main").get("depends_on", []))
    assert "aws_vpc_security_group_ingress_rule.service_access_from_master" in depends


def _config_resource(plan: dict, address: str) -> dict:
    (resource,) = [r for r in plan["configuration"]["root_module"]["resources"] if r["address"] == address]
    return resource


@needs_terraform
def test_nothing_reaches_the_internet(plan: dict) -> None:
    """No NAT gateway, no internet gateway, no default route, no 0.0.0.0/0 in any rule (finding 6)."""
    types = {rc["type"] for rc in plan["resource_changes"]}
    assert not types & {"aws_nat_gateway", "aws_internet_gateway", "aws_eip", "aws_egress_only_internet_gateway"}
    for table in _changes(plan, "aws_route_table"):
        assert not table.get("route"), table
    egress = _changes(plan, "aws_vpc_security_group_egress_rule")
    assert not [r for r in egress if r.get("cidr_ipv4") in ("0.0.0.0/0",) or r.get("cidr_ipv6") == "::/0"]
    assert "0.0.0.0/0" not in _ingress_cidrs(plan)
    # HTTPS to the interface endpoints inside the VPC and to S3's gateway endpoint, from both node groups.
    https = [r for r in egress if (r["ip_protocol"], r["from_port"]) == ("tcp", 443)]
    assert sorted(r.get("cidr_ipv4") or "prefix-list" for r in https) == ["10.42.0.0/16"] * 2 + ["prefix-list"] * 2
    services = {e["service_name"].rsplit(".", 1)[1] for e in _changes(plan, "aws_vpc_endpoint")}
    assert services == {"s3", "ssm", "ssmmessages", "ec2messages", "elasticmapreduce", "kms", "sts"}


@needs_terraform
def test_disk_root_volume_and_everything_of_m9_on_the_ebs_volume(plan: dict) -> None:
    cluster = _one(plan, "aws_emr_cluster", "main")
    assert cluster["ebs_root_volume_size"] >= 30  # EMR's default 15 GiB is too small
    args = cluster["bootstrap_action"][0]["args"]
    opt = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
    # EMR mounts the first EBS volume at /mnt; /tmp may be a small tmpfs.
    for key in ("--venv", "--cache-dir", "--ray-temp-dir", "--ray-token-file"):
        assert opt[key].startswith("/mnt/"), (key, opt[key])
    ebs = cluster["core_instance_group"][0]["ebs_config"][0]
    assert ebs["size"] >= 32 and ebs["type"] == "gp3"
    descriptions = {k: v["description"] for k, v in plan["configuration"]["root_module"]["variables"].items()}
    assert "/mnt" in descriptions["ebs_volume_size_gb"] and "venv" in descriptions["ebs_volume_size_gb"]


@needs_terraform
def test_yarn_offers_only_what_ray_leaves(plan: dict) -> None:
    """m5.2xlarge core nodes: 8 vCPUs, 32 GiB; Ray gets floor(8 * 0.5) = 4 CPUs, YARN the other 4."""
    cluster = _one(plan, "aws_emr_cluster", "main")
    configurations = {c["Classification"]: c["Properties"] for c in json.loads(cluster["configurations_json"])}
    yarn = configurations["yarn-site"]
    vcores, memory = int(yarn["yarn.nodemanager.resource.cpu-vcores"]), int(yarn["yarn.nodemanager.resource.memory-mb"])
    ray_cpus = 8 // 2
    assert vcores + ray_cpus == 8
    assert memory == 32768 * 3 // 4 // 2  # half of EMR's usual 75% share
    assert int(yarn["yarn.scheduler.maximum-allocation-vcores"]) == vcores
    # Without the dominant-resource calculator YARN schedules by memory alone and ignores the vcores.
    calculator = configurations["capacity-scheduler"]["yarn.scheduler.capacity.resource-calculator"]
    assert calculator.endswith("DominantResourceCalculator")
    # Spark's executors fit YARN's share, overhead (max(384 MiB, 10%)) included.
    spark = configurations["spark-defaults"]
    cores, executor_mib = int(spark["spark.executor.cores"]), int(spark["spark.executor.memory"].removesuffix("m"))
    per_node = vcores // cores
    assert per_node >= 1 and per_node * (executor_mib + max(384, executor_mib // 10)) <= memory
    # The head offers no actor CPUs; the workers' share is the same fraction the YARN split used.
    args = cluster["bootstrap_action"][0]["args"]
    assert args[args.index("--ray-head-cpus") + 1] == "0"
    assert float(args[args.index("--ray-cpu-fraction") + 1]) == 0.5


@needs_terraform
def test_task_nodes_get_their_own_yarn_share(tf_workdir: Path) -> None:
    _tf(
        tf_workdir,
        *_plan_args("-var=task_instance_count=2", "-var=task_instance_type=m5.4xlarge", "-out=task.tfplan"),
    )
    task_plan = json.loads(_tf(tf_workdir, "show", "-json", "task.tfplan").stdout)
    (task,) = _changes(task_plan, "aws_emr_instance_group")
    (yarn,) = json.loads(task["configurations_json"])
    assert yarn["Properties"]["yarn.nodemanager.resource.cpu-vcores"] == "8"  # 16 vCPUs, 8 for Ray


@needs_terraform
def test_unknown_instance_type_is_refused_at_plan(tf_workdir: Path) -> None:
    proc = _tf(tf_workdir, *_plan_args("-var=core_instance_type=x9.huge"), check=False)
    assert proc.returncode != 0
    assert "must be listed in local.instance_shapes" in " ".join(proc.stderr.split())


@needs_terraform
def test_ray_token_is_generated_encrypted_and_wired(plan: dict) -> None:
    token = _one(plan, "aws_ssm_parameter", "ray_token")
    assert token["type"] == "SecureString"
    assert "aws_kms_key.data.arn" in _config(plan, "aws_ssm_parameter.ray_token")["key_id"]["references"]
    cluster = _one(plan, "aws_emr_cluster", "main")
    args = cluster["bootstrap_action"][0]["args"]
    assert args[args.index("--ray-token-parameter") + 1] == token["name"]
    token_file = args[args.index("--ray-token-file") + 1]
    step = plan["planned_values"]["outputs"]["run_step_args"]["value"]
    assert "RAY_AUTH_MODE=token" in step and f"RAY_AUTH_TOKEN_PATH={token_file}" in step
    # The nodes may read this one parameter, nothing else in SSM's parameter store.
    node_policy = _config(plan, "data.aws_iam_policy_document.emr_ec2")["statement"]
    reads = [s for s in node_policy if "ssm:GetParameter" in s["actions"]["constant_value"]]
    assert len(reads) == 1 and reads[0]["resources"]["references"][0] == "aws_ssm_parameter.ray_token.arn"
    # The bootstrap turns token auth on for every Ray process it starts.
    assert "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN_FILE" in (BOOTSTRAP / "bootstrap.sh").read_text()


@needs_terraform
def test_small_iam_things(plan: dict) -> None:
    """Finding 7 of issue 12."""
    kms = _one(plan, "aws_iam_policy_document", "kms")["statement"]
    (grants,) = [s for s in kms if "kms:CreateGrant" in s["actions"]]
    grant_refs = _config(plan, "data.aws_iam_policy_document.kms")["statement"]
    (grant_cfg,) = [s for s in grant_refs if "kms:CreateGrant" in s["actions"]["constant_value"]]
    assert grant_cfg["principals"][0]["identifiers"]["references"] == [
        "aws_iam_role.emr_service.arn",
        "aws_iam_role.emr_service",
    ], "only the service role may create grants"
    assert grants["condition"][0]["variable"] == "kms:GrantIsForAWSResource"
    (trust,) = _one(plan, "aws_iam_policy_document", "emr_assume")["statement"]
    assert {c["variable"] for c in trust["condition"]} == {"aws:SourceAccount", "aws:SourceArn"}
    session = _one(plan, "aws_ssm_document", "session")
    assert session["document_type"] == "Session"
    # destroy validates m9_dist like apply, so the printed command must pass it.
    teardown = plan["configuration"]["root_module"]["outputs"]["teardown_commands"]["expression"]
    assert "var.m9_dist" in teardown["references"]
    assert "destroy -var m9_dist=${var.m9_dist}" in (INFRA / "outputs.tf").read_text()


@needs_terraform
def test_s3_endpoint_reaches_only_this_bucket_and_emrs(plan: dict) -> None:
    """The gateway endpoint's policy: this bucket, and the buckets AWS lists for EMR in a private subnet."""
    endpoint = _one(plan, "aws_vpc_endpoint", "s3")
    assert "data.aws_iam_policy_document.s3_endpoint" in _config(plan, "aws_vpc_endpoint.s3")["policy"]["references"]
    # Fully known at plan time, the document is read then (prior state), and the endpoint carries it.
    (document,) = [
        r["values"]
        for r in plan["prior_state"]["values"]["root_module"]["resources"]
        if r["address"] == "data.aws_iam_policy_document.s3_endpoint"
    ]
    assert json.loads(document["json"]) == json.loads(endpoint["policy"])
    statements = {s["Sid"]: s for s in json.loads(document["json"])["Statement"]}
    assert set(statements["ThisBucket"]["Resource"]) == {PLAN_BUCKET_ARN, f"{PLAN_BUCKET_ARN}/*"}
    resources = {
        r for s in statements.values() for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])
    }
    assert resources == {
        PLAN_BUCKET_ARN,
        f"{PLAN_BUCKET_ARN}/*",
        "arn:aws:s3:::al2023-repos-eu-west-1-de612dc2/*",
        "arn:aws:s3:::repo.eu-west-1.emr.amazonaws.com/*",
        "arn:aws:s3:::aws157-instance-data-0-prod-eu-west-1/*",
        "arn:aws:s3:::aws157-instance-data-1-prod-eu-west-1/*",
        "arn:aws:s3:::eu-west-1.elasticmapreduce/*",
        "arn:aws:s3:::aws157-logs-prod-eu-west-1/*",
        "arn:aws:s3:::prod.eu-west-1.appinfo.src/*",
    }
    assert all(s["Effect"] == "Allow" for s in statements.values())
    # Only reads from AWS's buckets, except EMR's own log and application-history buckets.
    for sid, s in statements.items():
        if sid not in ("ThisBucket", "EnableClusterLogs", "EnableApplicationHistory"):
            assert s["Action"] in ("s3:GetObject", ["s3:GetObject"]), sid


@needs_terraform
def test_node_role_may_check_the_prefix_keys(plan: dict) -> None:
    """HeadObject on `inputs` (pyarrow) and `runs`, `runs_$folder$` (EMRFS) needs GetObject on those keys."""
    statements = _one(plan, "aws_iam_policy_document", "emr_ec2")["statement"]
    reads = {
        r.removeprefix(PLAN_BUCKET_ARN) for s in statements if "s3:GetObject" in s["actions"] for r in s["resources"]
    }
    for prefix in ("inputs", "runs", "tmp"):
        assert {f"/{prefix}", f"/{prefix}_$folder$", f"/{prefix}/*"} <= reads, prefix
    (listing,) = [s for s in statements if "s3:ListBucket" in s["actions"]]
    assert listing["resources"] == [PLAN_BUCKET_ARN]


@needs_terraform
def test_sessions_without_a_document_are_recorded(plan: dict) -> None:
    """SSM-SessionManagerRunShell (the region's preferences, used when start-session names no document)."""
    preferences = _one(plan, "aws_ssm_document", "session_preferences")
    assert preferences["name"] == "SSM-SessionManagerRunShell" and preferences["document_type"] == "Session"
    # The content embeds the key's ARN (session encryption), known only after apply: read its source.
    assert "aws_kms_key.data.arn" in _config(plan, "aws_ssm_document.session_preferences")["content"]["references"]
    block = re.search(
        r'^resource "aws_ssm_document" "session_preferences" \{\n(.*?)^\}', (INFRA / "main.tf").read_text(), re.S | re.M
    ).group(1)
    inputs = dict(re.findall(r"^      (\w+)\s+= (.+)$", block, re.M))
    assert inputs["s3BucketName"] == "local.bucket_name" and inputs["s3KeyPrefix"] == '"logs/ssm"'
    assert inputs["s3EncryptionEnabled"] == "true" and inputs["kmsKeyId"] == "aws_kms_key.data.arn"
    assert inputs["runAsEnabled"] == "false"
    assert '"Standard_Stream"' in block


@needs_terraform
def test_start_session_is_limited_to_the_approved_documents(plan: dict) -> None:
    statements = _one(plan, "aws_iam_policy_document", "operator")["statement"]
    starts = [s for s in statements if "ssm:StartSession" in s["actions"]]
    assert len(starts) == 2
    for s in starts:
        assert {"test": "BoolIfExists", "variable": "ssm:SessionDocumentAccessCheck", "values": ["true"]} in (
            s["condition"]
        ), s["sid"]
    (documents,) = [s for s in starts if s["sid"] == "StartSessionsWithApprovedDocuments"]
    refs = _config(plan, "data.aws_iam_policy_document.operator")["statement"]
    (documents_cfg,) = [s for s in refs if s["sid"]["constant_value"] == "StartSessionsWithApprovedDocuments"]
    assert "aws_ssm_document.session.arn" in documents_cfg["resources"]["references"]
    text = (INFRA / "main.tf").read_text()
    for name in (
        "SSM-SessionManagerRunShell",
        "AWS-StartPortForwardingSession",
        "AWS-StartPortForwardingSessionToRemoteHost",
    ):
        assert f'document/{name}"' in text, name
    # The documents named in infra/aws.sh are all approved.
    used = set(re.findall(r"--document-name (AWS-[A-Za-z]+)", (INFRA / "aws.sh").read_text()))
    assert used == {"AWS-StartPortForwardingSession", "AWS-StartPortForwardingSessionToRemoteHost"}
    # Only this cluster's nodes.
    (nodes,) = [s for s in starts if s["sid"] == "StartSessionsOnThisClustersNodes"]
    assert {"test": "StringEquals", "variable": "ssm:resourceTag/m9-stack", "values": ["m9"]} in nodes["condition"]
    assert _one(plan, "aws_emr_cluster", "main")["tags"]["m9-stack"] == "m9"
    assert "operator_policy_arn" in plan["configuration"]["root_module"]["outputs"]


# --- linters ----------------------------------------------------------------------


def _checkov() -> str | None:
    for candidate in (
        os.environ.get("M9_CHECKOV"),
        str(REPO / ".venv-tools" / "bin" / "checkov"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return shutil.which("checkov")


def test_checkov_skips_have_reasons() -> None:
    skips = re.findall(r"#checkov:skip=([A-Z0-9_]+)(?::(.*))?", (INFRA / "main.tf").read_text())
    for check_id, reason in skips:
        assert reason and len(reason.split()) >= 5, f"checkov skip {check_id} needs a real reason"


@pytest.mark.slow
def test_checkov_passes() -> None:
    checkov = _checkov()
    if checkov is None:
        pytest.skip("checkov not found: python3 -m venv .venv-tools && .venv-tools/bin/pip install checkov==3.3.30")
    proc = subprocess.run(
        [
            checkov,
            "-d",
            str(INFRA),
            "--framework",
            "terraform",
            "--skip-download",
            "-o",
            "json",
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )
    report = json.loads(proc.stdout)
    summary = report["summary"]
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in report["results"]["failed_checks"]]
    assert summary["failed"] == 0, "\n".join(failed)
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 100


def test_shellcheck_bootstrap() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (apt-get install -y shellcheck)")
    scripts = sorted(str(p) for p in BOOTSTRAP.glob("*.sh"))
    assert scripts
    proc = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, check=False, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_docker_compose_deploy_profile() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"terraform", "aws-cli"} <= set(services)
    for name in ("terraform", "aws-cli"):
        assert services[name]["profiles"] == ["deploy"]
    # `aws ssm start-session` needs the Session Manager plugin, which the stock aws-cli image lacks.
    aws_cli = services["aws-cli"]
    dockerfile = (REPO / aws_cli["build"]["context"] / aws_cli["build"]["dockerfile"]).read_text()
    assert "FROM amazon/aws-cli:" in dockerfile and "session-manager-plugin" in dockerfile
    assert all(p.startswith("127.0.0.1:") for p in aws_cli["ports"])
    terraform = services["terraform"]
    assert terraform["image"] == f"hashicorp/terraform:{TERRAFORM_VERSION}"
    assert any(v.startswith("./infra:") for v in terraform["volumes"])
    if TERRAFORM is not None:
        out = subprocess.run(
            [TERRAFORM, "version"],
            capture_output=True,
            check=False,
            text=True,
            env=_terraform_env(),
        ).stdout
        assert f"v{TERRAFORM_VERSION}" in out, "docker-compose.yml and the installed terraform differ"


# --- terraform apply and destroy against moto's server on loopback ------------------

MOTO_BUCKET = "m9-moto-test"
MOTO_SERVICES = ("ec2", "emr", "iam", "kms", "s3", "ssm", "sts")

# Where moto 5.2.5 behaves unlike AWS although it has the call, a test-only override stands in, so the
# apply gets past it to the rest of the stack (each is named in the report and in infra/README.md):
#  - IAM AttachRolePolicy: AmazonEMRServicePolicy_v2 is not among moto's AWS managed policies;
#  - S3 PutObject: moto applies the bucket policy's Deny without its aws:SecureTransport condition,
#    so the TLS-only bucket refuses every upload, even over TLS;
#  - EC2 CreateFlowLogs: moto reads an S3 destination with a key prefix (bucket/logs/vpc-flow/) as a
#    bucket name that does not exist.
MOTO_STAND_INS = """\
resource "aws_iam_role_policy_attachment" "emr_service" {
  policy_arn = "arn:aws:iam::aws:policy/service-role/AmazonElasticMapReduceRole"
}

resource "aws_s3_bucket_policy" "data" {
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "MotoStandIn"
      Effect    = "Allow"
      Principal = { AWS = "arn:aws:iam::123456789012:root" }
      Action    = "s3:GetObject"
      Resource  = "${local.bucket_arn}/*"
    }]
  })
}

resource "aws_flow_log" "main" {
  log_destination = local.bucket_arn
}
"""
# The one call moto lacks: after RunJobFlow the provider reads the cluster's instance fleets, and
# moto 5.2.5 answers ListInstanceFleets with a 500 (NotImplementedError), which the provider retries
# for as long as its create timeout. The test stops there.
MOTO_MISSING_CALL = "EMR ListInstanceFleets"
CLUSTER_APPLY_TIMEOUT_S = 90


def _moto_provider(endpoint: str) -> str:
    endpoints = "\n".join(f'    {s} = "{endpoint}"' for s in MOTO_SERVICES)
    return f"""\
provider "aws" {{
  access_key                  = "test"
  secret_key                  = "test"
  skip_credentials_validation = true
  skip_requesting_account_id  = true
  skip_metadata_api_check     = true
  skip_region_validation      = true
  s3_use_path_style           = true
  # moto's self-signed certificate (TLS, because the bucket policy refuses plain HTTP).
  insecure = true

  endpoints {{
{endpoints}
  }}
}}
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(proc: subprocess.Popen, port: int, log: Path) -> None:
    """Wait up to 60 s for the server `proc` to accept connections on 127.0.0.1:port; fail with its log."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            assert time.monotonic() < deadline, "moto server did not start"
            assert proc.poll() is None, log.read_text()
            time.sleep(0.3)


@pytest.fixture
def moto_server(tmp_path: Path) -> Iterator[str]:
    """moto's server on 127.0.0.1 with TLS and AWS's managed IAM policies loaded; yields its endpoint."""
    port = free_port()
    log = (tmp_path / "moto.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port), "-s"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MOTO_IAM_LOAD_MANAGED_POLICIES": "true"},
    )
    endpoint = f"https://127.0.0.1:{port}"
    try:
        wait_for_server(proc, port, tmp_path / "moto.log")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _tf_timed(workdir: Path, timeout: float, *args: str) -> subprocess.CompletedProcess[str] | None:
    """terraform in its own process group, killed with its provider after timeout (None then)."""
    proc = subprocess.Popen(
        [TERRAFORM, *args, "-no-color"],
        cwd=workdir,
        env=_terraform_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@needs_terraform
def test_apply_and_destroy_against_moto(moto_server: str, tmp_path: Path) -> None:
    """terraform apply, then destroy, of the whole stack against a local AWS API (issue 12).

    Everything but the EMR cluster is applied and then checked in moto; the cluster's apply reaches
    RunJobFlow and stops at the call moto lacks (xfail naming it), after destroy has removed the rest.
    """
    boto3 = pytest.importorskip("boto3")
    root = tmp_path / "stack"
    shutil.copytree(
        INFRA,
        root / "infra",
        ignore=shutil.ignore_patterns(".terraform", "*.tfplan", "terraform.tfstate*", "wheelhouse"),
    )
    shutil.copytree(BOOTSTRAP, root / "bootstrap")
    shutil.copy(REPO / "constraints.txt", root / "constraints.txt")
    (root / "dist").mkdir()
    (root / "dist" / "m9-0.0.0-py3-none-any.whl").write_bytes(b"not a real wheel")
    workdir = root / "infra"
    _fake_wheelhouse(workdir / "wheelhouse")
    (workdir / "moto_provider_override.tf").write_text(_moto_provider(moto_server))
    (workdir / "moto_stand_ins_override.tf").write_text(MOTO_STAND_INS)
    _tf(workdir, "init", "-input=false", "-backend=false")
    variables = [
        "-var=m9_dist=../dist/m9-0.0.0-py3-none-any.whl",
        f"-var=bucket_name={MOTO_BUCKET}",
        "-var=force_destroy_bucket=true",
    ]
    _tf(workdir, "plan", "-input=false", *variables, "-out=moto.tfplan")
    planned = json.loads(_tf(workdir, "show", "-json", "moto.tfplan").stdout)
    addresses = [rc["address"] for rc in planned["resource_changes"] if rc["mode"] == "managed"]
    cluster = "aws_emr_cluster.main"
    rest = [a for a in addresses if a != cluster]

    # 1. Everything except the cluster.
    _tf(workdir, "apply", "-input=false", "-auto-approve", *variables, *(f"-target={a}" for a in rest))
    applied = [a for a in _tf(workdir, "state", "list").stdout.split() if not a.startswith("data.")]
    assert sorted(applied) == sorted(rest)
    print(f"applied against moto ({len(applied)}): {' '.join(applied)}")

    # What moto now holds is what the plan promised.
    aws = {
        "endpoint_url": moto_server,
        "region_name": "eu-west-1",
        "verify": False,
        "aws_access_key_id": "test",
        "aws_secret_access_key": "test",
    }
    s3 = boto3.client("s3", **aws)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=MOTO_BUCKET)["Contents"]}
    assert {"bootstrap/bootstrap.sh", "bootstrap/m9_preflight.py", "bootstrap/constraints.txt"} <= keys
    head = s3.head_object(Bucket=MOTO_BUCKET, Key="bootstrap/bootstrap.sh")
    assert head["ServerSideEncryption"] == "aws:kms"
    token = boto3.client("ssm", **aws).get_parameter(Name="/m9/ray-auth-token", WithDecryption=True)["Parameter"]
    assert token["Type"] == "SecureString" and re.fullmatch(r"[0-9a-f]{64}", token["Value"])
    ec2 = boto3.client("ec2", **aws)
    groups = {g["GroupName"]: g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]}
    rules = ec2.describe_security_group_rules()["SecurityGroupRules"]
    service_ingress = [r for r in rules if r["GroupId"] == groups["m9-emr-service-access"] and not r["IsEgress"]]
    assert [(r["FromPort"], r["ReferencedGroupInfo"]["GroupId"]) for r in service_ingress] == [
        (9443, groups["m9-emr-master"])
    ]

    # 2. The cluster: RunJobFlow, then the provider reads it back. No refresh: moto describes an
    # all-protocol security group rule with ports, which the provider would then try to "fix" with
    # ModifySecurityGroupRules, which moto refuses.
    cluster_apply = _tf_timed(
        workdir,
        CLUSTER_APPLY_TIMEOUT_S,
        "apply",
        "-input=false",
        "-auto-approve",
        "-refresh=false",
        *variables,
        f"-target={cluster}",
    )
    moto_log = (tmp_path / "moto.log").read_text()
    cluster_created = cluster_apply is not None and cluster_apply.returncode == 0
    # RunJobFlow itself went through: moto holds the cluster, with the bootstrap action and the step's pieces.
    emr = boto3.client("emr", **aws)
    (summary,) = [c for c in emr.list_clusters()["Clusters"] if c["Name"] == "m9"]
    actions = emr.list_bootstrap_actions(ClusterId=summary["Id"])["BootstrapActions"]
    assert actions[0]["ScriptPath"] == f"s3://{MOTO_BUCKET}/bootstrap/bootstrap.sh"
    assert "--ray-token-parameter" in actions[0]["Args"]

    # 3. destroy removes everything terraform created, the bucket with its objects included.
    _tf(workdir, "destroy", "-input=false", "-auto-approve", "-lock=false", *variables)
    assert [a for a in _tf(workdir, "state", "list").stdout.split() if not a.startswith("data.")] == []
    assert MOTO_BUCKET not in {b["Name"] for b in s3.list_buckets()["Buckets"]}
    assert not [g for g in groups if g.startswith("m9-") and g in {
        g2["GroupName"] for g2 in ec2.describe_security_groups()["SecurityGroups"]
    }]  # fmt: skip

    if not cluster_created:
        assert "The list_instance_fleets action has not been implemented" in moto_log, (
            cluster_apply.stderr if cluster_apply else "cluster apply timed out for another reason"
        )
        pytest.xfail(f"moto lacks {MOTO_MISSING_CALL}: the EMR cluster's apply stops after RunJobFlow")
