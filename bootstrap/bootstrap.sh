#!/usr/bin/env bash
# EMR bootstrap action for m9: install the pinned m9 into a Python 3.11 venv on
# the EBS volume, fetch the MobileNetV2 weights and Ray's token, then hand Ray to
# a supervisor that keeps it running and ships its logs to S3.
#
# Bootstrap actions run on every node *before* EMR installs Hadoop and Spark,
# and the cluster waits for them, so the synchronous part (install, token) fails
# loudly and returns; Ray runs under a supervisor:
#   systemd (m9-ray.service, Restart=always) where systemd runs, else a
#   supervising loop (setsid, restarts Ray after it exits). Either one runs
#   `bootstrap.sh __ray-node`, which waits, then `ray start --block`:
#   master: waits until EMR reports this node provisioned, then the head (no CPUs
#           for actors: the master keeps the Spark driver, YARN RM, NameNode)
#   others: wait until the head's port answers, then join it
# A second supervised loop (m9-ray-logs.service) copies the bootstrap log and
# Ray's logs to --log-uri every M9_LOG_SHIP_INTERVAL_S. On the master a third
# (m9-busy.service) touches EMR's /emr/metricscollector/isbusy while a Ray driver
# (an m9 step, a notebook's ray.init) is connected or a Jupyter kernel runs: EMR's
# idle auto-termination sees only YARN, and would end a Ray-only embed mid-run.
#
# Usage (arguments override the environment, which overrides the defaults):
#   bootstrap.sh --artifacts s3://BUCKET/bootstrap/ [--venv DIR] [--cache-dir DIR]
#                [--ray-port N] [--ray-cpu-fraction F] [--ray-head-cpus N] [--ray-temp-dir DIR]
#                [--ray-token-parameter NAME] [--ray-token-file FILE] [--log-uri s3://BUCKET/logs/m9/]
#                [--jupyter]
#
# Environment (everything needed to simulate an EMR node in a test):
#   M9_ARTIFACTS_URI       s3:// URI or local folder holding m9-*.whl|tar.gz, constraints.txt, m9_preflight.py,
#                          and wheelhouse/ (bootstrap/build_wheelhouse.sh): when it is there, pip installs
#                          only from it (--no-index --require-hashes; requirements-master.txt on a master
#                          with --jupyter, requirements.txt elsewhere) and the weights come from its
#                          weights/ folder, so the node needs no internet
#   M9_VENV                venv to create; its parent folder holds m9's state (ray.env,
#                          the supervised copy of this script)       (/mnt/m9/venv)
#   M9_CACHE_DIR           weights cache, also exported to the Ray nodes (m9's default: ~/.cache/m9)
#   M9_PYTHON              interpreter for the venv              (python3.11)
#   M9_SKIP_INSTALL=1      no venv/pip; use `ray` from PATH (and skip weights)
#   M9_SKIP_WEIGHTS=1      do not fetch the model weights
#   M9_WEIGHTS_URI         copy weights from here into M9_CACHE_DIR instead of `m9 weights fetch`
#   M9_PIP_ARGS            extra pip arguments, e.g. "--no-index --find-links /wheelhouse"
#   M9_SPARK_HOME          EMR's Spark, put on the venv's sys.path (/usr/lib/spark)
#   M9_BOOTSTRAP_LOG       log file                              (/var/log/m9/bootstrap.log)
#   M9_EMR_INFO_DIR        folder with instance.json, extraInstanceData.json and
#                          job-flow-state.txt                    (/emr/instance-controller/lib/info)
#   M9_NODE_ID             this node's Ray node name            (the EC2 instance id)
#   M9_RAY_HEAD_ADDRESS    head host for non-master nodes (default: masterHost in extraInstanceData.json)
#   M9_RAY_PORT            head (GCS) port                       (6379)
#   M9_RAY_NODE_IP         --node-ip-address of this node        (Ray's choice)
#   M9_RAY_TEMP_DIR        --temp-dir, also where objects spill  (/mnt/m9/ray)
#   M9_RAY_NUM_CPUS        CPUs a worker offers Ray; default floor(nproc * M9_RAY_CPU_FRACTION), at least 1
#   M9_RAY_CPU_FRACTION    share of a worker's cores for Ray; YARN is configured for the rest (0.5)
#   M9_RAY_HEAD_CPUS       CPUs the head offers Ray                (0)
#   M9_RAY_OBJECT_STORE_BYTES  object store size; default M9_RAY_OBJECT_STORE_FRACTION (0.15) of RAM,
#                          well below Ray's 30% default because YARN containers share the memory
#   M9_RAY_DASHBOARD       1: the head runs Ray's dashboard on 127.0.0.1 (Session Manager port
#                          forwarding reaches it; nothing else can); the wheelhouse ships ray[default],
#                          and the install checks its packages import (1)
#   M9_RAY_DASHBOARD_PORT  the dashboard's loopback port         (8265)
#   M9_RAY_EXTRA_ARGS      extra `ray start` arguments (split on spaces)
#   M9_RAY_TOKEN_PARAMETER SSM SecureString holding Ray's token (fetched with --with-decryption)
#   M9_RAY_TOKEN_FILE      where the token is kept, mode 0600 (<state>/ray-auth-token); without a
#                          parameter it must already hold the token. Ray runs with RAY_AUTH_MODE=token.
#   M9_LOG_URI             s3:// URI or local folder the logs are copied to (none: not shipped)
#   M9_LOG_SHIP_INTERVAL_S how often they are copied              (60)
#   M9_JUPYTER=1           master: install JupyterLab into the venv from the wheelhouse's
#                          requirements-master.txt and run it under systemd on 127.0.0.1:8888
#                          (m9-jupyter.service; token: Ray's; idle kernels culled after
#                          M9_KERNEL_CULL_S), with the notebooks from the artifacts (*.ipynb) in
#                          <state>/notebooks (--jupyter). Other nodes get no JupyterLab.
#   M9_KERNEL_CULL_S       Jupyter shuts a kernel idle this long (3600), so a forgotten notebook
#                          does not keep the cluster busy
#   M9_BUSY_FILE           master: the file EMR's idle check reads (/emr/metricscollector/isbusy)
#   M9_BUSY_INTERVAL_S     how often the master looks for Ray drivers and kernels (60)
#   M9_NO_SYSTEMD=1        use the supervising loop even where systemd runs
#   M9_RAY_RESTART_DELAY_S pause before the supervisor restarts Ray (10)
#   M9_WAIT_TIMEOUT_S      how long a Ray start waits for its node/head (3600)
#   M9_POLL_INTERVAL_S     how often it looks                    (5)
set -euo pipefail

# --- settings ---------------------------------------------------------------

ARTIFACTS_URI=${M9_ARTIFACTS_URI:-}
VENV=${M9_VENV:-/mnt/m9/venv}
RAY_PORT=${M9_RAY_PORT:-6379}
RAY_CPU_FRACTION=${M9_RAY_CPU_FRACTION:-0.5}
RAY_HEAD_CPUS=${M9_RAY_HEAD_CPUS:-0}
RAY_TEMP_DIR=${M9_RAY_TEMP_DIR:-/mnt/m9/ray}
TOKEN_PARAMETER=${M9_RAY_TOKEN_PARAMETER:-}
TOKEN_FILE=${M9_RAY_TOKEN_FILE:-}
LOG_URI=${M9_LOG_URI:-}
JUPYTER=${M9_JUPYTER:-0}

MODE="install"
while (($# > 0)); do
  case $1 in
    --artifacts) ARTIFACTS_URI=$2; shift 2 ;;
    --venv) VENV=$2; shift 2 ;;
    --cache-dir) export M9_CACHE_DIR=$2; shift 2 ;;
    --ray-port) RAY_PORT=$2; shift 2 ;;
    --ray-cpu-fraction) RAY_CPU_FRACTION=$2; shift 2 ;;
    --ray-head-cpus) RAY_HEAD_CPUS=$2; shift 2 ;;
    --ray-temp-dir) RAY_TEMP_DIR=$2; shift 2 ;;
    --ray-token-parameter) TOKEN_PARAMETER=$2; shift 2 ;;
    --ray-token-file) TOKEN_FILE=$2; shift 2 ;;
    --log-uri) LOG_URI=$2; shift 2 ;;
    --jupyter) JUPYTER=1; shift ;;
    # internal: what the supervisor runs (systemd unit or loop)
    __ray-node) MODE="ray-node"; shift ;;
    __supervise) MODE="supervise"; shift ;;
    __ship-logs) MODE="ship-logs"; shift ;;
    __mark-busy) MODE="mark-busy"; shift ;;
    *) echo "bootstrap.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
done

PYTHON=${M9_PYTHON:-python3.11}
SKIP_INSTALL=${M9_SKIP_INSTALL:-0}
SKIP_WEIGHTS=${M9_SKIP_WEIGHTS:-$SKIP_INSTALL}
SPARK_HOME_EMR=${M9_SPARK_HOME:-/usr/lib/spark}
LOG=${M9_BOOTSTRAP_LOG:-/var/log/m9/bootstrap.log}
INFO_DIR=${M9_EMR_INFO_DIR:-/emr/instance-controller/lib/info}
WAIT_TIMEOUT_S=${M9_WAIT_TIMEOUT_S:-3600}
POLL_INTERVAL_S=${M9_POLL_INTERVAL_S:-5}
STATE_DIR=$(dirname "$VENV")
TOKEN_FILE=${TOKEN_FILE:-$STATE_DIR/ray-auth-token}

# The supervised half re-reads everything from the environment (or, under
# systemd, from $STATE_DIR/ray.env, written from these).
export M9_ARTIFACTS_URI=$ARTIFACTS_URI M9_VENV=$VENV M9_RAY_PORT=$RAY_PORT \
  M9_RAY_CPU_FRACTION=$RAY_CPU_FRACTION M9_BOOTSTRAP_LOG=$LOG M9_EMR_INFO_DIR=$INFO_DIR \
  M9_RAY_HEAD_CPUS=$RAY_HEAD_CPUS M9_RAY_TEMP_DIR=$RAY_TEMP_DIR M9_RAY_TOKEN_FILE=$TOKEN_FILE \
  M9_LOG_URI=$LOG_URI
# Ray's token authentication, for every Ray process this script starts.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN_FILE

# --- helpers ----------------------------------------------------------------

log() { printf '%s m9-bootstrap[%s]: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$MODE" "$*"; }
die() { log "ERROR: $*"; exit 1; }

# mkdir -p, with sudo when the bootstrap user (hadoop on EMR) may not write there.
ensure_dir() {
  local dir=$1
  mkdir -p "$dir" 2>/dev/null && [[ -w $dir ]] && return 0
  command -v sudo >/dev/null || die "cannot create $dir and sudo is not available"
  sudo mkdir -p "$dir"
  sudo chown "$(id -u):$(id -g)" "$dir"
}

is_master() {
  local f=$INFO_DIR/instance.json
  [[ -r $f ]] || die "no $f: is this an EMR node? (set M9_EMR_INFO_DIR to simulate one)"
  grep -Eq '"isMaster"[[:space:]]*:[[:space:]]*true' "$f"
}

# Prints nodeProvisionCheckinRecord.status of localInstance from EMR's
# job-flow-state.txt (protobuf text format), e.g. SUCCESSFUL.
node_provision_status() {
  local f=$INFO_DIR/job-flow-state.txt
  [[ -r $f ]] || return 0
  awk '
    /^[[:space:]]*localInstance[[:space:]]*\{/ { in_local = 1; depth = 0 }
    in_local && /nodeProvisionCheckinRecord[[:space:]]*\{/ { in_record = 1 }
    in_record && /^[[:space:]]*status:/ { print $2; exit }
    in_local {
      depth += gsub(/\{/, "{"); depth -= gsub(/\}/, "}")
      if (depth <= 0) { in_local = 0; in_record = 0 }
    }
  ' "$f"
}

head_host() {
  if [[ -n ${M9_RAY_HEAD_ADDRESS:-} ]]; then
    echo "$M9_RAY_HEAD_ADDRESS"
    return
  fi
  local f=$INFO_DIR/extraInstanceData.json host
  [[ -r $f ]] || die "no $f to read masterHost from (or set M9_RAY_HEAD_ADDRESS)"
  host=$(grep -Eo '"masterHost"[[:space:]]*:[[:space:]]*"[^"]+"' "$f" | sed -E 's/.*"([^"]+)"$/\1/' | head -n1)
  [[ -n $host ]] || die "no masterHost in $f"
  echo "$host"
}

port_open() {
  # shellcheck disable=SC2016 # $0/$1 are expanded by the inner bash, on purpose
  timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

# Waits until "$@" succeeds; dies after WAIT_TIMEOUT_S.
wait_for() {
  local what=$1 deadline=$((SECONDS + WAIT_TIMEOUT_S))
  shift
  log "waiting for $what (up to ${WAIT_TIMEOUT_S}s)"
  until "$@"; do
    ((SECONDS < deadline)) || die "gave up waiting for $what after ${WAIT_TIMEOUT_S}s"
    sleep "$POLL_INTERVAL_S"
  done
  log "done waiting for $what"
}

provisioned() { [[ $(node_provision_status) == SUCCESSFUL ]]; }

# This node's name in Ray: the EC2 instance id, which the step's preflight
# compares with EMR's list of running instances.
node_id() {
  if [[ -n ${M9_NODE_ID:-} ]]; then
    echo "$M9_NODE_ID"
    return
  fi
  local id="" token
  if token=$(curl -sf -m 2 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' \
    http://169.254.169.254/latest/api/token 2>/dev/null); then
    id=$(curl -sf -m 2 -H "X-aws-ec2-metadata-token: $token" \
      http://169.254.169.254/latest/meta-data/instance-id 2>/dev/null || true)
  fi
  if [[ -z $id && -r $INFO_DIR/job-flow-state.txt ]]; then
    id=$(awk '/^[[:space:]]*localInstance[[:space:]]*\{/ { l = 1 } l && /instanceId:/ { gsub(/"/, "", $2); print $2; exit }' \
      "$INFO_DIR/job-flow-state.txt")
  fi
  echo "${id:-$(hostname)}"
}

cluster_id() {
  local f=$INFO_DIR/extraInstanceData.json id=""
  if [[ -r $f ]]; then
    id=$(grep -Eo '"jobFlowId"[[:space:]]*:[[:space:]]*"[^"]+"' "$f" | sed -E 's/.*"([^"]+)"$/\1/' | head -n1)
  fi
  echo "${id:-unknown-cluster}"
}

ray_num_cpus() {
  if [[ -n ${M9_RAY_NUM_CPUS:-} ]]; then
    echo "$M9_RAY_NUM_CPUS"
    return
  fi
  awk -v n="$(nproc)" -v f="$RAY_CPU_FRACTION" 'BEGIN { c = int(n * f); print (c < 1 ? 1 : c) }'
}

ray_object_store_bytes() {
  if [[ -n ${M9_RAY_OBJECT_STORE_BYTES:-} ]]; then
    echo "$M9_RAY_OBJECT_STORE_BYTES"
    return
  fi
  awk -v f="${M9_RAY_OBJECT_STORE_FRACTION:-0.15}" \
    '/^MemTotal:/ { printf "%d\n", $2 * 1024 * f; exit }' /proc/meminfo
}

ray_bin() {
  if [[ -n ${M9_RAY_BIN:-} ]]; then
    echo "$M9_RAY_BIN"
  elif [[ $SKIP_INSTALL == 1 ]]; then
    command -v ray || die "M9_SKIP_INSTALL=1 but no ray on PATH"
  else
    echo "$VENV/bin/ray"
  fi
}

# --- install (synchronous: a failure here fails the cluster) ------------------

fetch_artifacts() {
  local dest=$1
  [[ -n $ARTIFACTS_URI ]] || die "no artifacts location: pass --artifacts s3://BUCKET/bootstrap/ or set M9_ARTIFACTS_URI"
  log "fetching m9 distribution, constraints.txt and m9_preflight.py from $ARTIFACTS_URI"
  if [[ $ARTIFACTS_URI == s3://* ]]; then
    aws s3 cp --recursive --only-show-errors "${ARTIFACTS_URI%/}/" "$dest" \
      --exclude '*' --include 'constraints.txt' --include 'm9-*.whl' --include 'm9-*.tar.gz' \
      --include 'm9_preflight.py' --include '*.ipynb' --include 'wheelhouse/*'
  else
    [[ -d $ARTIFACTS_URI ]] || die "artifacts folder $ARTIFACTS_URI does not exist"
    find "$ARTIFACTS_URI" -maxdepth 1 -type f \( -name constraints.txt -o -name 'm9-*.whl' \
      -o -name 'm9-*.tar.gz' -o -name m9_preflight.py -o -name '*.ipynb' \) -exec cp {} "$dest"/ \;
    if [[ -d $ARTIFACTS_URI/wheelhouse ]]; then cp -r "$ARTIFACTS_URI/wheelhouse" "$dest/"; fi
  fi
}

install_m9() {
  local work dists
  work=$(mktemp -d)
  fetch_artifacts "$work"
  [[ -s $work/constraints.txt ]] || die "constraints.txt missing in $ARTIFACTS_URI"
  mapfile -t dists < <(find "$work" -maxdepth 1 -type f \( -name 'm9-*.whl' -o -name 'm9-*.tar.gz' \))
  ((${#dists[@]} == 1)) || die "expected exactly one m9 wheel or sdist in $ARTIFACTS_URI, found ${#dists[@]}"

  if ! command -v "$PYTHON" >/dev/null && command -v dnf >/dev/null; then
    log "$PYTHON not found; installing it with dnf"
    sudo dnf install -y -q "${PYTHON}" "${PYTHON}-pip"
  fi
  command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set M9_PYTHON)"

  ensure_dir "$STATE_DIR"
  if [[ $STATE_DIR == /mnt/* ]] && ! mountpoint -q /mnt 2>/dev/null; then
    log "warning: /mnt is not a mounted volume; the venv lands on the root volume"
  fi
  # pip unpacks wheels under TMPDIR; /tmp may be a small tmpfs.
  ensure_dir "$STATE_DIR/tmp"
  export TMPDIR=$STATE_DIR/tmp
  log "creating venv $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"

  local pip_args=()
  read -r -a pip_args <<<"${M9_PIP_ARGS:-}"
  if [[ -s $work/wheelhouse/requirements.txt ]]; then
    # Everything from the wheelhouse built with the stack, each file checked against its hash:
    # no index, no internet, and nothing but what was built. The master with --jupyter takes the
    # set that adds JupyterLab (same versions for everything else); the other nodes do without.
    local reqs=$work/wheelhouse/requirements.txt
    if [[ $JUPYTER == 1 ]] && is_master; then
      [[ -s $work/wheelhouse/requirements-master.txt ]] ||
        die "--jupyter: no requirements-master.txt in the wheelhouse (rebuild it with bootstrap/build_wheelhouse.sh)"
      reqs=$work/wheelhouse/requirements-master.txt
    fi
    log "installing from the hashed wheelhouse (${reqs##*/}: $(wc -l <"$reqs") wheels)"
    "$VENV/bin/python" -m pip install --no-cache-dir --disable-pip-version-check \
      --no-index --find-links "$work/wheelhouse" --require-hashes -r "$reqs"
    WHEELHOUSE_WEIGHTS=$work/wheelhouse/weights
  else
    # Plain m9, not m9[local]: EMR's own Spark provides pyspark and the JVM. The
    # constraints file is the single list of tested versions.
    log "no wheelhouse: installing ${dists[0]##*/} from the index with -c constraints.txt"
    "$VENV/bin/python" -m pip install --no-cache-dir --disable-pip-version-check \
      "${pip_args[@]}" -c "$work/constraints.txt" "${dists[0]}"
  fi

  if "$VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("pyspark") is None)'; then
    die "pyspark got installed into $VENV; on EMR only the cluster's own Spark may be used"
  fi
  "$VENV/bin/ray" --version >/dev/null || die "ray is not runnable from $VENV"
  if [[ ${M9_RAY_DASHBOARD:-1} == 1 ]] && is_master &&
    ! "$VENV/bin/python" -c 'import ray.dashboard.optional_deps' 2>/dev/null; then
    # Ray would refuse to start the head ("Cannot include dashboard with missing packages")
    # and the supervisor would restart it forever: fail here, where EMR shows it.
    die "Ray's dashboard needs ray[default], which $VENV lacks (rebuild the wheelhouse, or set M9_RAY_DASHBOARD=0)"
  fi
  if [[ -s $work/m9_preflight.py ]]; then
    # The step's preflight, run by the venv's interpreter.
    { echo "#!$VENV/bin/python"; cat "$work/m9_preflight.py"; } >"$VENV/bin/m9-preflight"
    chmod 755 "$VENV/bin/m9-preflight"
  else
    die "m9_preflight.py missing in $ARTIFACTS_URI"
  fi

  if [[ $JUPYTER == 1 ]] && is_master; then
    # Only from the wheelhouse: an index would hang on a node without a route to it.
    [[ -x $VENV/bin/jupyter ]] || log "warning: no JupyterLab in $VENV (it comes only from the wheelhouse); no notebook server"
    ensure_dir "$STATE_DIR/notebooks"
    find "$work" -maxdepth 1 -name '*.ipynb' -exec cp {} "$STATE_DIR/notebooks/" \;
  fi

  # Make EMR's pyspark importable from the venv (for `m9 run` as an EMR step).
  # A .pth line starting with "import" runs at interpreter start, so the glob
  # finds py4j even though Spark is installed after this bootstrap action.
  local site
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  printf 'import sys, glob; sys.path.extend(sorted(glob.glob("%s/python/lib/py4j-*-src.zip")) + ["%s/python"])\n' \
    "$SPARK_HOME_EMR" "$SPARK_HOME_EMR" >"$site/m9-emr-spark.pth"
  if [[ -n ${WHEELHOUSE_WEIGHTS:-} && -d $WHEELHOUSE_WEIGHTS ]]; then
    local cache=${M9_CACHE_DIR:-$HOME/.cache/m9}
    ensure_dir "$cache"
    cp "$WHEELHOUSE_WEIGHTS"/* "$cache/"
    log "weights copied from the wheelhouse into $cache"
  fi
  rm -rf "$work"
  log "m9 installed: $("$VENV/bin/python" -m pip show m9 2>/dev/null | awk '/^Version:/ { print $2 }')"
}

fetch_weights() {
  local cache=${M9_CACHE_DIR:-$HOME/.cache/m9}
  ensure_dir "$cache"
  if [[ -n ${M9_WEIGHTS_URI:-} ]]; then
    log "copying weights from $M9_WEIGHTS_URI to $cache"
    aws s3 cp --recursive --only-show-errors "$M9_WEIGHTS_URI" "$cache"
  else
    # With the wheelhouse's copy already in the cache, m9 finds it there and downloads nothing.
    log "fetching MobileNetV2 weights into $cache with m9 weights fetch"
    PATH="$VENV/bin:$PATH" "$VENV/bin/m9" weights fetch
  fi
}

# --- Ray's token (synchronous: no token, no cluster) ---------------------------

fetch_ray_token() {
  ensure_dir "$(dirname "$TOKEN_FILE")"
  if [[ -n $TOKEN_PARAMETER ]]; then
    log "fetching Ray's token from SSM parameter $TOKEN_PARAMETER into $TOKEN_FILE"
    local token
    token=$(aws ssm get-parameter --name "$TOKEN_PARAMETER" --with-decryption \
      --query Parameter.Value --output text) || die "cannot read SSM parameter $TOKEN_PARAMETER"
    (umask 077 && printf '%s' "$token" >"$TOKEN_FILE")
  fi
  [[ -s $TOKEN_FILE ]] || die "no Ray token: pass --ray-token-parameter NAME, or put it in $TOKEN_FILE"
  chmod 600 "$TOKEN_FILE"
}

# --- Ray (supervised) ------------------------------------------------------------

# Runs in the foreground until Ray dies (`ray start --block` exits when any of
# the node's Ray processes does); the supervisor then starts it again.
run_ray_node() {
  local ray args=() extra=() head
  ray=$(ray_bin)
  ensure_dir "$RAY_TEMP_DIR"
  args=(--object-store-memory "$(ray_object_store_bytes)" --disable-usage-stats
    --temp-dir "$RAY_TEMP_DIR" --node-name "$(node_id)" --block)
  [[ -n ${M9_RAY_NODE_IP:-} ]] && args+=(--node-ip-address "$M9_RAY_NODE_IP")
  read -r -a extra <<<"${M9_RAY_EXTRA_ARGS:-}"
  args+=("${extra[@]}")

  if is_master; then
    # EMR is still installing Hadoop/Spark; start the head once it is done.
    wait_for "EMR to finish provisioning this node" provisioned
    local dashboard=(--include-dashboard=false)
    if [[ ${M9_RAY_DASHBOARD:-1} == 1 ]]; then
      # Loopback only: reached through Session Manager port forwarding.
      dashboard=(--include-dashboard=true --dashboard-host 127.0.0.1 --dashboard-port "${M9_RAY_DASHBOARD_PORT:-8265}")
    fi
    log "starting Ray head on port $RAY_PORT (token auth): --num-cpus $RAY_HEAD_CPUS ${args[*]}"
    exec "$ray" start --head --port "$RAY_PORT" --num-cpus "$RAY_HEAD_CPUS" "${dashboard[@]}" "${args[@]}"
  else
    head=$(head_host)
    wait_for "the Ray head at $head:$RAY_PORT" port_open "$head" "$RAY_PORT"
    log "joining Ray at $head:$RAY_PORT (token auth): --num-cpus $(ray_num_cpus) ${args[*]}"
    exec "$ray" start --address "$head:$RAY_PORT" --num-cpus "$(ray_num_cpus)" "${args[@]}"
  fi
}

# The systemd-less supervisor: start the node, and start it again whenever it exits.
supervise() {
  local delay=${M9_RAY_RESTART_DELAY_S:-10} rc
  while :; do
    rc=0
    bash "$self" __ray-node || rc=$?
    log "Ray node exited (status $rc); restarting in ${delay}s"
    sleep "$delay"
  done
}

# Copies the bootstrap log and Ray's logs to LOG_URI/<cluster-id>/<node-id>/ every interval.
ship_logs() {
  local dest interval=${M9_LOG_SHIP_INTERVAL_S:-60}
  dest="${LOG_URI%/}/$(cluster_id)/$(node_id)"
  while :; do
    if [[ $LOG_URI == s3://* ]]; then
      aws s3 cp --only-show-errors "$LOG" "$dest/bootstrap.log" || true
      if [[ -d $RAY_TEMP_DIR/session_latest/logs ]]; then
        aws s3 sync --only-show-errors "$RAY_TEMP_DIR/session_latest/logs/" "$dest/ray/" || true
      fi
    else
      mkdir -p "$dest/ray"
      cp "$LOG" "$dest/bootstrap.log" 2>/dev/null || true
      if [[ -d $RAY_TEMP_DIR/session_latest/logs ]]; then
        cp -r "$RAY_TEMP_DIR/session_latest/logs/." "$dest/ray/" 2>/dev/null || true
      fi
    fi
    sleep "$interval"
  done
}

# Whether the cluster has work EMR cannot see: a live Ray job (a driver: the m9 step, a notebook's
# ray.init), counted as Ray's own usage report counts them, or a Jupyter kernel. Exit 0: busy.
ray_busy() {
  local python
  python=$(dirname "$(ray_bin)")/python
  pgrep -f ipykernel_launcher >/dev/null 2>&1 && return 0
  "$python" - "127.0.0.1:$RAY_PORT" <<'PY' 2>/dev/null
import sys

from ray._common.usage.usage_lib import get_total_num_running_jobs_to_report
from ray._raylet import GcsClient

sys.exit(0 if (get_total_num_running_jobs_to_report(GcsClient(address=sys.argv[1])) or 0) > 0 else 1)
PY
}

# Master: touches EMR's isbusy file every interval while ray_busy holds. EMR reads the file's
# modification time; a node with nothing running simply stops touching it.
mark_busy() {
  local file=${M9_BUSY_FILE:-/emr/metricscollector/isbusy} interval=${M9_BUSY_INTERVAL_S:-60}
  ensure_dir "$(dirname "$file")"
  while :; do
    if ray_busy; then
      touch "$file" 2>/dev/null || sudo touch "$file"
    fi
    sleep "$interval"
  done
}

# Every setting the supervised half needs, for systemd's EnvironmentFile.
write_env_file() {
  local f=$STATE_DIR/ray.env name
  : >"$f"
  for name in $(compgen -e | grep -E '^(M9_|RAY_AUTH_|PATH$)'); do
    printf '%s="%s"\n' "$name" "$(printf '%s' "${!name}" | sed 's/[\\"]/\\&/g')" >>"$f"
  done
}

have_systemd() {
  [[ ${M9_NO_SYSTEMD:-0} != 1 && -d /run/systemd/system ]] && command -v systemctl >/dev/null
}

start_supervised() {
  local copy=$STATE_DIR/bootstrap.sh
  ensure_dir "$STATE_DIR"
  # EMR deletes its copy of a bootstrap action; the supervisor needs its own.
  cp "$self" "$copy"
  chmod 755 "$copy"
  write_env_file
  if have_systemd; then
    local user
    user=$(id -un)
    log "starting m9-ray.service and m9-ray-logs.service under systemd (Restart=always)"
    sudo tee /etc/systemd/system/m9-ray.service >/dev/null <<UNIT
[Unit]
Description=m9: Ray node (head on the master, worker elsewhere)
After=network-online.target

[Service]
User=$user
EnvironmentFile=$STATE_DIR/ray.env
ExecStart=/bin/bash $copy __ray-node
Restart=always
RestartSec=${M9_RAY_RESTART_DELAY_S:-10}
KillMode=control-group
TimeoutStopSec=30

[Install]
WantedBy=multi-user.target
UNIT
    if is_master; then
      sudo tee /etc/systemd/system/m9-busy.service >/dev/null <<UNIT
[Unit]
Description=m9: tell EMR's idle check the cluster is busy while Ray or Jupyter has work
After=m9-ray.service

[Service]
User=$user
EnvironmentFile=$STATE_DIR/ray.env
ExecStart=/bin/bash $copy __mark-busy
Restart=always
RestartSec=30

[Install]
WantedBy=multi-user.target
UNIT
    fi
    sudo tee /etc/systemd/system/m9-ray-logs.service >/dev/null <<UNIT
[Unit]
Description=m9: copy the bootstrap and Ray logs to $LOG_URI

[Service]
User=$user
EnvironmentFile=$STATE_DIR/ray.env
ExecStart=/bin/bash $copy __ship-logs
Restart=always
RestartSec=30

[Install]
WantedBy=multi-user.target
UNIT
    if [[ $JUPYTER == 1 ]] && is_master && [[ -x $VENV/bin/jupyter ]]; then
      log "starting m9-jupyter.service on 127.0.0.1:8888 (reach it with infra/aws.sh notebook)"
      sudo tee /etc/systemd/system/m9-jupyter.service >/dev/null <<UNIT
[Unit]
Description=m9: JupyterLab on loopback (Session Manager port forwarding only)
After=m9-ray.service

[Service]
User=$user
EnvironmentFile=$STATE_DIR/ray.env
# As the EMR step runs m9: Spark on YARN, the cluster's Ray with its token.
Environment=M9_SPARK_MASTER=yarn PYSPARK_PYTHON=$VENV/bin/python
WorkingDirectory=$STATE_DIR/notebooks
# Jupyter's token is Ray's: whoever has one can run code as $user anyway. Read from
# the 0600 file into the environment, not onto the command line, which ps shows
# (\$\$ is systemd's escape for a literal \$).
ExecStart=/bin/bash -c 'JUPYTER_TOKEN=\$\$(cat $TOKEN_FILE) exec $VENV/bin/jupyter lab --ip=127.0.0.1 --port=8888 --no-browser --ServerApp.root_dir=$STATE_DIR/notebooks --MappingKernelManager.cull_idle_timeout=${M9_KERNEL_CULL_S:-3600} --MappingKernelManager.cull_interval=300'
Restart=always
RestartSec=10

[Install]
WantedBy=multi-user.target
UNIT
    fi
    sudo systemctl daemon-reload
    sudo systemctl enable --now --no-block m9-ray.service
    if [[ -f /etc/systemd/system/m9-busy.service ]]; then
      sudo systemctl enable --now --no-block m9-busy.service
    fi
    if [[ -f /etc/systemd/system/m9-jupyter.service ]]; then
      sudo systemctl enable --now --no-block m9-jupyter.service
    fi
    [[ -z $LOG_URI ]] || sudo systemctl enable --now --no-block m9-ray-logs.service
  else
    # Own session, stdio on the log file, so EMR (or a test) does not wait for it.
    log "no systemd here: Ray runs under a supervising loop (restarts it when it exits)"
    [[ $JUPYTER != 1 ]] || log "warning: no systemd, so no Jupyter service (run it by hand)"
    nohup setsid bash "$copy" __supervise >>"$LOG" 2>&1 </dev/null &
    log "supervisor pid $!"
    if [[ -n $LOG_URI ]]; then
      nohup setsid bash "$copy" __ship-logs >>"$LOG" 2>&1 </dev/null &
      log "log shipper pid $! (to $LOG_URI)"
    fi
    if is_master; then
      nohup setsid bash "$copy" __mark-busy >>"$LOG" 2>&1 </dev/null &
      log "busy marker pid $! (${M9_BUSY_FILE:-/emr/metricscollector/isbusy})"
    fi
  fi
}

# --- main -----------------------------------------------------------------------

ensure_dir "$(dirname "$LOG")"
self=$(readlink -f "${BASH_SOURCE[0]}")

case $MODE in
  ray-node) exec >>"$LOG" 2>&1; run_ray_node ;;
  supervise) supervise ;;
  ship-logs) ship_logs ;;
  mark-busy) mark_busy ;;
esac

# Everything goes to the log file and to EMR's own bootstrap stdout/stderr logs.
exec > >(tee -a "$LOG") 2>&1
set -o errtrace # the trap below also fires for a failure inside a function
trap 'log "FAILED at line $LINENO (exit $?); full log: $LOG"' ERR

if is_master; then role=master; else role=worker; fi
log "node role: $role (from $INFO_DIR/instance.json)"
if [[ $SKIP_INSTALL == 1 ]]; then
  log "M9_SKIP_INSTALL=1: not installing m9"
else
  install_m9
fi
if [[ $SKIP_WEIGHTS == 1 ]]; then
  log "weights: skipped"
else
  fetch_weights
fi
fetch_ray_token
start_supervised
log "bootstrap done; Ray starts under its supervisor"
