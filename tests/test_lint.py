"""mypy's type check of m9/ (`make lint` runs it too), with the settings in pyproject.toml."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_ERROR = re.compile(r"^(?P<path>[^:\s]+\.py):\d+: error: ", re.MULTILINE)
#: mypy's last line: "Success: no issues found in N source files" or "Found E errors in F files (checked N …)".
_CHECKED = re.compile(r"(?:Success: no issues found in|Found \d+ errors? in \d+ files? \(checked) (\d+) source files?")


def test_mypy_finds_no_errors_in_m9():
    # The cache (.mypy_cache/ in the repository) makes a second run take about a second; a first one ~15 s.
    done = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    output = done.stdout + done.stderr
    checked = _CHECKED.search(output)
    assert done.returncode in (0, 1) and checked and int(checked.group(1)) > 0, output  # 2: mypy itself failed
    assert _ERROR.findall(output) == [] and done.returncode == 0, output
