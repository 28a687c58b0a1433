"""One segmentation model behind a Polygraphy runner, whatever the backend.

``.onnx`` files run through ``OnnxrtRunner`` (CUDA provider when onnxruntime-gpu sees a GPU, else CPU);
``.engine``/``.plan``/``.trt`` files through ``TrtRunner``, imported only when such a file is loaded.
The model's contract (input name, layout, size, output kind) is read from the model itself.
"""

import logging
import platform
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from .classes import generated_palette
from .metadata import ModelMeta, load_meta
from .onnxrt import OrtOptions, OrtSessionLoader, cuda_runtime, numpy_onnxrt_runner

log = logging.getLogger("segment.runner")

ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
MODEL_SUFFIXES = ONNX_SUFFIXES + ENGINE_SUFFIXES
TENSORRT_HINT = ("TensorRT is not installed here. On an NVIDIA GPU host install it with "
                 "`pip install '.[tensorrt]'`, or run the GPU Docker image; ONNX models keep working "
                 "through ONNX Runtime meanwhile.")


class ModelError(ValueError):
    """The model file cannot be served; the message says why in plain words."""


class IncompatibleEngine(ModelError):
    """An engine built by another TensorRT version or for another GPU: it must be rebuilt here."""


class TensorRTUnavailable(ModelError):
    """A TensorRT engine was asked for where the ``tensorrt`` package is missing."""

    def __init__(self, detail: str = TENSORRT_HINT):
        super().__init__(detail)


def tensorrt_available() -> bool:
    """Whether the ``tensorrt`` Python package can be imported (it is never imported at start-up)."""
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def check_onnx_graph(path: Path) -> None:
    """Refuse ONNX graphs we know cannot run here, with the fix, before ONNX Runtime says it obscurely."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # protobuf raises several types
        raise ModelError(f"{path.name} is not a readable ONNX model ({exc.__class__.__name__})") from exc
    if any(node.op_type == "CustomArgMax" for node in graph.node):
        raise ModelError(
            f"{path.name} uses upstream's CustomArgMax op (exported in 'pred' mode), which needs upstream's "
            "TensorRT plugin. Re-export it with upstream's `tools/export_onnx.py --aux-mode eval`, or with "
            "`segment export` here.")


def gpu_info() -> dict:
    """Name and compute capability of GPU 0, from nvidia-smi (empty where there is none)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()[0]
        name, cc = (s.strip() for s in out.split(","))
        return {"gpu": name, "compute_capability": cc}
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return {}


def engine_mismatch(build: dict, trt_version: str, gpu: dict) -> str | None:
    """Why an engine built as ``build`` cannot run here (TensorRT version or GPU differ), or None."""
    problems = []
    built_trt = build.get("tensorrt_version")
    if built_trt and built_trt.split(".")[:2] != trt_version.split(".")[:2]:
        problems.append(f"built with TensorRT {built_trt}, this host has {trt_version}")
    built_cc, here_cc = build.get("compute_capability"), gpu.get("compute_capability")
    if built_cc and here_cc and built_cc != here_cc:
        problems.append(f"built for {build.get('gpu', 'a GPU')} (compute capability {built_cc}), this host has "
                        f"{gpu.get('gpu', 'a GPU')} ({here_cc})")
    return "; ".join(problems) or None


def cpu_name() -> str:
    """The CPU model, for reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_runner(path: Path, backend: str = "auto", ort: OrtOptions = OrtOptions()):
    """The Polygraphy runner for ``path`` (not yet activated) and a short backend name."""
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        if backend == "tensorrt":
            raise ModelError(f"{path.name} is an ONNX model but backend=tensorrt: compile it first "
                             "(`segment compile` or POST /engines)")
        check_onnx_graph(path)
        return numpy_onnxrt_runner()(OrtSessionLoader(path, ort), name=path.stem), "onnxruntime"
    if suffix in ENGINE_SUFFIXES:
        if backend == "onnxruntime":
            raise ModelError(f"{path.name} is a TensorRT engine but backend=onnxruntime")
        if not tensorrt_available():
            raise TensorRTUnavailable()
        import tensorrt as trt

        build = load_meta(path).extra.get("build", {})
        if why := engine_mismatch(build, trt.__version__, gpu_info()):
            raise IncompatibleEngine(f"{path.name} cannot run here: {why}. Rebuild it from its ONNX "
                                     f"({build.get('source', 'the source model')}) with `segment compile` or POST /engines.")
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        return TrtRunner(EngineFromBytes(BytesFromPath(str(path))), name=path.stem), "tensorrt"
    raise ModelError(f"{path.name}: unknown model type (expected one of {', '.join(MODEL_SUFFIXES)})")


@dataclass
class SegmentationModel:
    """An activated runner plus the contract read from it. ``infer`` is thread-safe."""

    name: str
    path: Path
    meta: ModelMeta
    runner: object
    backend: str
    device: str
    input_name: str
    input_dtype: np.dtype
    input_hw: tuple[int | None, int | None]  # None where the dimension is dynamic
    batch_dynamic: bool
    output_kind: str = "labels"  # "labels" ([N,H,W] ints) or "logits" ([N,C,H,W] floats)
    num_classes: int = 0
    palette: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.uint8))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # held during inference
    _ref_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # never held for long
    batcher: object | None = field(default=None, repr=False)
    _users: int = field(default=0, repr=False)
    _retired: bool = field(default=False, repr=False)

    def acquire(self) -> "SegmentationModel":
        """Mark one request as using this model; pair with :meth:`release`.

        Called on the event loop: it takes its own lock, never the one held during inference."""
        with self._ref_lock:
            self._users += 1
        return self

    def release(self) -> None:
        with self._ref_lock:
            self._users -= 1
            close = self._retired and self._users == 0
        if close:
            self.close()

    def retire(self) -> None:
        """No new requests will come: close now if idle, else when the last request releases it."""
        with self._ref_lock:
            self._retired = True
            close = self._users == 0
        if close:
            self.close()

    @property
    def dynamic_hw(self) -> bool:
        return None in self.input_hw

    @cached_property
    def palette_bgr(self) -> np.ndarray:
        """The palette in OpenCV's channel order, contiguous for fast lookups."""
        return np.ascontiguousarray(self.palette[:, ::-1])

    @property
    def uint8_input(self) -> bool:
        return self.input_dtype == np.uint8

    def input_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """A full input shape in this model's layout: NHWC for raw-pixel models, NCHW otherwise."""
        return (batch, height, width, 3) if self.uint8_input else (batch, 3, height, width)

    def enable_batching(self, max_batch: int, max_wait_ms: float, on_batch=None) -> bool:
        """Gather concurrent single images into batches (only for a model with a dynamic batch dimension)."""
        from .batching import Batcher

        if max_batch <= 1 or not self.batch_dynamic:
            return False
        on_cuda = self.backend == "onnxruntime" and self.device == "cuda"
        self.batcher = Batcher(self._infer_now, max_batch, max_wait_ms, on_batch, fixed_batch=on_cuda)
        if on_cuda and not self.dynamic_hw:  # the one batch shape's first run (cuDNN's search) now, not on a request
            self._infer_now(np.zeros(self.input_shape(max_batch, *self.input_hw), self.input_dtype))
        return True

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch (NCHW float32, or NHWC uint8 for raw-pixel models); labels [N,H,W] uint8/int32."""
        if self.batcher is not None and batch.shape[0] == 1:
            return self.batcher.submit(batch)
        return self._infer_now(batch)

    def _infer_now(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:  # runners are not thread-safe, and reuse their output buffers
            out = next(iter(self.runner.infer({self.input_name: batch}, check_inputs=False).values()))
            out = np.asarray(out)
            if self.output_kind == "logits":
                out = out.argmax(axis=1)
            else:
                out = out.reshape(out.shape[0], out.shape[-2], out.shape[-1]).copy()
        return out.astype(self.label_dtype, copy=False)

    @property
    def label_dtype(self) -> type:
        return np.uint8 if self.num_classes <= 256 else np.int32

    @cached_property
    def decodes_on_gpu(self) -> bool:
        """Whether JPEGs can go straight from nvImageCodec to this model: raw pixels in, labels out, fixed size,
        ONNX Runtime on CUDA, and a CUDA runtime library found to order the decoder's stream before the run."""
        from . import gpu_decode

        return (self.backend == "onnxruntime" and self.device == "cuda" and self.uint8_input
                and self.output_kind == "labels" and not self.dynamic_hw and gpu_decode.available()
                and cuda_runtime() is not None)

    def infer_on_gpu(self, image) -> np.ndarray:
        """Labels [1,H,W] for one RGB uint8 [H,W,3] image already in GPU memory (bound, not copied)."""
        sess = self.runner.sess
        binding = sess.io_binding()
        binding.bind_input(self.input_name, "cuda", 0, np.uint8, [1, *image.shape],
                           image.__cuda_array_interface__["data"][0])
        binding.bind_output(sess.get_outputs()[0].name, "cpu")
        with self._lock:
            # The decoder wrote the image on CUDA's default stream, ONNX Runtime reads on its own: wait for it.
            cuda_runtime().cudaStreamSynchronize(None)
            sess.run_with_iobinding(binding)
            out = binding.copy_outputs_to_cpu()[0]
        return out.reshape(1, *out.shape[-2:]).astype(self.label_dtype, copy=False)

    def describe(self) -> dict:
        """JSON-ready summary for /models/active and reports."""
        h, w = self.input_hw
        return {
            "name": self.name, "file": self.path.name, "backend": self.backend, "device": self.device,
            "input": {"name": self.input_name, "dtype": str(self.input_dtype),
                      "height": h, "width": w, "dynamic_hw": self.dynamic_hw, "dynamic_batch": self.batch_dynamic},
            "output_kind": self.output_kind, "num_classes": self.num_classes,
            "precision": self.meta.extra.get("precision", "fp32"),
            "batching": self.batcher.stats() if self.batcher is not None else None,
            "metadata": self.meta.model_dump(),
        }

    def close(self) -> None:
        """Deactivate the runner, releasing its session or engine."""
        if self.batcher is not None:
            self.batcher.close()
        with self._lock:
            if getattr(self.runner, "is_active", False):
                self.runner.deactivate()


def _dim(value) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


def load_model(path: Path, backend: str = "auto", ort: OrtOptions = OrtOptions()) -> SegmentationModel:
    """Load, activate and dry-run the model at ``path``; :class:`ModelError` says why it cannot serve."""
    meta = load_meta(path)
    runner, backend_name = make_runner(path, backend, ort)
    try:
        runner.activate()
    except ModelError:
        raise
    except Exception as exc:  # ONNX Runtime / TensorRT raise their own types for bad files
        raise ModelError(f"{path.name} could not be loaded by {backend_name}: {exc}") from exc
    try:
        model = _inspect(path, meta, runner, backend_name)
    except Exception:
        runner.deactivate()
        raise
    log.info("loaded %s (%s on %s): input %s %s, %s output, %d classes%s", model.name, backend_name,
             model.device, model.input_hw, model.input_dtype, model.output_kind, model.num_classes,
             "" if meta.trained else " [UNTRAINED WEIGHTS]")
    if meta.extra.get("precision") == "fp16" and model.device != "cuda":
        # Correct on CPU, but ONNX Runtime's CPU kernels gain nothing from fp16 (15% slower than fp32 measured).
        log.warning("%s is an fp16 build for ONNX Runtime's CUDA provider; on a CPU its fp32 source is faster",
                    model.name)
    return model


def _device_of(runner, backend: str) -> str:
    if backend == "onnxruntime":
        providers = runner.sess.get_providers()
        return "cuda" if providers and providers[0] == "CUDAExecutionProvider" else f"cpu ({cpu_name()})"
    return "cuda"


def _inspect(path: Path, meta: ModelMeta, runner, backend: str) -> SegmentationModel:
    from polygraphy.datatype import DataType

    inputs = runner.get_input_metadata(use_numpy_dtypes=False)
    if len(inputs) != 1:
        raise ModelError(f"{path.name} has {len(inputs)} inputs; a segmentation model takes one image tensor")
    input_name, tmeta = next(iter(inputs.items()))
    dtype = np.dtype(DataType.to_dtype(tmeta.dtype, "numpy"))
    shape = list(tmeta.shape)
    if len(shape) != 4:
        raise ModelError(f"{path.name}: input {input_name!r} has shape {shape}; expected 4-D [N,3,H,W]")
    uint8_nhwc = dtype == np.uint8 and shape[3] == 3
    if uint8_nhwc:
        hw = (_dim(shape[1]), _dim(shape[2]))
    elif dtype == np.float32 and shape[1] == 3:
        hw = (_dim(shape[2]), _dim(shape[3]))
    else:
        raise ModelError(f"{path.name}: input {input_name!r} is {dtype} {shape}; expected float32 [N,3,H,W] "
                         "or uint8 [N,H,W,3]")
    model = SegmentationModel(name=path.stem, path=path, meta=meta, runner=runner, backend=backend,
                              device=_device_of(runner, backend), input_name=input_name, input_dtype=dtype,
                              input_hw=hw, batch_dynamic=_dim(shape[0]) is None)
    # Dry run: proves the model executes, and tells logits from labels by what comes out.
    h = hw[0] or (meta.input_size[0] if meta.input_size else 64)
    w = hw[1] or (meta.input_size[1] if meta.input_size else 64)
    probe = np.zeros(model.input_shape(1, h, w), dtype)
    try:
        out = np.asarray(next(iter(runner.infer({input_name: probe}).values())))
    except Exception as exc:
        raise ModelError(f"{path.name} failed a dry run at {h}x{w}: {exc}") from exc
    if np.issubdtype(out.dtype, np.floating) and out.ndim == 4 and out.shape[1] > 1:
        model.output_kind, model.num_classes = "logits", int(out.shape[1])
    elif np.issubdtype(out.dtype, np.integer) and (out.ndim == 3 or (out.ndim == 4 and out.shape[1] == 1)):
        model.output_kind, model.num_classes = "labels", int(meta.num_classes)
    else:
        raise ModelError(f"{path.name}: output {out.dtype} {list(out.shape)} is neither logits [N,C,H,W] "
                         "nor labels [N,H,W]")
    if out.shape[-2:] != (h, w):
        raise ModelError(f"{path.name}: output is {out.shape[-2]}x{out.shape[-1]} for a {h}x{w} input; "
                         "expected full-resolution predictions")
    palette = list(meta.palette)
    if len(palette) < model.num_classes:  # more classes than named colours: extend, never index out of range
        palette += generated_palette(model.num_classes)[len(palette):]
    model.palette = np.ascontiguousarray(np.asarray(palette, np.uint8))
    return model
