"""What loading a model costs in memory: this process's host RSS, and its GPU memory as NVML reports it.

NVML comes from ``nvidia-ml-py`` (import name ``pynvml``, the ``gpu`` extra). Without it, without a driver or without
a GPU every reading is None, never an error: the figures are for the admin view, not for serving.
"""

import logging
import os
from functools import cache
from typing import Callable, Iterable

log = logging.getLogger("segment.engines")

# device index -> the compute processes on it (objects with ``pid`` and ``usedGpuMemory``), None when unknown
ProcessLister = Callable[[int], Iterable | None]


def rss_bytes() -> int:
    """This process's resident memory (Linux; 0 elsewhere)."""
    try:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@cache
def _nvml():
    """``pynvml`` once initialised, or None (not installed, no driver); initialised once per process."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # ImportError, or NVMLError for a missing library / driver
        log.debug("NVML is not available: %s", exc)
        return None
    return pynvml


def nvml_device(pynvml, device: int):
    """The NVML handle of CUDA device ``device``: CUDA numbers the GPUs listed in ``CUDA_VISIBLE_DEVICES`` (by index
    or UUID) from 0, NVML numbers every GPU of the machine."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if device < len(visible):
        chosen = visible[device]
        if not chosen.isdigit():
            return pynvml.nvmlDeviceGetHandleByUUID(chosen)
        device = int(chosen)
    return pynvml.nvmlDeviceGetHandleByIndex(device)


def nvml_processes(device: int) -> list | None:
    """The compute processes on CUDA device ``device`` with the memory each uses, from NVML; None when NVML or
    that GPU is not there."""
    pynvml = _nvml()
    if pynvml is None:
        return None
    try:
        return list(pynvml.nvmlDeviceGetComputeRunningProcesses(nvml_device(pynvml, device)))
    except Exception as exc:  # NVMLError: no such GPU, not supported, lost driver
        log.debug("NVML could not list the processes of GPU %d: %s", device, exc)
        return None


def process_gpu_bytes(pid: int, device: int = 0, processes: ProcessLister = nvml_processes) -> int | None:
    """GPU memory that process ``pid`` uses on CUDA device ``device`` (0 when it is not listed: no CUDA context
    there yet); None when ``processes`` cannot tell (no NVML, no such GPU, or a figure NVML does not have)."""
    listed = processes(device)
    if listed is None:
        return None
    used = [p.usedGpuMemory for p in listed if p.pid == pid]
    if any(u is None for u in used):  # pynvml's NVML_VALUE_NOT_AVAILABLE (e.g. under Windows' WDDM)
        return None
    return int(sum(used))


def gpu_growth(before: int | None, after: int | None) -> int | None:
    """What a load added to the process's GPU memory; None when either reading is missing, or when the process is
    not listed after a load onto the GPU (in a container without the host's process ids NVML lists other pids)."""
    if before is None or not after:
        return None
    return max(after - before, 0)


def load_device_bytes(model, pid: int, before: int | None, processes: ProcessLister = nvml_processes) -> int | None:
    """The GPU memory ``model`` (a just-loaded :class:`~app.engines.model.SegmentationModel`) takes: what its backend
    knows it holds (a TensorRT engine), else what process ``pid``'s GPU memory grew by since ``before`` (ONNX
    Runtime's CUDA provider); None on the CPU or when it cannot be read."""
    if model.device != "cuda":
        return None
    held = model.runtime.device_bytes()
    if held is not None:
        return held
    return gpu_growth(before, process_gpu_bytes(pid, model.runtime.device_index, processes))
