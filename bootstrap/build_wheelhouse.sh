#!/usr/bin/env bash
# Build the wheelhouse the EMR nodes install from, once, on the deploying machine (any OS or CPU):
#   - every wheel m9 needs on a node, resolved by uv for the target (CPython 3.11, manylinux_2_34
#     x86_64: EMR 7 on Amazon Linux 2023), whatever machine this runs on: uv evaluates environment
#     markers for the target, where `pip download --platform` would evaluate them for this host;
#   - the node set: m9 and ray[default] (Ray's dashboard and its agents); the master set: that plus
#     JupyterLab for the master's notebook server, resolved under the node set's versions;
#   - requirements.txt (every node) and requirements-master.txt (the master), one
#     name==version --hash=sha256:... line per wheel, so a node installs with
#     `pip install --no-index --find-links DIR --require-hashes -r DIR/requirements.txt` and refuses
#     anything that differs from what was built here; every wheel's tags are checked against the target;
#   - weights/: the verified model files from the weights cache (`m9 weights fetch` writes the Keras .h5
#     and, with the ONNX runtime, the .onnx beside it, each with its checksum sidecar).
# terraform apply uploads the folder to s3://<bucket>/bootstrap/wheelhouse/; the nodes need no internet.
#
# Usage: bootstrap/build_wheelhouse.sh M9_WHEEL OUT_DIR [CONSTRAINTS]
#   M9_WHEEL     the m9 wheel to deploy (dist/m9-<version>-py3-none-any.whl)
#   OUT_DIR      the wheelhouse to (re)create (infra/wheelhouse)
#   CONSTRAINTS  the pins (default: constraints.txt next to bootstrap/); read generically, any package
#                pinned there is honoured
#
# Environment:
#   PYTHON                 runs pip and the checks; needs `packaging` (default: python3)
#   UV                     the uv command (default: "$PYTHON -m uv", i.e. uv installed beside PYTHON;
#                          `make install` puts the pinned uv in .venv)
#   M9_CACHE_DIR           the weights cache to copy (default: ~/.cache/m9)
#   M9_WHEELHOUSE_NODE     requirements beside m9 on every node (default: ray[default])
#   M9_WHEELHOUSE_EXTRA    extra requirements on the master, space-separated (default: jupyterlab)
#   M9_UV_ARGS             extra `uv pip compile` arguments, e.g. "--no-index --find-links DIR"
#   M9_PIP_DOWNLOAD_ARGS   extra `pip download` arguments, e.g. "--no-index --find-links DIR"
#   M9_SKIP_WEIGHTS=1      no weights/ folder
set -euo pipefail

die() { printf 'build_wheelhouse.sh: error: %s\n' "$*" >&2; exit 1; }

(($# >= 2 && $# <= 3)) || die "usage: build_wheelhouse.sh M9_WHEEL OUT_DIR [CONSTRAINTS]"
WHEEL=$1
OUT=$2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONSTRAINTS=${3:-$HERE/../constraints.txt}
PYTHON=${PYTHON:-python3}
CACHE=${M9_CACHE_DIR:-$HOME/.cache/m9}
NODE=${M9_WHEELHOUSE_NODE-ray[default]}
EXTRA=${M9_WHEELHOUSE_EXTRA-jupyterlab}
UV_VERSION=0.13.8 # the version m9's dev extra pins (constraints.txt)

[[ -f $WHEEL ]] || die "no m9 wheel at $WHEEL"
[[ -f $CONSTRAINTS ]] || die "no constraints file at $CONSTRAINTS"
uv=() node=() extra=() uv_args=() pip_args=()
read -r -a uv <<<"${UV:-$PYTHON -m uv}"
read -r -a node <<<"$NODE"
read -r -a extra <<<"$EXTRA"
read -r -a uv_args <<<"${M9_UV_ARGS:-}"
read -r -a pip_args <<<"${M9_PIP_DOWNLOAD_ARGS:-}"
"${uv[@]}" --version >/dev/null 2>&1 ||
  die "uv not found (${uv[*]}): it resolves the wheelhouse for the nodes' platform; pip install uv==$UV_VERSION (make install does)"
"$PYTHON" -c 'import packaging.tags' 2>/dev/null || die "$PYTHON has no 'packaging' (pip install packaging)"
HELPER=$HERE/wheelhouse.py

WHEEL=$(cd "$(dirname "$WHEEL")" && pwd)/$(basename "$WHEEL")
m9_version=$(basename "$WHEEL" | cut -d- -f2)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. Resolve for the target, not for this machine.
compile() {
  "${uv[@]}" pip compile --quiet --python-platform "$("$PYTHON" "$HELPER" uv-platform)" \
    --python-version 3.11 --only-binary :all: --no-header --no-annotate \
    ${uv_args[@]+"${uv_args[@]}"} "$@"
}
printf 'm9 @ file://%s\n' "$WHEEL" >"$work/node.in"
printf '%s\n' ${node[@]+"${node[@]}"} >>"$work/node.in"
compile -c "$CONSTRAINTS" -o "$work/node.txt" "$work/node.in" || die "uv could not resolve m9's node set for the target"
cp "$work/node.in" "$work/master.in"
printf '%s\n' ${extra[@]+"${extra[@]}"} >>"$work/master.in"
grep -v '^m9 @' "$work/node.txt" >"$work/node-pins.txt"
compile -c "$CONSTRAINTS" -c "$work/node-pins.txt" -o "$work/master.txt" "$work/master.in" ||
  die "uv could not resolve the master's set (${extra[*]:-nothing extra}) under the node set's versions"
grep -v '^m9 @' "$work/master.txt" >"$work/master-pins.txt"
echo "m9==$m9_version" | tee -a "$work/node-pins.txt" >>"$work/master-pins.txt"

# 2. Download exactly those files. --no-deps: pip resolves nothing (the pins carry no markers), it only
#    picks, for each pin, the file whose tags fit the target. Binary wheels only: a node must not compile.
rm -rf "$OUT"
mkdir -p "$OUT"
cp "$WHEEL" "$OUT/"
platforms=()
while read -r p; do platforms+=(--platform "$p"); done < <("$PYTHON" "$HELPER" platforms)
grep -v '^m9==' "$work/master-pins.txt" >"$work/download.txt"
"$PYTHON" -m pip download --disable-pip-version-check -q --no-deps --dest "$OUT" \
  --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 "${platforms[@]}" \
  ${pip_args[@]+"${pip_args[@]}"} -r "$work/download.txt"

# 3. Check every file against the target and write the hashed requirement files.
"$PYTHON" "$HELPER" write "$OUT" "$work/node-pins.txt" "$work/master-pins.txt"

if [[ ${M9_SKIP_WEIGHTS:-0} != 1 ]]; then
  mkdir -p "$OUT/weights"
  shopt -s nullglob
  files=("$CACHE"/*.h5 "$CACHE"/*.onnx "$CACHE"/*.json)
  ((${#files[@]} > 0)) || die "no weights in $CACHE: run \`m9 weights fetch\` first"
  cp "${files[@]}" "$OUT/weights/"
  echo "weights: ${files[*]##*/}"
fi
