"""Machine facts: CPU model, cores, caches, memory, load and library versions, recorded with every bench."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine_facts() -> dict:
    """CPU model, cores, caches, memory, load and library versions of this machine."""
    import importlib.metadata as md

    import psutil

    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    caches = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
            caches[f"L{level}{'' if kind == 'Unified' else kind[0].lower()}"] = (index / "size").read_text().strip()
        except OSError:
            continue
    versions: dict[str, str | None] = {}
    for dist in (
        "tensorflow",
        "keras",
        "onnxruntime",
        "onnx",
        "tf2onnx",
        "ray",
        "pyspark",
        "pyarrow",
        "pandas",
        "numpy",
        "pillow",
        "psutil",
    ):
        for name in (dist, f"{dist}-cpu"):  # TensorFlow may be installed as tensorflow-cpu
            try:
                versions[dist] = md.version(name)
                break
            except md.PackageNotFoundError:
                versions[dist] = None
    versions["python"] = platform.python_version()
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "caches": caches,
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "platform": platform.platform(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "versions": versions,
    }
