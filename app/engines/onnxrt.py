"""The ONNX Runtime backend: sessions for Polygraphy's ``OnnxrtRunner`` (providers, CPU threads, CUDA provider
options and waits) and the one place that knows what ONNX Runtime on CUDA costs and allows.

A Polygraphy loader (:class:`OrtSessionLoader`) builds the session; :class:`NumpyOnnxrtRunner` runs it.
"""

import ctypes
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseLoader
from polygraphy.backend.onnxrt import OnnxrtRunner

from .host import cpu_name

SUFFIXES = (".onnx",)
log = logging.getLogger("segment.onnxrt")


@dataclass(frozen=True)
class OrtOptions:
    """How ONNX Runtime sessions are made: providers, CPU threads, CUDA provider options, CUDA waits."""

    providers: str = "auto"  # auto (CUDA when onnxruntime-gpu sees a GPU, else CPU) or a comma list
    threads: int = 0  # intra-op threads, 0: one per core
    cuda_options: dict = field(default_factory=dict)  # CUDA provider options, e.g. {"prefer_nhwc": 1}
    cuda_blocking_sync: bool = False  # waits for the GPU sleep instead of spinning a CPU core
    spin: bool = True  # idle intra-op threads spin (lowest latency for one model; off when several share the cores)

    @property
    def cuda_device(self) -> int:
        """The CUDA device the CUDA provider uses (its ``device_id`` option, 0 by default)."""
        return int(self.cuda_options.get("device_id", 0))

    @classmethod
    def from_settings(cls, settings) -> "OrtOptions":
        return cls(settings.ort_providers, settings.ort_threads, dict(settings.ort_cuda_options),
                   settings.cuda_blocking_sync)


@cache
def cuda_runtime():
    """The CUDA runtime library that onnxruntime-gpu loaded (ctypes), or None: for the two calls ONNX Runtime
    has no option for."""
    for name in ("libcudart.so.13", "libcudart.so.12", "cudart64_13.dll", "cudart64_12.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def cuda_blocking_sync() -> str | None:
    """Make this process's waits for the GPU sleep rather than spin (``cudaDeviceScheduleBlockingSync``, set
    before its first session); None when set, else why not."""
    runtime = cuda_runtime()
    if runtime is None:
        return "no CUDA runtime library (libcudart) was found"
    status = runtime.cudaSetDeviceFlags(0x04)
    return None if status == 0 else f"cudaSetDeviceFlags failed with CUDA error {status}"


WAIT_MODES = {0: "auto", 1: "spin", 2: "yield", 4: "blocking sync"}  # cudaDeviceSchedule* (the flags' low bits)


def cuda_wait_mode() -> str | None:
    """How this process's waits for the GPU behave (the CUDA device flags now in effect), or None without the
    CUDA runtime library."""
    runtime = cuda_runtime()
    if runtime is None:
        return None
    flags = ctypes.c_uint(0)
    status = runtime.cudaGetDeviceFlags(ctypes.byref(flags))
    return WAIT_MODES.get(flags.value & 0x07, hex(flags.value)) if status == 0 else f"unknown (CUDA error {status})"


class OrtSessionLoader(BaseLoader):
    """Polygraphy loader: builds an ONNX Runtime session with our options when called."""

    def __init__(self, path: Path, options: OrtOptions = OrtOptions()):
        self.path, self.options = path, options

    def resolved_providers(self) -> list[str]:
        import onnxruntime as ort

        available = ort.get_available_providers()
        if self.options.providers == "auto":
            wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            wanted = [p.strip() for p in self.options.providers.split(",") if p.strip()]
        chosen = []
        for want in wanted:
            match = next((a for a in available if want.lower() in a.lower()), None)
            if match and match not in chosen:
                chosen.append(match)
        return chosen or ["CPUExecutionProvider"]

    def call_impl(self):
        import onnxruntime as ort

        providers = self.resolved_providers()
        refused = None
        if "CUDAExecutionProvider" in providers:
            if hasattr(ort, "preload_dlls"):
                # onnxruntime-gpu finds CUDA and cuDNN from the nvidia-* pip packages only once they are loaded;
                # without this the CUDA provider silently falls back to CPU (or needs `import torch` first).
                ort.preload_dlls()
            refused = self.options.cuda_blocking_sync and cuda_blocking_sync()
            if refused:  # said, since spinning waits cost a CPU core each (docs/gpu.md)
                log.warning("SEGMENT_CUDA_BLOCKING_SYNC is on but not in effect in this process (%s): its waits for "
                            "the GPU spin a CPU core", refused)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.options.threads:
            opts.intra_op_num_threads = self.options.threads
        if not self.options.spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3

        def session(cuda_options: dict):
            return ort.InferenceSession(str(self.path), sess_options=opts, providers=[
                (p, {k: str(v) for k, v in cuda_options.items()}) if p == "CUDAExecutionProvider" else p
                for p in providers])

        sess = session(self.options.cuda_options)
        if self.options.cuda_blocking_sync and "CUDAExecutionProvider" in providers and not refused:
            mode = cuda_wait_mode()  # checked once the session holds its context: something may have made it first
            if mode != "blocking sync":
                log.warning("SEGMENT_CUDA_BLOCKING_SYNC is on but this process's waits for the GPU are '%s'", mode)
        if self.options.cuda_options and "CUDAExecutionProvider" in providers:
            _trial_run(sess)
            if "CUDAExecutionProvider" not in sess.get_providers():
                # ONNX Runtime moves the session to the CPU when the CUDA provider fails with these options, at
                # creation or at the first run (e.g. no cuDNN engine for a fused or NHWC convolution, seen on an
                # H100: 100x slower, still reported as CUDA until then): the GPU with its defaults beats that.
                log.warning("%s: the CUDA provider failed with options %s; using its defaults", self.path.name,
                            self.options.cuda_options)
                sess = session({})
        return sess


def _trial_run(sess) -> None:
    """Run a single-input session once on zeros (dynamic dims: batch 1, 64 otherwise), so that a provider failure
    that ONNX Runtime finds only when running happens now; other errors are left to the model's dry run."""
    inputs = sess.get_inputs()
    dtypes = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32, "tensor(float16)": np.float16}
    if len(inputs) != 1 or inputs[0].type not in dtypes:
        return
    shape = [d if isinstance(d, int) else (1 if i == 0 else 64) for i, d in enumerate(inputs[0].shape)]
    try:
        sess.run(None, {inputs[0].name: np.zeros(shape, dtypes[inputs[0].type])})
    except Exception as exc:  # not a provider failure (ONNX Runtime retries those on the CPU itself)
        log.debug("%s", exc)


class NumpyOnnxrtRunner(OnnxrtRunner):
    """Polygraphy's ``OnnxrtRunner`` for NumPy inputs only.

    The stock ``infer_impl`` asks of every input whether it is a torch tensor, which imports torch whenever it is
    installed (1-2 s and hundreds of MB); the service only ever feeds NumPy arrays."""

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        outputs = self.sess.run(None, feed_dict)
        self.inference_time = time.perf_counter() - start
        return OrderedDict(zip((o.name for o in self.sess.get_outputs()), outputs))


class OnnxRuntime:
    """One ``.onnx`` file behind :class:`NumpyOnnxrtRunner`: CUDA provider when onnxruntime-gpu sees a GPU, else CPU."""

    name = "onnxruntime"

    def __init__(self, path: Path, options: OrtOptions = OrtOptions()):
        self.runner = NumpyOnnxrtRunner(OrtSessionLoader(path, options), name=path.stem)
        self.device_index = options.cuda_device
        self._bound: tuple = (None, None, None)  # (input, rows, height, width), the GPU batch buffer, its binding

    def device_bytes(self) -> None:
        """ONNX Runtime does not say what its CUDA provider allocated: the process's GPU memory is read around the
        load instead (``memory.load_device_bytes``)."""
        return None

    @property
    def device(self) -> str:
        """``cuda``, or ``cpu (<model>)``; known once the runner is active."""
        providers = self.runner.sess.get_providers()
        return "cuda" if providers and providers[0] == "CUDAExecutionProvider" else f"cpu ({cpu_name()})"

    @property
    def shape_change_is_costly(self) -> bool:
        # The CUDA provider re-plans cuDNN whenever the input shape changes (seconds; docs/performance.md).
        return self.device == "cuda"

    @property
    def can_bind_gpu_input(self) -> bool:
        """Whether an image already in GPU memory can be bound as the input (needs the CUDA runtime library to
        order the decoder's stream before the run)."""
        return self.device == "cuda" and cuda_runtime() is not None

    def run_bound(self, input_name: str, images: list, rows: int = 1) -> np.ndarray:
        """The first output for RGB uint8 [H,W,3] images of one size in GPU memory (``__cuda_array_interface__``),
        run as one batch of ``rows`` (at least ``len(images)``) without a host copy: each is copied on the GPU into
        a batch buffer bound to the session once (rows past the images hold earlier ones; their outputs are
        dropped). The caller holds the model's lock.

        Every wait on the GPU here is in a call that releases the GIL. Binding the input anew for each call did not:
        ONNX Runtime's ``bind_input`` holds the GIL while it readies the input on the device, and on the H200 with
        16 processes sharing the GPU it held it for up to half of a process's time, stalling that process's other
        requests (decode, encode, the event loop; docs/ray.md)."""
        if len(images) > rows:
            raise ValueError(f"{len(images)} images for a batch of {rows}")
        cuda = cuda_runtime()
        height, width, _ = images[0].shape
        batch, binding = self._binding(input_name, rows, height, width)
        row_bytes, size = width * 3, height * width * 3
        for i, image in enumerate(images):
            face = image.__cuda_array_interface__
            pitch = face["strides"][0] if face.get("strides") else row_bytes  # rows may be padded
            # cudaMemcpy2D on the default stream, where the decoder wrote (cudaMemcpyDeviceToDevice = 3)
            status = cuda.cudaMemcpy2D(ctypes.c_void_p(batch.data_ptr() + i * size), ctypes.c_size_t(row_bytes),
                                       ctypes.c_void_p(face["data"][0]), ctypes.c_size_t(pitch),
                                       ctypes.c_size_t(row_bytes), ctypes.c_size_t(height), 3)
            if status != 0:
                raise RuntimeError(f"cudaMemcpy2D into the batch failed (CUDA error {status})")
        # The decoder and the copies ran on CUDA's default stream, ONNX Runtime reads on its own: wait for them.
        cuda.cudaStreamSynchronize(None)
        self.runner.sess.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0][:len(images)]

    def release(self) -> None:
        """Drop the GPU batch buffer and its binding: the binding holds the session, which would outlive
        ``close`` (and its GPU memory with it) until a garbage collection that may never come."""
        self._bound = (None, None, None)

    def _binding(self, input_name: str, rows: int, height: int, width: int) -> tuple:
        """The GPU buffer that batches of ``rows`` images are copied into, and the session's binding of it as the
        input (the output to the host), kept for the next batch (one size at a time)."""
        import onnxruntime as ort

        key = (input_name, rows, height, width)
        if self._bound[0] != key:
            sess = self.runner.sess
            value = ort.OrtValue.ortvalue_from_shape_and_type([rows, height, width, 3], np.uint8, "cuda",
                                                              self.device_index)
            binding = sess.io_binding()
            binding.bind_ortvalue_input(input_name, value)
            binding.bind_output(sess.get_outputs()[0].name, "cpu")
            self._bound = (key, value, binding)
        return self._bound[1:]
