#!/usr/bin/env bash
# EMR bootstrap action for m9: install the pinned m9 into a Python 3.11 venv,
# fetch the MobileNetV2 weights, then start Ray in the background.
#
# Bootstrap actions run on every node *before* EMR installs Hadoop and Spark,
# and the cluster waits for them, so the synchronous part (install) fails loudly
# and returns; the Ray part runs in the background:
#   master: waits until EMR reports this node provisioned, then `ray start --head`
#   others: wait until the head's port answers, then `ray start --address`
#
# Usage (arguments override the environment, which overrides the defaults):
#   bootstrap.sh --artifacts s3://BUCKET/bootstrap/ [--venv DIR] [--cache-dir DIR]
#                [--ray-port N] [--ray-cpu-fraction F]
#
# Environment (everything needed to simulate an EMR node in a test):
#   M9_ARTIFACTS_URI       s3:// URI or local folder holding m9-*.whl|tar.gz and constraints.txt
#   M9_VENV                venv to create                        (/opt/m9/venv)
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
#   M9_RAY_HEAD_ADDRESS    head host for non-master nodes (default: masterHost in extraInstanceData.json)
#   M9_RAY_PORT            head (GCS) port                       (6379)
#   M9_RAY_NODE_IP         --node-ip-address of this node        (Ray's choice)
#   M9_RAY_TEMP_DIR        --temp-dir                            (Ray's default, /tmp/ray)
#   M9_RAY_NUM_CPUS        CPUs offered to Ray; default floor(nproc * M9_RAY_CPU_FRACTION), at least 1
#   M9_RAY_CPU_FRACTION    share of the cores for Ray; the rest stays with YARN/Spark (0.5)
#   M9_RAY_OBJECT_STORE_BYTES  object store size; default M9_RAY_OBJECT_STORE_FRACTION (0.15) of RAM,
#                          well below Ray's 30% default because YARN containers share the memory
#   M9_RAY_EXTRA_ARGS      extra `ray start` arguments (split on spaces)
#   RAY_AUTH_MODE          Ray's own setting; disabled unless set (see start_ray_node)
#   M9_WAIT_TIMEOUT_S      how long the background part waits     (3600)
#   M9_POLL_INTERVAL_S     how often it looks                    (5)
set -euo pipefail

# --- settings ---------------------------------------------------------------

ARTIFACTS_URI=${M9_ARTIFACTS_URI:-}
VENV=${M9_VENV:-/opt/m9/venv}
RAY_PORT=${M9_RAY_PORT:-6379}
RAY_CPU_FRACTION=${M9_RAY_CPU_FRACTION:-0.5}

MODE="install"
while (($# > 0)); do
  case $1 in
    --artifacts) ARTIFACTS_URI=$2; shift 2 ;;
    --venv) VENV=$2; shift 2 ;;
    --cache-dir) export M9_CACHE_DIR=$2; shift 2 ;;
    --ray-port) RAY_PORT=$2; shift 2 ;;
    --ray-cpu-fraction) RAY_CPU_FRACTION=$2; shift 2 ;;
    __ray-node) MODE="ray-node"; shift ;; # internal: the backgrounded second half
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

# The background half re-reads everything from the environment.
export M9_ARTIFACTS_URI=$ARTIFACTS_URI M9_VENV=$VENV M9_RAY_PORT=$RAY_PORT \
  M9_RAY_CPU_FRACTION=$RAY_CPU_FRACTION M9_BOOTSTRAP_LOG=$LOG M9_EMR_INFO_DIR=$INFO_DIR

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
  log "fetching m9 distribution and constraints.txt from $ARTIFACTS_URI"
  if [[ $ARTIFACTS_URI == s3://* ]]; then
    aws s3 cp --recursive --only-show-errors "${ARTIFACTS_URI%/}/" "$dest" \
      --exclude '*' --include 'constraints.txt' --include 'm9-*.whl' --include 'm9-*.tar.gz'
  else
    [[ -d $ARTIFACTS_URI ]] || die "artifacts folder $ARTIFACTS_URI does not exist"
    find "$ARTIFACTS_URI" -maxdepth 1 -type f \
      \( -name constraints.txt -o -name 'm9-*.whl' -o -name 'm9-*.tar.gz' \) -exec cp {} "$dest"/ \;
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

  ensure_dir "$(dirname "$VENV")"
  log "creating venv $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"

  local pip_args=()
  read -r -a pip_args <<<"${M9_PIP_ARGS:-}"
  # Plain m9, not m9[local]: EMR's own Spark provides pyspark and the JVM. The
  # constraints file is the single list of tested versions.
  log "installing ${dists[0]##*/} with -c constraints.txt"
  "$VENV/bin/python" -m pip install --no-cache-dir --disable-pip-version-check \
    "${pip_args[@]}" -c "$work/constraints.txt" "${dists[0]}"

  if "$VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("pyspark") is None)'; then
    die "pyspark got installed into $VENV; on EMR only the cluster's own Spark may be used"
  fi
  "$VENV/bin/ray" --version >/dev/null || die "ray is not runnable from $VENV"

  # Make EMR's pyspark importable from the venv (for `m9 run` as an EMR step).
  # A .pth line starting with "import" runs at interpreter start, so the glob
  # finds py4j even though Spark is installed after this bootstrap action.
  local site
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  printf 'import sys, glob; sys.path.extend(sorted(glob.glob("%s/python/lib/py4j-*-src.zip")) + ["%s/python"])\n' \
    "$SPARK_HOME_EMR" "$SPARK_HOME_EMR" >"$site/m9-emr-spark.pth"
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
    log "fetching MobileNetV2 weights into $cache with m9 weights fetch"
    PATH="$VENV/bin:$PATH" "$VENV/bin/m9" weights fetch
  fi
}

# --- Ray (background) ---------------------------------------------------------

start_ray_node() {
  local ray args=() extra=() head
  # Recent Ray turns token auth on for `ray start --head`, with a token only the
  # head's ~/.ray has, so the other nodes (and m9's drivers) could not join. The
  # GCS is reachable only inside the cluster's EMR-managed security groups; to
  # use tokens anyway, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN on every node.
  export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
  ray=$(ray_bin)
  args=(--num-cpus "$(ray_num_cpus)" --object-store-memory "$(ray_object_store_bytes)" --disable-usage-stats)
  [[ -n ${M9_RAY_NODE_IP:-} ]] && args+=(--node-ip-address "$M9_RAY_NODE_IP")
  [[ -n ${M9_RAY_TEMP_DIR:-} ]] && args+=(--temp-dir "$M9_RAY_TEMP_DIR")
  read -r -a extra <<<"${M9_RAY_EXTRA_ARGS:-}"
  args+=("${extra[@]}")

  if is_master; then
    # EMR is still installing Hadoop/Spark; start the head once it is done.
    wait_for "EMR to finish provisioning this node" provisioned
    log "starting Ray head on port $RAY_PORT: ${args[*]}"
    "$ray" start --head --port "$RAY_PORT" --include-dashboard=false "${args[@]}"
  else
    head=$(head_host)
    wait_for "the Ray head at $head:$RAY_PORT" port_open "$head" "$RAY_PORT"
    local attempt
    for attempt in 1 2 3; do
      log "joining Ray at $head:$RAY_PORT (attempt $attempt): ${args[*]}"
      "$ray" start --address "$head:$RAY_PORT" "${args[@]}" && break
      ((attempt < 3)) || die "could not join the Ray head at $head:$RAY_PORT"
      sleep "$POLL_INTERVAL_S"
    done
  fi
  log "Ray node is up"
}

# --- main -----------------------------------------------------------------------

ensure_dir "$(dirname "$LOG")"

if [[ $MODE == ray-node ]]; then
  exec >>"$LOG" 2>&1
  start_ray_node
  exit 0
fi

# Everything goes to the log file and to EMR's own bootstrap stdout/stderr logs.
exec > >(tee -a "$LOG") 2>&1
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

# Detach the Ray half: own session, stdio on the log file, so EMR (or a test)
# does not wait for it.
self=$(readlink -f "${BASH_SOURCE[0]}")
nohup setsid bash "$self" __ray-node >>"$LOG" 2>&1 </dev/null &
log "Ray start continues in the background (pid $!); bootstrap done"
