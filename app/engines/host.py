"""What this host has: its CPU model and its GPU (name, compute capability), for reports and engine checks."""

import platform
import subprocess
from functools import cache
from pathlib import Path


@cache
def gpu_info() -> dict:
    """Name and compute capability of GPU 0, from nvidia-smi (empty where there is none)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()[0]
        name, cc = (s.strip() for s in out.split(","))
        return {"gpu": name, "compute_capability": cc}
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return {}


@cache
def cpu_name() -> str:
    """The CPU model, for reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
