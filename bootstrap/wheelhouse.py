"""The EMR wheelhouse's target, and the hashed requirement files a node installs from.

Used by bootstrap/build_wheelhouse.sh on the deploying machine (standard library and `packaging`):

    python wheelhouse.py platforms
        the --platform values pip download needs for the target, one a line
    python wheelhouse.py uv-platform
        uv's --python-platform for the target
    python wheelhouse.py write DIR NODE_PINS MASTER_PINS
        checks that every file in DIR is a wheel whose tags fit the target, then writes
        DIR/requirements.txt (NODE_PINS: every node) and DIR/requirements-master.txt (MASTER_PINS:
        the master, which also runs JupyterLab), one `name==version --hash=sha256:…` line per wheel

The target is what EMR 7 runs: CPython 3.11 on Amazon Linux 2023 (glibc 2.34), x86_64.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

#: Amazon Linux 2023's glibc: a manylinux_2_X wheel with X above this does not load there.
TARGET_GLIBC = (2, 34)
TARGET_PYTHON = (3, 11)
#: uv's name for the same platform (`uv pip compile --python-platform`).
UV_PLATFORM = f"x86_64-manylinux_{TARGET_GLIBC[0]}_{TARGET_GLIBC[1]}"


def target_platforms() -> list[str]:
    """Platform tags the target accepts, most specific first (PEP 600 and the legacy aliases)."""
    minors = range(TARGET_GLIBC[1], 4, -1)
    legacy = ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    return [f"manylinux_2_{m}_x86_64" for m in minors] + legacy


def target_tags() -> frozenset[Tag]:
    """Every wheel tag a CPython 3.11 x86_64 manylinux_2_34 interpreter accepts."""
    platforms = target_platforms()
    tags = [*cpython_tags(TARGET_PYTHON, abis=["cp311"], platforms=platforms)]
    tags += compatible_tags(TARGET_PYTHON, interpreter="cp311", platforms=platforms)
    return frozenset(tags)


def misfits(folder: Path) -> list[str]:
    """Names of the files in folder that are not wheels a target node can install."""
    accepted = target_tags()
    bad = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.suffix != ".whl":
            if path.name not in ("requirements.txt", "requirements-master.txt"):
                bad.append(f"{path.name} (not a wheel: a node would have to build it)")
            continue
        _, _, _, tags = parse_wheel_filename(path.name)
        if not tags & accepted:
            bad.append(f"{path.name} (tags {', '.join(sorted(map(str, tags)))})")
    return bad


def _pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line (comments, options and direct references skipped)."""
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;]+)", line.strip())
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def write(folder: Path, node_pins: Path, master_pins: Path) -> str:
    """Writes the two hashed requirement files; returns a one-line summary. Raises SystemExit on a misfit."""
    bad = misfits(folder)
    if bad:
        raise SystemExit("wheels that do not fit CPython 3.11 manylinux_2_34 x86_64:\n  " + "\n  ".join(bad))
    wheels = {}
    for path in sorted(folder.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        wheels[canonicalize_name(name)] = (str(version), path)
    summary = []
    for pins_file, out_name in ((node_pins, "requirements.txt"), (master_pins, "requirements-master.txt")):
        pins = _pins(pins_file)
        lines = []
        for name, version in sorted(pins.items()):
            if name not in wheels or wheels[name][0] != version:
                raise SystemExit(f"{name}=={version} was resolved but no such wheel was downloaded")
            digest = hashlib.sha256(wheels[name][1].read_bytes()).hexdigest()
            lines.append(f"{name}=={version} --hash=sha256:{digest}")
        (folder / out_name).write_text("\n".join(lines) + "\n")
        size = sum(wheels[n][1].stat().st_size for n in pins)
        summary.append(f"{out_name}: {len(lines)} wheels, {size / 1e6:.0f} MB")
    return "; ".join(summary)


def main(argv: list[str]) -> int:
    if argv[:1] == ["platforms"]:
        print("\n".join(target_platforms()))
        return 0
    if argv[:1] == ["uv-platform"]:
        print(UV_PLATFORM)
        return 0
    if argv[:1] == ["write"] and len(argv) == 4:
        print(write(Path(argv[1]), Path(argv[2]), Path(argv[3])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
