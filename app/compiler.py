"""ONNX -> TensorRT engine, composed from Polygraphy loaders (``segment compile`` and ``POST /engines``).

``NetworkFromOnnxPath -> CreateConfig(precision, profile, timing cache) -> EngineFromNetwork -> SaveEngine``,
written to a temporary file and renamed, metadata last, so a failed or killed build leaves nothing behind.

int8: TensorRT deprecated implicit (calibrator) quantization in 10.1 in favour of explicit quantization,
Q/DQ nodes in the ONNX graph. We produce those with ONNX Runtime's static quantizer (symmetric, per-channel
weights, calibrated on the user's images, ranges cached beside the engine), then build with int8 enabled.
"""

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .metadata import ModelMeta, load_meta, save_meta, sha256_file
from .runner import TensorRTUnavailable, gpu_info, tensorrt_available

log = logging.getLogger("segment.compiler")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
PARITY_MIN_AGREEMENT = 0.99


@dataclass
class BuildOptions:
    """What to build. Shapes are (batch, height, width); None takes them from the ONNX and its metadata."""

    precision: str = "fp32"
    min_shape: tuple[int, int, int] | None = None
    opt_shape: tuple[int, int, int] | None = None
    max_shape: tuple[int, int, int] | None = None
    workspace_mb: int | None = None
    calib_dir: Path | None = None
    calib_images: int = 64
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.precision == "int8" and self.calib_dir is None:
            raise ValueError("int8 needs calibration images (a folder of typical photos)")


def onnx_input(onnx_path: Path) -> tuple[str, list]:
    """Name and shape (ints, or None where dynamic) of the model's single input."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inp = next(i for i in graph.input if i.name not in initializers)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    return inp.name, dims


def shape_profile(onnx_path: Path, meta: ModelMeta, opts: BuildOptions) -> tuple[str, dict]:
    """min/opt/max NCHW shapes for the input: the user's, else fixed dims, metadata size, batch 1..8."""
    name, dims = onnx_input(onnx_path)
    default_hw = meta.input_size or (512, 1024)
    fixed_h = dims[2] if len(dims) == 4 else None
    fixed_w = dims[3] if len(dims) == 4 else None

    def full(shape, batch_default):
        b, h, w = shape if shape else (batch_default, fixed_h or default_hw[0], fixed_w or default_hw[1])
        return (b, 3, h, w)

    batch_max = 1 if dims and dims[0] else 8
    shapes = {"min": full(opts.min_shape, 1), "opt": full(opts.opt_shape, 1), "max": full(opts.max_shape, batch_max)}
    for key, (b, _, h, w) in shapes.items():
        if (fixed_h and h != fixed_h) or (fixed_w and w != fixed_w):
            raise ValueError(f"{key} shape {h}x{w} contradicts the model's fixed input {fixed_h}x{fixed_w}")
    return name, shapes


def build_loaders(onnx_path: Path, engine_path: Path, input_name: str, shapes: dict, opts: BuildOptions,
                  timing_cache: Path):
    """The Polygraphy loader chain; nothing runs (and TensorRT is not imported) until it is called."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    profile = Profile().add(input_name, min=shapes["min"], opt=shapes["opt"], max=shapes["max"])
    pool_limits = None
    if opts.workspace_mb and tensorrt_available():
        import tensorrt as trt

        pool_limits = {trt.MemoryPoolType.WORKSPACE: opts.workspace_mb * 2**20}
    config = CreateConfig(fp16=opts.precision == "fp16", bf16=opts.precision == "bf16",
                          int8=opts.precision == "int8", profiles=[profile],
                          load_timing_cache=str(timing_cache), memory_pool_limits=pool_limits)
    engine = EngineFromNetwork(NetworkFromOnnxPath(str(onnx_path)), config=config,
                               save_timing_cache=str(timing_cache))
    return SaveEngine(engine, path=str(engine_path))


CALIBRATION_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".img")


def calibration_files(folder: Path, limit: int) -> list[Path]:
    """The images a calibration uses: the first ``limit`` image files of ``folder``, by name."""
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in CALIBRATION_SUFFIXES)[:limit]
    if not paths:
        raise ValueError(f"no calibration images in {folder}")
    return paths


def calibration_batches(folder: Path, meta: ModelMeta, size: tuple[int, int], limit: int):
    """The calibration images pre-processed exactly as the service does, one per batch."""
    import cv2

    from .pipeline import normalized_blob

    for p in calibration_files(folder, limit):
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is not None:
            yield normalized_blob(img, meta.mean, meta.std, size)


def calibration_key(onnx_path: Path, calib_dir: Path, size: tuple[int, int], limit: int) -> str:
    """Identifies a calibration: the model, the images it uses (by content), the input size."""
    import hashlib

    h = hashlib.sha256(f"{sha256_file(onnx_path)}|{size}".encode())
    for p in calibration_files(calib_dir, limit):
        h.update(sha256_file(p).encode())
    return h.hexdigest()[:32]


def cached_qdq(onnx_path: Path, cache_dir: Path, input_name: str, meta: ModelMeta, size: tuple[int, int],
               calib_dir: Path, limit: int, progress: Callable[[str], None] = log.info) -> Path:
    """The calibrated Q/DQ model from the calibration cache, calibrating only on a miss."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = cache_dir / f"{calibration_key(onnx_path, calib_dir, size, limit)}.qdq.onnx"
    if cached.exists():
        progress(f"calibration cache hit: {cached.name}")
        return cached
    progress(f"calibrating int8 ranges on {calib_dir} (cache miss)")
    tmp = cache_dir / f".{cached.name}.tmp"
    quantize_qdq(onnx_path, tmp, input_name, meta, size, calib_dir, limit)
    os.replace(tmp, cached)
    return cached


def quantize_qdq(onnx_path: Path, out_path: Path, input_name: str, meta: ModelMeta, size: tuple[int, int],
                 calib_dir: Path, limit: int) -> Path:
    """Explicitly quantized (Q/DQ) copy of the model, calibrated on ``calib_dir``; TensorRT builds it as int8."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = ({input_name: b} for b in calibration_batches(calib_dir, meta, size, limit))

        def get_next(self):
            return next(self._it, None)

    quantize_static(str(onnx_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return out_path


def parity(engine_path: Path, onnx_path: Path, input_name: str, shape: tuple) -> dict:
    """Run the engine and ONNX Runtime on one input (what `polygraphy run --trt --onnxrt` does)."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    x = np.random.default_rng(0).standard_normal((1, *shape[1:]), np.float32)
    with TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path)))) as trt_runner, \
            OnnxrtRunner(SessionFromOnnx(str(onnx_path))) as ort_runner:
        a = np.asarray(next(iter(trt_runner.infer({input_name: x}).values())))
        b = np.asarray(next(iter(ort_runner.infer({input_name: x}).values())))
    if a.ndim == 4 and np.issubdtype(a.dtype, np.floating):
        return {"label_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
                "max_abs_diff": float(np.abs(a.astype(np.float32) - b).max())}
    return {"label_agreement": float((a.reshape(b.shape) == b).mean()), "max_abs_diff": None}


def compile_engine(onnx_path: Path, engine_path: Path, opts: BuildOptions,
                   progress: Callable[[str], None] = log.info) -> ModelMeta:
    """Build ``engine_path`` from ``onnx_path``; returns the metadata written beside it."""
    if not tensorrt_available():
        raise TensorRTUnavailable()
    import tensorrt as trt

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    meta = load_meta(onnx_path)
    input_name, shapes = shape_profile(onnx_path, meta, opts)
    progress(f"input {input_name}: min {shapes['min']} opt {shapes['opt']} max {shapes['max']}, {opts.precision}")
    work = engine_path.parent / f".{engine_path.name}.build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        source = onnx_path
        if opts.precision == "int8":
            source = cached_qdq(onnx_path, engine_path.parent / ".calibration-cache", input_name, meta,
                                shapes["opt"][2:], Path(opts.calib_dir), opts.calib_images, progress)
        timing_cache = engine_path.parent / ".timing.cache"
        progress("building the engine (minutes for large models)")
        start = time.perf_counter()
        build_loaders(source, work / "engine", input_name, shapes, opts, timing_cache)()
        duration = time.perf_counter() - start
        progress(f"built in {duration:.1f} s; checking parity with ONNX Runtime")
        check = parity(work / "engine", onnx_path, input_name, shapes["opt"])
        check["flagged"] = check["label_agreement"] < PARITY_MIN_AGREEMENT
        progress(f"parity: label agreement {check['label_agreement']:.4%}"
                 + (f", max |diff| {check['max_abs_diff']:.3g}" if check["max_abs_diff"] is not None else "")
                 + (" -- POOR AGREEMENT, check the precision" if check["flagged"] else ""))
        os.replace(work / "engine", engine_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta.extra = {**meta.extra, "precision": opts.precision, "build": {
        "source": onnx_path.name, "source_sha256": sha256_file(onnx_path), "tensorrt_version": trt.__version__,
        **gpu_info(), "profile": {k: list(v) for k, v in shapes.items()},
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "build_seconds": round(duration, 2), "file_bytes": engine_path.stat().st_size, "parity": check}}
    save_meta(engine_path, meta)  # last: an engine without metadata is never listed as built
    progress(f"wrote {engine_path} ({engine_path.stat().st_size / 2**20:.1f} MiB)")
    return meta
