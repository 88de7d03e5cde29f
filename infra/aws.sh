#!/usr/bin/env bash
# Run m9 on AWS from start to finish: terraform apply, upload images, run the EMR step, fetch, destroy.
#
# Usage: infra/aws.sh COMMAND [ARGS]
#   up                            build the m9 wheel and the hashed wheelhouse (with the verified
#                                 weights), then terraform init + apply (bucket, VPC, EMR)
#   upload [DIR]                  sync a folder of images to s3://<bucket>/inputs/
#                                 (default: the bundled sample, m9/sample)
#   upload --fruits360 [ARCHIVE]  unpack Fruits-360 straight into s3://<bucket>/inputs/ with
#                                 `m9 data fruits-360` (ARCHIVE: URL or .zip; default: the public
#                                 GitHub archive, which needs internet)
#   run [RUN_ID]                  submit `m9 run` on runs/RUN_ID/ as an EMR step and wait for it
#                                 (default RUN_ID: the UTC time, e.g. 20260101T120000Z)
#   fetch RUN_ID [DEST]           copy runs/RUN_ID/reduce/ and every stage's _m9.json manifest
#                                 to DEST (default: m9-aws-out/RUN_ID)
#   down                          terminate the cluster, then terraform destroy
#   all [DIR | --fruits360 [ARCHIVE]]
#                                 up, upload, run, fetch, down; a failure runs `down` too
#
# Interactive work, through Session Manager only (no port opens on the cluster; needs the
# AWS CLI's Session Manager plugin). Each forwards a port of the master (its loopback, or for
# YARN and Spark its private DNS name, where they listen) to the same port on 127.0.0.1 here
# (LOCAL_PORT= another) and runs until Ctrl-C:
#   shell                         a shell on the master, recorded under s3://<bucket>/logs/ssm/
#   notebook                      Jupyter (m9's venv, Spark on YARN, the cluster's Ray) -> :8888;
#                                 prints the URL with its token
#   dashboard                     Ray's dashboard -> :8265 (it asks for the same token)
#   spark-history                 Spark History Server -> :18080
#   yarn                          YARN ResourceManager UI -> :8088
#
# Environment:
#   M9_AWS_DRY_RUN=1        print the pip/terraform/aws/m9 commands instead of running them
#   M9_TF_OUTPUT_<name>     use this instead of `terraform output <name>` (bucket_name, cluster_id,
#                           region, session_document, ray_token_parameter; run_step_args as JSON).
#                           A dry run prints unset ones as <name>.
#   LOCAL_PORT              notebook/dashboard/spark-history/yarn: the local port (default: the remote one)
#   RUN_ID                  `all`: the run's name (default: the UTC time)
#   KEEP=1                  `all`: leave the stack up at the end, after a success or a failure
#   FORCE_DESTROY_BUCKET=1  `down`: delete the bucket and everything in it too. `all` sets it once
#                           the results are fetched; without it the bucket and its key survive.
#   AUTO_APPROVE=1          terraform apply/destroy without asking
#   PYTHON                  builds the wheel and the step JSON (default: .venv/bin/python, or python3)
#   M9                      the m9 command for `upload --fruits360` (default: .venv/bin/m9, or m9)
#   TERRAFORM, AWS          the terraform and aws commands (default: terraform, aws)
#   TF_VAR_<variable>       any variable of infra/variables.tf, e.g. TF_VAR_core_instance_count=4
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
PROG=infra/aws.sh
SAMPLE=$REPO/m9/sample
# The wheel `up` deployed: destroy needs m9_dist too (it has no default) and validates that it exists.
DIST_FILE=$HERE/.m9-dist
# RUN_ID becomes an S3 prefix and an EMR step name; keep it to characters that need no quoting.
RUN_ID_RE='^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'

DRY_RUN=${M9_AWS_DRY_RUN:-0}
TERRAFORM=${TERRAFORM:-terraform}
AWS=${AWS:-aws}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z ${M9:-} ]]; then
  if [[ -x $REPO/.venv/bin/m9 ]]; then M9=$REPO/.venv/bin/m9; else M9=m9; fi
fi
# -input=false would make apply and destroy fail instead of asking for confirmation, so it goes
# with -auto-approve only.
APPROVE=()
if [[ ${AUTO_APPROVE:-0} == 1 ]]; then APPROVE=(-input=false -auto-approve); fi

# --- helpers ----------------------------------------------------------------

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

usage_error() {
  log "$*"
  log "run '$PROG --help' for the commands"
  exit 2
}

# One argument, quoted for a shell only if it needs it, so dry-run lines can be pasted.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Run a command, or on a dry run print it after '+ '.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    local arg line="+"
    for arg in "$@"; do line+=" $(quote "$arg")"; done
    printf '%s\n' "$line"
  else
    "$@"
  fi
}

need() {
  [[ $DRY_RUN == 1 ]] || command -v "$1" >/dev/null || die "$1 is not installed; $2"
}

tf() { run "$TERRAFORM" -chdir="$HERE" "$@"; }

# A terraform output (raw for strings, JSON for run_step_args), or its M9_TF_OUTPUT_<name> override.
tf_output() {
  local name=$1 override="M9_TF_OUTPUT_$1"
  if [[ -n ${!override:-} ]]; then
    printf '%s\n' "${!override}"
  elif [[ $DRY_RUN == 1 && $name == run_step_args ]]; then
    # A stand-in with the one part `run` edits; the real list is local.run_step_args in main.tf.
    printf '%s\n' '["m9", "run", "--workdir", "s3://<bucket_name>/runs/RUN_ID/"]'
  elif [[ $DRY_RUN == 1 ]]; then
    printf '<%s>\n' "$name"
  elif [[ $name == run_step_args ]]; then
    "$TERRAFORM" -chdir="$HERE" output -json "$name" || die "no terraform output $name; run '$PROG up' first"
  else
    "$TERRAFORM" -chdir="$HERE" output -raw "$name" || die "no terraform output $name; run '$PROG up' first"
  fi
}

check_run_id() {
  [[ $1 =~ $RUN_ID_RE ]] || usage_error "RUN_ID must be 1-64 letters, digits, '.', '_' or '-', not '$1'"
}

wheel_path() {
  local version
  version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$REPO/m9/__init__.py")
  [[ -n $version ]] || die "no __version__ in m9/__init__.py"
  printf '%s/dist/m9-%s-py3-none-any.whl\n' "$REPO" "$version"
}

build_wheel() {
  log "building the m9 wheel into dist/"
  run "$PYTHON" -m pip wheel --no-deps --disable-pip-version-check -q -w "$REPO/dist" "$REPO"
}

# The wheel to pass to destroy: the one `up` deployed, else the current version's (built if missing).
deployed_wheel() {
  local wheel=""
  if [[ -f $DIST_FILE ]]; then wheel=$(<"$DIST_FILE"); fi
  if [[ -z $wheel || ! -f $wheel ]]; then
    wheel=$(wheel_path)
    if [[ ! -f $wheel ]]; then build_wheel >&2; fi
  fi
  printf '%s\n' "$wheel"
}

tf_platform() {
  if [[ $DRY_RUN == 1 ]]; then
    echo linux_amd64
    return
  fi
  "$TERRAFORM" version -json | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["platform"])'
}

# The EC2 id of the master (Session Manager's target).
master_instance() {
  local region=$1 cluster=$2
  if [[ $DRY_RUN == 1 ]]; then
    run "$AWS" emr list-instances --region "$region" --cluster-id "$cluster" --instance-group-types MASTER \
      --instance-states RUNNING --query 'Instances[0].Ec2InstanceId' --output text >&2
    echo "<master-instance-id>"
    return
  fi
  local id
  id=$("$AWS" emr list-instances --region "$region" --cluster-id "$cluster" --instance-group-types MASTER \
    --instance-states RUNNING --query 'Instances[0].Ec2InstanceId' --output text)
  [[ -n $id && $id != None ]] || die "no running master in $cluster"
  printf '%s\n' "$id"
}

# --- commands ---------------------------------------------------------------

cmd_up() {
  need "$TERRAFORM" "see infra/README.md (What you need)"
  local wheel
  wheel=$(wheel_path)
  build_wheel
  if [[ $DRY_RUN != 1 ]]; then
    [[ -f $wheel ]] || die "pip wheel did not write $wheel"
    printf '%s\n' "$wheel" >"$DIST_FILE"
  fi
  # The nodes have no route to the internet: everything they install comes from here.
  log "building the hashed wheelhouse and the verified weights into infra/wheelhouse/"
  run "$M9" weights fetch
  run env PYTHON="$PYTHON" bash "$REPO/bootstrap/build_wheelhouse.sh" "$wheel" "$HERE/wheelhouse"
  log "creating the bucket, network and EMR cluster (about 10-15 minutes)"
  tf init -input=false
  # The committed .terraform.lock.hcl was made offline for linux_amd64; elsewhere, add this
  # platform's hashes from the registry (which verifies the provider's signature).
  local platform
  platform=$(tf_platform)
  if [[ $platform != linux_amd64 ]]; then tf providers lock "-platform=$platform"; fi
  tf apply ${APPROVE[@]+"${APPROVE[@]}"} -var "m9_dist=$wheel"
}

cmd_upload() {
  local bucket region
  bucket=$(tf_output bucket_name)
  region=$(tf_output region)
  if [[ ${1:-} == --fruits360 ]]; then
    need "$M9" "install m9 (make install) or set M9"
    local -a args=(data fruits-360 --output "s3://$bucket/inputs/")
    if [[ -n ${2:-} ]]; then args+=(--archive "$2"); fi
    log "building Fruits-360 into s3://$bucket/inputs/"
    run env AWS_REGION="$region" "$M9" "${args[@]}"
    return
  fi
  need "$AWS" "install the AWS CLI (see infra/README.md)"
  local dir=${1:-$SAMPLE}
  [[ -d $dir ]] || die "no such folder: $dir"
  log "copying $dir to s3://$bucket/inputs/"
  run "$AWS" s3 sync "$dir" "s3://$bucket/inputs/" --region "$region" --only-show-errors
}

steps_json() {
  "$PYTHON" - "$1" "$2" <<'PY'
import json
import sys

args, run_id = json.loads(sys.argv[1]), sys.argv[2]
if not any("/runs/RUN_ID/" in a for a in args):
    sys.exit("run_step_args has no /runs/RUN_ID/ to replace")
args = [a.replace("/runs/RUN_ID/", f"/runs/{run_id}/") for a in args]
step = {"Type": "CUSTOM_JAR", "Name": f"m9-run {run_id}", "ActionOnFailure": "CONTINUE",
        "Jar": "command-runner.jar", "Args": args}
print(json.dumps([step], separators=(",", ":")))
PY
}

# `aws emr wait step-complete` gives up after 30 minutes and on any end state, so wait again while the
# step is still running and explain an end other than COMPLETED.
wait_step() {
  local region=$1 cluster=$2 step=$3 bucket=$4 state
  if [[ $DRY_RUN == 1 ]]; then
    run "$AWS" emr wait step-complete --region "$region" --cluster-id "$cluster" --step-id "$step"
    return
  fi
  until "$AWS" emr wait step-complete --region "$region" --cluster-id "$cluster" --step-id "$step"; do
    state=$("$AWS" emr describe-step --region "$region" --cluster-id "$cluster" --step-id "$step" \
      --query Step.Status.State --output text)
    case $state in
      PENDING | RUNNING | CANCEL_PENDING) log "step $step is $state; still waiting" ;;
      COMPLETED) break ;;
      *)
        "$AWS" emr describe-step --region "$region" --cluster-id "$cluster" --step-id "$step" \
          --query Step.Status.FailureDetails --output text >&2 || true
        die "the m9 step ended $state; its logs: s3://$bucket/logs/emr/$cluster/steps/$step/"
        ;;
    esac
  done
}

cmd_run() {
  need "$AWS" "install the AWS CLI (see infra/README.md)"
  local run_id=${1:-$(date -u +%Y%m%dT%H%M%SZ)}
  check_run_id "$run_id"
  local bucket region cluster step_args steps step
  bucket=$(tf_output bucket_name)
  region=$(tf_output region)
  cluster=$(tf_output cluster_id)
  step_args=$(tf_output run_step_args)
  steps=$(steps_json "$step_args" "$run_id") || die "cannot build the step from run_step_args: $step_args"
  log "submitting m9 run on s3://$bucket/runs/$run_id/ to $cluster"
  if [[ $DRY_RUN == 1 ]]; then
    run "$AWS" emr add-steps --region "$region" --cluster-id "$cluster" --steps "$steps" \
      --query 'StepIds[0]' --output text
    step="<step-id>"
  else
    step=$("$AWS" emr add-steps --region "$region" --cluster-id "$cluster" --steps "$steps" \
      --query 'StepIds[0]' --output text)
  fi
  log "step $step submitted; waiting for it (the AWS CLI checks every 30 s)"
  wait_step "$region" "$cluster" "$step" "$bucket"
  log "run $run_id done; fetch it with: $PROG fetch $run_id"
}

cmd_fetch() {
  need "$AWS" "install the AWS CLI (see infra/README.md)"
  local run_id=$1
  check_run_id "$run_id"
  local dest=${2:-m9-aws-out/$run_id} bucket region
  bucket=$(tf_output bucket_name)
  region=$(tf_output region)
  local src="s3://$bucket/runs/$run_id"
  log "copying $src/reduce/ and the stage manifests to $dest/"
  run "$AWS" s3 sync "$src/reduce/" "$dest/reduce/" --region "$region" --only-show-errors
  run "$AWS" s3 sync "$src/" "$dest/" --region "$region" --only-show-errors \
    --exclude '*' --include '*/_m9.json'
  if [[ $DRY_RUN != 1 && ! -f $dest/reduce/_m9.json ]]; then
    die "$src/reduce/ has no _m9.json: the run has not finished (resume it with '$PROG run $run_id')"
  fi
  log "results in $dest/reduce/ (pca.csv, variance.json, pca/)"
}

cmd_down() {
  need "$TERRAFORM" "see infra/README.md (What you need)"
  local cluster region wheel
  cluster=$(tf_output cluster_id 2>/dev/null || true)
  region=$(tf_output region 2>/dev/null || true)
  if [[ -n $cluster && -n $region ]]; then
    need "$AWS" "install the AWS CLI (see infra/README.md)"
    # Stops the EC2 bill now, even while destroy waits for its confirmation.
    log "terminating $cluster"
    run "$AWS" emr terminate-clusters --region "$region" --cluster-ids "$cluster" ||
      log "warning: could not terminate $cluster; terraform destroy will try again"
  fi
  wheel=$(deployed_wheel)
  local -a extra=()
  if [[ ${FORCE_DESTROY_BUCKET:-0} == 1 ]]; then
    # The provider only honours force_destroy once it is in the state, so set it on the bucket first.
    log "FORCE_DESTROY_BUCKET=1: the bucket and every object in it will be deleted"
    tf apply -input=false -auto-approve -target=aws_s3_bucket.data \
      -var "m9_dist=$wheel" -var force_destroy_bucket=true
    extra=(-var force_destroy_bucket=true)
  fi
  tf destroy ${APPROVE[@]+"${APPROVE[@]}"} -var "m9_dist=$wheel" ${extra[@]+"${extra[@]}"}
  if [[ $DRY_RUN != 1 ]]; then rm -f "$DIST_FILE"; fi
}

cmd_shell() {
  need "$AWS" "install the AWS CLI and its Session Manager plugin (see infra/README.md)"
  local region cluster document target
  region=$(tf_output region)
  cluster=$(tf_output cluster_id)
  document=$(tf_output session_document)
  target=$(master_instance "$region" "$cluster")
  log "shell on $target (recorded under logs/ssm/)"
  run "$AWS" ssm start-session --region "$region" --target "$target" --document-name "$document"
}

# The master's private DNS name: YARN's ResourceManager and the Spark History Server listen on it
# (not on loopback), and their pages link to it.
master_dns() {
  local region=$1 cluster=$2
  if [[ $DRY_RUN == 1 ]]; then
    run "$AWS" emr describe-cluster --region "$region" --cluster-id "$cluster" \
      --query Cluster.MasterPublicDnsName --output text >&2
    echo "<master-private-dns>"
    return
  fi
  "$AWS" emr describe-cluster --region "$region" --cluster-id "$cluster" \
    --query Cluster.MasterPublicDnsName --output text
}

# Forwards REMOTE_PORT of the master to LOCAL_PORT (default: the same) here: on the master's loopback
# (Jupyter, Ray's dashboard), or with remote=host on the master's private DNS name (YARN, Spark).
forward() {
  local what=$1 remote=$2 path=${3:-/} where=${4:-loopback}
  need "$AWS" "install the AWS CLI and its Session Manager plugin (see infra/README.md)"
  local region cluster target local_port=${LOCAL_PORT:-$2}
  [[ $local_port =~ ^[0-9]+$ ]] || usage_error "LOCAL_PORT must be a port number, not '$local_port'"
  region=$(tf_output region)
  cluster=$(tf_output cluster_id)
  target=$(master_instance "$region" "$cluster")
  log "$what: http://127.0.0.1:$local_port$path (Ctrl-C ends the forwarding)"
  if [[ $where == host ]]; then
    local host
    host=$(master_dns "$region" "$cluster")
    log "its pages link to http://$host:$remote/; map $host to 127.0.0.1 in /etc/hosts to follow them"
    run "$AWS" ssm start-session --region "$region" --target "$target" \
      --document-name AWS-StartPortForwardingSessionToRemoteHost \
      --parameters "{\"host\":[\"$host\"],\"portNumber\":[\"$remote\"],\"localPortNumber\":[\"$local_port\"]}"
    return
  fi
  run "$AWS" ssm start-session --region "$region" --target "$target" \
    --document-name AWS-StartPortForwardingSession \
    --parameters "{\"portNumber\":[\"$remote\"],\"localPortNumber\":[\"$local_port\"]}"
}

# Jupyter and Ray's dashboard both take the cluster's Ray token (an SSM SecureString). Never printed:
# whoever holds it can run code on the cluster as hadoop; this says how to read it yourself.
print_token_hint() {
  local region parameter
  region=$(tf_output region)
  parameter=$(tf_output ray_token_parameter)
  log "token (not printed; paste it into the login page):"
  log "  $AWS ssm get-parameter --region $region --name $parameter --with-decryption --query Parameter.Value --output text"
}

cmd_notebook() {
  print_token_hint
  forward "Jupyter (m9's venv on the master; notebooks in /mnt/m9/notebooks)" 8888 /lab
}

cmd_dashboard() {
  print_token_hint
  forward "Ray dashboard" 8265
}

# The EXIT trap of `all`: after a failure, tear down what was created (unless KEEP=1).
all_failed() {
  local rc=$?
  trap - EXIT
  if ((rc == 0)); then return; fi
  log "failed (exit $rc); tearing the stack down ('KEEP=1 $PROG all' keeps it for debugging)"
  set +e
  # Keep the bucket: its logs/emr/ says why the run failed.
  (FORCE_DESTROY_BUCKET=0 cmd_down) || log "teardown failed too; run '$PROG down' before you leave"
  exit "$rc"
}

cmd_all() {
  local run_id=${RUN_ID:-$(date -u +%Y%m%dT%H%M%SZ)}
  check_run_id "$run_id"
  # Fail before the 15 minutes of `up`, not after.
  if [[ -n ${1:-} && $1 != --fruits360 && ! -d $1 ]]; then die "no such folder: $1"; fi
  if [[ ${KEEP:-0} != 1 ]]; then
    trap all_failed EXIT
    trap 'exit 130' INT TERM
  fi
  cmd_up
  cmd_upload "$@"
  cmd_run "$run_id"
  cmd_fetch "$run_id"
  trap - EXIT
  if [[ ${KEEP:-0} == 1 ]]; then
    log "KEEP=1: the stack stays up (it costs money by the hour); '$PROG down' removes it"
    return
  fi
  # Everything the run produced is now local, so by default the bucket goes too.
  FORCE_DESTROY_BUCKET=${FORCE_DESTROY_BUCKET:-1} cmd_down
  log "done: results in m9-aws-out/$run_id/"
}

# --- main -------------------------------------------------------------------

check_upload_args() {
  if [[ ${1:-} == --fruits360 ]]; then
    (($# <= 2)) || usage_error "upload --fruits360 takes at most one ARCHIVE"
  elif [[ ${1:-} == -* ]]; then
    usage_error "unknown option: $1"
  else
    (($# <= 1)) || usage_error "upload takes at most one DIR"
  fi
}

main() {
  (($# > 0)) || usage_error "no command given"
  local cmd=$1
  shift
  case $cmd in
    -h | --help | help) usage ;;
    up | down)
      (($# == 0)) || usage_error "$cmd takes no arguments"
      "cmd_$cmd"
      ;;
    upload | all)
      check_upload_args "$@"
      "cmd_$cmd" "$@"
      ;;
    run)
      (($# <= 1)) || usage_error "run takes at most one RUN_ID"
      cmd_run "$@"
      ;;
    fetch)
      (($# >= 1 && $# <= 2)) || usage_error "fetch needs RUN_ID and takes an optional DEST"
      cmd_fetch "$@"
      ;;
    shell | notebook | dashboard | spark-history | yarn)
      (($# == 0)) || usage_error "$cmd takes no arguments"
      case $cmd in
        spark-history) forward "Spark History Server" 18080 / host ;;
        yarn) forward "YARN ResourceManager" 8088 /cluster host ;;
        *) "cmd_$cmd" ;;
      esac
      ;;
    *) usage_error "unknown command: $cmd" ;;
  esac
}

main "$@"
