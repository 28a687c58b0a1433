"""ONNX -> TensorRT engine, or ONNX -> fp16 or int8 ONNX for ONNX Runtime (``segment compile``, ``POST /engines``).

TensorRT: ``NetworkFromOnnxPath -> CreateConfig(precision, profile, timing cache) -> EngineFromNetwork ->
SaveEngine``. int8 for either backend is explicit quantization, Q/DQ nodes in the ONNX graph (TensorRT
deprecated calibrators in 10.1), made by ONNX Runtime's static quantizer calibrated on the user's photos and
cached by content. An output ending in ``.onnx`` is a model for ONNX Runtime: that Q/DQ model itself (for
CPUs), or an fp16 copy (for its CUDA provider) with the inputs and outputs kept as they were.
Every build is written to a temporary file and renamed, metadata last, so a failed or killed build leaves
nothing behind, and is checked against its source model on real photos before it is kept.
"""

import logging
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .metadata import ModelMeta, load_meta, save_meta, sha256_file
from .runner import ENGINE_SUFFIXES, ONNX_SUFFIXES, TensorRTUnavailable, gpu_info, tensorrt_available

log = logging.getLogger("segment.compiler")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
ONNXRUNTIME_BUILDS = ("fp16", "int8")  # fp32 is the source ONNX itself; bf16 only TensorRT builds
PARITY_MIN_AGREEMENT = {"int8": 0.95}  # labels equal to the source model's on the check photos; else 0.99
PARITY_IMAGES = 4
QUANT_RECIPE = "pre-process, MinMax, per-channel weights, Q/DQ"  # part of the calibration cache key


def parse_shape(text: str) -> tuple[int, int, int]:
    """'batch,height,width' as three positive ints (ValueError naming the expected form otherwise)."""
    try:
        b, h, w = (int(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(f"expected 'batch,height,width', e.g. 1,512,1024, got {text!r}") from None
    if min(b, h, w) < 1:
        raise ValueError(f"shape {text!r}: every dimension must be at least 1")
    return b, h, w


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


@dataclass(frozen=True)
class OnnxInput:
    """The model's single input: name, dims (None where dynamic) and layout."""

    name: str
    dims: tuple
    raw_pixels: bool  # uint8 [N,H,W,3] (``segment export --input uint8``), else float32 [N,3,H,W]

    @property
    def hw(self) -> tuple[int | None, int | None]:
        return tuple(self.dims[1:3]) if self.raw_pixels else tuple(self.dims[2:4])

    def shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """A full input shape in the model's layout."""
        return (batch, height, width, 3) if self.raw_pixels else (batch, 3, height, width)


def onnx_input(onnx_path: Path) -> OnnxInput:
    """The model's single input, read from the graph."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inp = next(i for i in graph.input if i.name not in initializers)
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim)
    raw = inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8 and len(dims) == 4 and dims[3] == 3
    return OnnxInput(inp.name, dims, raw)


def shape_profile(onnx_path: Path, meta: ModelMeta, opts: BuildOptions) -> tuple[OnnxInput, dict]:
    """min/opt/max (batch, height, width): the user's, else fixed dims, metadata size, batch 1..8."""
    inp = onnx_input(onnx_path)
    default_hw = meta.input_size or (512, 1024)
    fixed_h, fixed_w = inp.hw if len(inp.dims) == 4 else (None, None)

    def full(shape, batch_default):
        return tuple(shape) if shape else (batch_default, fixed_h or default_hw[0], fixed_w or default_hw[1])

    batch_max = 1 if inp.dims and inp.dims[0] else 8
    shapes = {"min": full(opts.min_shape, 1), "opt": full(opts.opt_shape, 1), "max": full(opts.max_shape, batch_max)}
    for key, (b, h, w) in shapes.items():
        if (fixed_h and h != fixed_h) or (fixed_w and w != fixed_w):
            raise ValueError(f"{key} shape {h}x{w} contradicts the model's fixed input {fixed_h}x{fixed_w}")
    if not all(lo <= mid <= hi for lo, mid, hi in zip(shapes["min"], shapes["opt"], shapes["max"])):
        raise ValueError("the profile needs min <= opt <= max in batch, height and width; got min {min}, opt {opt}, "
                         "max {max} (give the other shapes too)".format(**shapes))
    return inp, shapes


def build_loaders(onnx_path: Path, engine_path: Path, inp: OnnxInput, shapes: dict, opts: BuildOptions,
                  timing_cache: Path):
    """The Polygraphy loader chain; nothing runs (and TensorRT is not imported) until it is called."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    profile = Profile().add(inp.name, min=inp.shape(*shapes["min"]), opt=inp.shape(*shapes["opt"]),
                            max=inp.shape(*shapes["max"]))
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


def photos(paths: list[Path]):
    """The readable images among ``paths``, decoded (BGR)."""
    import cv2

    for p in paths:
        if (img := cv2.imread(str(p), cv2.IMREAD_COLOR)) is not None:
            yield img


def calibration_key(onnx_path: Path, calib_dir: Path, size: tuple[int, int], limit: int, target: str) -> str:
    """Identifies a calibration: the model, the images (by content), the input size, the quantizer and target."""
    import hashlib

    import onnxruntime

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

    from .pipeline import preprocess
    from .onnxrt import OrtOptions
    from .runner import load_model

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
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True), str(out_path))
    return out_path


def parity(candidate: Path, reference: Path, size: tuple[int, int], images: list[Path]) -> dict:
    """Labels of the built model against its source model's, both served as the service serves them."""
    from .pipeline import preprocess
    from .onnxrt import OrtOptions
    from .runner import load_model

    models = [load_model(candidate), load_model(reference, ort=OrtOptions(providers="cpu"))]
    try:
        same = total = 0
        for img in photos(images):
            a, b = (m.infer(preprocess(img, m, size)) for m in models)
            same, total = same + int((a == b).sum()), total + a.size
    finally:
        for m in models:
            m.close()
    if not total:
        raise ValueError("no readable photo for the parity check")
    return {"label_agreement": same / total, "images": len(images)}


def parity_images(opts: BuildOptions) -> list[Path]:
    """Real photos for the parity check: a few calibration images, else the bundled street scene."""
    from .bench import DEFAULT_IMAGE

    return calibration_files(Path(opts.calib_dir), PARITY_IMAGES) if opts.calib_dir else [DEFAULT_IMAGE]


def compile_model(onnx_path: Path, out_path: Path, opts: BuildOptions,
                  progress: Callable[[str], None] = log.info) -> ModelMeta:
    """Build ``out_path`` from ``onnx_path``: a TensorRT engine, or (``.onnx``) an fp16 or int8 model for ONNX Runtime.

    Returns the metadata written beside it."""
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    target = "onnxruntime" if out_path.suffix.lower() in ONNX_SUFFIXES else "tensorrt"
    if target == "tensorrt" and out_path.suffix.lower() not in ENGINE_SUFFIXES:
        raise ValueError(f"{out_path.name}: the output must end in .onnx (ONNX Runtime fp16 or int8) or "
                         f"{', '.join(ENGINE_SUFFIXES)} (TensorRT)")
    if out_path.resolve() == onnx_path.resolve():
        raise ValueError("the output would overwrite the source model; pick another name")
    if target == "onnxruntime" and opts.precision not in ONNXRUNTIME_BUILDS:
        raise ValueError(f"an .onnx output is an fp16 or int8 model for ONNX Runtime, not {opts.precision}: pass "
                         "--fp16 or --int8 CALIB_DIR (fp32 is the source ONNX itself; bf16 is a TensorRT precision)")
    if target == "tensorrt" and not tensorrt_available():
        raise TensorRTUnavailable()
    meta = load_meta(onnx_path)
    inp, shapes = shape_profile(onnx_path, meta, opts)
    size = shapes["opt"][1:]
    progress(f"input {inp.name}: " + (f"min {shapes['min']} opt {shapes['opt']} max {shapes['max']} (batch, height, "
                                      "width)" if target == "tensorrt" else f"{size[0]}x{size[1]}")
             + f", {opts.precision} for {target}")
    work = out_path.parent / f".{out_path.name}.build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    built = work / f"model{out_path.suffix}"
    try:
        start, source = time.perf_counter(), onnx_path
        if opts.precision == "fp16" and target == "onnxruntime":
            source = float16_onnx(onnx_path, built)
        elif opts.precision == "int8":
            source = cached_qdq(onnx_path, out_path.parent / ".calibration-cache", size, Path(opts.calib_dir),
                                opts.calib_images, target, progress)
        if target == "tensorrt":
            progress("building the engine (minutes for large models)")
            build_loaders(source, built, inp, shapes, opts, out_path.parent / ".timing.cache")()
            backend = _tensorrt_build_info()
        else:
            if source != built:  # the int8 model comes from the calibration cache
                shutil.copyfile(source, built)
            import onnxruntime

            backend = {"onnxruntime_version": onnxruntime.__version__,
                       **({"cpu_vnni": cpu_has_vnni()} if opts.precision == "int8" else {})}
        duration = time.perf_counter() - start
        save_meta(built, meta)  # the parity check loads the candidate as the service would
        progress(f"built in {duration:.1f} s; checking labels against the source model")
        check = parity(built, onnx_path, size, parity_images(opts))
        check["flagged"] = check["label_agreement"] < PARITY_MIN_AGREEMENT.get(opts.precision, 0.99)
        progress(f"parity: label agreement {check['label_agreement']:.4%} on {check['images']} photo(s)"
                 + (" -- POOR AGREEMENT, check the precision" if check["flagged"] else ""))
        # The source's own checks and scores describe the source, not this build.
        inherited = {k: v for k, v in meta.extra.items() if k not in ("check", "evaluation")}
        meta.extra = {**inherited, "precision": opts.precision, "build": {
            "target": target, "source": onnx_path.name, "source_sha256": sha256_file(onnx_path), **backend,
            **({"profile": {k: list(inp.shape(*v)) for k, v in shapes.items()}} if target == "tensorrt" else {}),
            **({"calibration_size": list(size)} if opts.precision == "int8" else {}),
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
            "build_seconds": round(duration, 2), "file_bytes": built.stat().st_size, "parity": check}}
        # The registry lists model files. An engine counts as built only once its metadata exists, so that
        # goes last; an ONNX file is served as soon as it exists, so its metadata must already be there.
        if target == "onnxruntime":
            save_meta(out_path, meta)
        os.replace(built, out_path)
        if target == "tensorrt":
            save_meta(out_path, meta)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(f"wrote {out_path} ({out_path.stat().st_size / 2**20:.1f} MiB)")
    return meta


def _tensorrt_build_info() -> dict:
    import tensorrt as trt

    return {"tensorrt_version": trt.__version__, **gpu_info()}
