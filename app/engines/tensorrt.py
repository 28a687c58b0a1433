"""The TensorRT backend: a serialized engine run by Polygraphy's ``TrtRunner``.

``tensorrt`` is imported only when an engine is loaded or built, never at start-up, and is absent on most hosts:
every entry point says so with :class:`~app.core.errors.TensorRTUnavailable` (503 over HTTP).
"""

import importlib.util
import re
from pathlib import Path

from ..core.errors import IncompatibleEngine, TensorRTUnavailable
from ..core.metadata import ModelMeta
from .host import gpu_info

SUFFIXES = (".engine", ".plan", ".trt")


def tensorrt_available() -> bool:
    """Whether the ``tensorrt`` Python package can be imported (it is never imported at start-up)."""
    return importlib.util.find_spec("tensorrt") is not None


def engine_mismatch(build: dict, trt_version: str, gpu: dict) -> str | None:
    """Why an engine built as ``build`` cannot run here (TensorRT version or GPU differ), or None."""
    problems = []
    built_trt = build.get("tensorrt_version")
    if built_trt and built_trt.split(".")[:2] != trt_version.split(".")[:2]:
        problems.append(f"built with TensorRT {built_trt}, this host has {trt_version}")
    built_cc, here_cc = build.get("compute_capability"), gpu.get("compute_capability")
    if built_cc and here_cc and built_cc != here_cc:
        problems.append(f"built for {build.get('gpu') or 'a GPU'} (compute capability {built_cc}), this host has "
                        f"{gpu.get('gpu', 'a GPU')} ({here_cc})")
    return "; ".join(problems) or None


def engine_device_bytes(engine, trt, plan_bytes: int) -> int:
    """GPU memory an engine takes with the one execution context Polygraphy makes: ``device_memory_size_v2`` (the
    context's, TensorRT 10) or ``device_memory_size`` (older), plus its weights (``EngineStat.TOTAL_WEIGHTS_SIZE``
    where this TensorRT has it; else ``plan_bytes``, the serialized engine's size, which the weights dominate)."""
    context = getattr(engine, "device_memory_size_v2", None)
    if context is None:
        context = engine.device_memory_size
    stat = getattr(trt, "EngineStat", None)
    if stat is not None and hasattr(engine, "get_engine_stat"):
        weights = engine.get_engine_stat(stat.TOTAL_WEIGHTS_SIZE)
    else:
        weights = plan_bytes
    return int(context) + int(weights)


def local_gpu() -> dict:
    """This node as engines are chosen for it: GPU name, compute capability and the installed TensorRT's version,
    read from its package metadata (``tensorrt`` itself is never imported for this)."""
    from importlib.metadata import PackageNotFoundError, version

    trt = None
    # The bindings come as `tensorrt`, or only as one of NVIDIA's per-CUDA or lean packages
    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11", "tensorrt_lean", "tensorrt_dispatch"):
        try:
            trt = version(dist)
            break
        except PackageNotFoundError:
            continue
    return {**gpu_info(), "tensorrt_version": trt}


def built_for(desc: dict) -> str:
    """``NVIDIA H100 (sm90, TensorRT 10.3)``: a GPU kind as build metadata or :func:`local_gpu` describe it."""
    cc = desc.get("compute_capability")
    trt = desc.get("tensorrt_version")
    return (f"{desc.get('gpu') or 'no GPU'} ({'sm' + cc.replace('.', '') if cc else 'no compute capability'}, "
            f"{'TensorRT ' + trt if trt else 'no TensorRT'})")


def choose_engine(engines: dict[str, dict], here: dict) -> str:
    """The file among ``engines`` (file name -> its build metadata) to run on ``here`` (:func:`local_gpu`): one built
    with this TensorRT major.minor for this compute capability, the same GPU model first.
    :class:`IncompatibleEngine` (409) naming what each was built for and what this node has when none fits."""
    if not here.get("tensorrt_version") or not here.get("compute_capability"):
        fits = []
    else:
        fits = [f for f, build in sorted(engines.items())
                if engine_mismatch(build, here["tensorrt_version"], here) is None
                and build.get("tensorrt_version") and build.get("compute_capability")]
    if not fits:
        kinds = "; ".join(f"{f} built for {built_for(b)}" for f, b in sorted(engines.items()))
        name = min(engines).split(".", 1)[0]
        add = f" and add it beside them as {name}.{engine_kind(here)}.engine" if here.get("compute_capability") else ""
        raise IncompatibleEngine(f"no engine of {name!r} runs here: {kinds}; this node has {built_for(here)}. "
                                 f"Build one on such a node from the ONNX source (`segment compile` or POST /engines)"
                                 f"{add}")
    return next((f for f in fits if engines[f].get("gpu") == here.get("gpu")), fits[0])


def engine_kind(build: dict) -> str:
    """A file-name tag for the GPU kind an engine was built for, e.g. ``nvidia-h100-80gb-hbm3.sm90.trt10-3``."""
    gpu = re.sub(r"[^a-z0-9]+", "-", (build.get("gpu") or "gpu").lower()).strip("-")
    cc = (build.get("compute_capability") or "").replace(".", "")
    trt = "-".join((build.get("tensorrt_version") or "").split(".")[:2])
    return f"{gpu}.sm{cc}.trt{trt}"


class TensorRT:
    """One engine file behind ``TrtRunner``; refuses engines built for another TensorRT version or GPU."""

    name = "tensorrt"
    device = "cuda"
    shape_change_is_costly = False  # an optimisation profile covers the range it was built for
    can_bind_gpu_input = False
    device_index = 0  # Polygraphy's runner uses the current CUDA device

    def __init__(self, path: Path, meta: ModelMeta):
        if not tensorrt_available():
            raise TensorRTUnavailable()
        import tensorrt as trt
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        build = meta.build.model_dump() if meta.build else {}
        if why := engine_mismatch(build, trt.__version__, gpu_info()):
            raise IncompatibleEngine(f"{path.name} cannot run here: {why}. Rebuild it from its ONNX "
                                     f"({build.get('source') or 'the source model'}) with `segment compile` or "
                                     "POST /engines.")
        self.runner = TrtRunner(EngineFromBytes(BytesFromPath(str(path))), name=path.stem)
        self.path = path

    def device_bytes(self) -> int | None:
        """The active engine's GPU memory: its execution context's (activations, scratch) plus its weights."""
        import tensorrt as trt

        engine = getattr(self.runner, "engine", None)
        try:
            return None if engine is None else engine_device_bytes(engine, trt, self.path.stat().st_size)
        except (AttributeError, TypeError, RuntimeError, OSError):  # a figure for the admin view never fails a load
            return None

    def run_bound(self, input_name: str, images: list, rows: int = 1):
        raise NotImplementedError("TensorRT engines take host arrays here")

    def release(self) -> None:
        """Nothing beyond the runner to release (``run_bound`` keeps no buffers)."""
