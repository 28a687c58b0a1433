"""int8 and fp16 copies of an ONNX model: calibration photos, the calibration cache, ONNX Runtime's static
quantizer (Q/DQ, used for TensorRT and for ONNX Runtime on CPU) and its fp16 converter.

TensorRT deprecated its calibrators in 10.1, so int8 for either backend is explicit quantization: Q/DQ nodes in
the graph, calibrated on the user's photos fed exactly as the service feeds them, and cached by content.
"""

import hashlib
import logging
import os
import platform
from pathlib import Path
from typing import Callable

import cv2
import onnx
import onnxruntime

from ..core.errors import BuildError
from ..core.metadata import sha256_file
from ..engines import OrtOptions, load_model
from ..serving.pipeline import preprocess

log = logging.getLogger("segment.builds")
QUANT_RECIPE = "pre-process, MinMax, per-channel weights, Q/DQ"  # part of the calibration cache key


CALIBRATION_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".img")


def calibration_files(folder: Path, limit: int) -> list[Path]:
    """The images a calibration uses: the first ``limit`` image files of ``folder``, by name."""
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in CALIBRATION_SUFFIXES)[:limit]
    if not paths:
        raise BuildError(f"no calibration images in {folder}")
    return paths


def photos(paths: list[Path]):
    """The readable images among ``paths``, decoded (BGR)."""
    for p in paths:
        if (img := cv2.imread(str(p), cv2.IMREAD_COLOR)) is not None:
            yield img


def calibration_key(onnx_path: Path, calib_dir: Path, size: tuple[int, int], limit: int, target: str) -> str:
    """Identifies a calibration: the model, the images (by content), the input size, the quantizer and target."""
    recipe = f"{QUANT_RECIPE}|onnxruntime {onnxruntime.__version__}|{target}|vnni {cpu_has_vnni()}"
    h = hashlib.sha256(f"{sha256_file(onnx_path)}|{tuple(size)}|{recipe}".encode())
    for p in calibration_files(calib_dir, limit):
        h.update(sha256_file(p).encode())
    return h.hexdigest()[:32]


def cached_qdq(onnx_path: Path, cache_dir: Path, size: tuple[int, int], calib_dir: Path, limit: int,
               target: str = "tensorrt", progress: Callable[[str], None] = log.info) -> Path:
    """The calibrated Q/DQ model from the calibration cache, calibrating only on a miss."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = cache_dir / f"{calibration_key(onnx_path, calib_dir, size, limit, target)}.qdq.onnx"
    if cached.exists():
        progress(f"calibration cache hit: {cached.name}")
        return cached
    progress(f"calibrating int8 ranges on {calib_dir} for {target} (cache miss)")
    tmp = cache_dir / f".{cached.name}.tmp"
    quantize_qdq(onnx_path, tmp, size, calib_dir, limit, target)
    os.replace(tmp, cached)
    return cached


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (8-bit dot products), which ONNX Runtime's int8 kernels rely on."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def quantize_qdq(onnx_path: Path, out_path: Path, size: tuple[int, int], calib_dir: Path, limit: int,
                 target: str = "tensorrt") -> Path:
    """Explicitly quantized (Q/DQ) copy of the model, calibrated on ``calib_dir`` fed as the service feeds photos.

    TensorRT wants symmetric int8 activations and weights. ONNX Runtime on CPU is fastest with uint8
    activations and int8 weights; without VNNI those can overflow, so weights then use 7 bits (reduce_range).
    """
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if target == "tensorrt":
        activations, extra, reduce_range = QuantType.QInt8, {"ActivationSymmetric": True, "WeightSymmetric": True}, False
    else:
        x86 = platform.machine().lower() in ("x86_64", "amd64")  # the u8 x s8 overflow is an x86 matter
        activations, extra, reduce_range = QuantType.QUInt8, {"WeightSymmetric": True}, x86 and not cpu_has_vnni()
    # ONNX Runtime's recommended pre-pass (constant folding, fusions, shapes): without it, biases that the
    # exporter shared between layers (behind Identity nodes) stay float and their convolutions unquantized.
    # Symbolic shape inference is for transformers and fails on some conv graphs: ONNX's own suffices here.
    prepared = out_path.with_name(f".{out_path.name}.prepared.onnx")
    quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
    source = load_model(onnx_path, ort=OrtOptions(providers="cpu"))
    try:
        batches = ({source.input_name: preprocess(img, source, size)}
                   for img in photos(calibration_files(calib_dir, limit)))

        class Reader(CalibrationDataReader):
            def get_next(self):
                return next(batches, None)

        quantize_static(str(prepared), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=activations, weight_type=QuantType.QInt8, per_channel=True,
                        reduce_range=reduce_range, calibrate_method=CalibrationMethod.MinMax, extra_options=extra)
    finally:
        source.close()
        prepared.unlink(missing_ok=True)
    return out_path


def float16_onnx(onnx_path: Path, out_path: Path) -> Path:
    """An fp16 copy of an ONNX model for ONNX Runtime's CUDA provider (tensor cores, half the weight bytes).

    Inputs and outputs keep their types (float or uint8 pixels in, class ids out), so the service feeds it
    exactly as it fed the source; the input casts inside the graph become casts to fp16."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True), str(out_path))
    return out_path
