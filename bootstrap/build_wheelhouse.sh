#!/usr/bin/env bash
# Build the wheelhouse the EMR nodes install from, once, on the deploying machine:
#   - every wheel m9 needs on a node (CPython 3.11, manylinux x86_64), resolved under constraints.txt,
#     plus JupyterLab for the master's notebook server;
#   - requirements.txt listing each of them as name==version --hash=sha256:..., so a node installs with
#     `pip install --no-index --find-links DIR --require-hashes -r DIR/requirements.txt` and refuses
#     anything that differs from what was built here;
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
#   PYTHON                 runs pip (default: python3)
#   M9_CACHE_DIR           the weights cache to copy (default: ~/.cache/m9)
#   M9_WHEELHOUSE_EXTRA    extra requirements beside m9, space-separated (default: jupyterlab)
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
EXTRA=${M9_WHEELHOUSE_EXTRA-jupyterlab}

[[ -f $WHEEL ]] || die "no m9 wheel at $WHEEL"
[[ -f $CONSTRAINTS ]] || die "no constraints file at $CONSTRAINTS"

rm -rf "$OUT"
mkdir -p "$OUT"
cp "$WHEEL" "$OUT/"

extra=() pip_args=()
read -r -a extra <<<"$EXTRA"
read -r -a pip_args <<<"${M9_PIP_DOWNLOAD_ARGS:-}"
# EMR 7 nodes: Amazon Linux 2023 (glibc 2.34), x86_64, Python 3.11. Binary wheels only: a node
# must not compile anything.
"$PYTHON" -m pip download --disable-pip-version-check -q --dest "$OUT" \
  --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
  --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  ${pip_args[@]+"${pip_args[@]}"} -c "$CONSTRAINTS" "$WHEEL" ${extra[@]+"${extra[@]}"}

# One hashed line per wheel in the folder (the resolution pip just did).
"$PYTHON" - "$OUT" <<'PY'
import hashlib
import re
import sys
from pathlib import Path

out = Path(sys.argv[1])
lines = []
for wheel in sorted(out.glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    name = re.sub(r"[-_.]+", "-", name).lower()
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    lines.append(f"{name}=={version} --hash=sha256:{digest}")
others = [p.name for p in out.iterdir() if p.is_file() and p.suffix != ".whl"]
if others:
    sys.exit(f"not a wheel (a node would have to build it): {', '.join(sorted(others))}")
(out / "requirements.txt").write_text("\n".join(lines) + "\n")
print(f"{len(lines)} wheels, {sum(w.stat().st_size for w in out.glob('*.whl')) / 1e6:.0f} MB")
PY

if [[ ${M9_SKIP_WEIGHTS:-0} != 1 ]]; then
  mkdir -p "$OUT/weights"
  shopt -s nullglob
  files=("$CACHE"/*.h5 "$CACHE"/*.onnx "$CACHE"/*.json)
  ((${#files[@]} > 0)) || die "no weights in $CACHE: run \`m9 weights fetch\` first"
  cp "${files[@]}" "$OUT/weights/"
  echo "weights: ${files[*]##*/}"
fi
