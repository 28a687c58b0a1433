"""ONNX -> TensorRT engine, or ONNX -> fp16 or int8 ONNX for ONNX Runtime (``segment compile``, ``POST /engines``).

TensorRT: ``NetworkFromOnnxPath -> CreateConfig(precision, profile, timing cache) -> EngineFromNetwork ->
SaveEngine``. int8 for either backend is explicit quantization (``quantize.py``). An output ending in ``.onnx`` is
a model for ONNX Runtime: that Q/DQ model itself (for CPUs), or an fp16 copy (for its CUDA provider).
Every build is written to a temporary file and renamed, metadata last, so a failed or killed build leaves
nothing behind, and is checked against its source model on real photos before it is kept.
"""

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import onnxruntime

from ..core.errors import BuildError, TensorRTUnavailable
from ..core.metadata import BuildInfo, ModelMeta, load_meta, save_meta, sha256_file
from ..core.resources import sample_image
from ..engines import ENGINE_SUFFIXES, ONNX_SUFFIXES, InputContract, OrtOptions, load_model, onnx_contract
from ..engines.host import gpu_info
from ..engines.tensorrt import tensorrt_available
from ..serving.pipeline import preprocess
from .options import BuildOptions
from .quantize import cached_qdq, calibration_files, cpu_has_vnni, float16_onnx, photos

log = logging.getLogger("segment.builds")
PARITY_MIN_AGREEMENT = {"int8": 0.95}  # labels equal to the source model's on the check photos; else 0.99
PARITY_IMAGES = 4


def shape_profile(onnx_path: Path, meta: ModelMeta, opts: BuildOptions) -> tuple[InputContract, dict]:
    """min/opt/max (batch, height, width): the user's, else fixed dims, metadata size, batch 1..8."""
    inp = onnx_contract(onnx_path)
    default_hw = meta.input_size or (512, 1024)
    fixed_h, fixed_w = inp.hw

    def full(shape, batch_default):
        return tuple(shape) if shape else (batch_default, fixed_h or default_hw[0], fixed_w or default_hw[1])

    batch_max = 8 if inp.batch_dynamic else 1
    shapes = {"min": full(opts.min_shape, 1), "opt": full(opts.opt_shape, 1), "max": full(opts.max_shape, batch_max)}
    for key, (b, h, w) in shapes.items():
        if (fixed_h and h != fixed_h) or (fixed_w and w != fixed_w):
            raise BuildError(f"{key} shape {h}x{w} contradicts the model's fixed input {fixed_h}x{fixed_w}")
    if not all(lo <= mid <= hi for lo, mid, hi in zip(shapes["min"], shapes["opt"], shapes["max"])):
        raise BuildError("the profile needs min <= opt <= max in batch, height and width; got min {min}, opt {opt}, "
                         "max {max} (give the other shapes too)".format(**shapes))
    return inp, shapes


def build_loaders(onnx_path: Path, engine_path: Path, inp: InputContract, shapes: dict, opts: BuildOptions,
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


def parity(candidate: Path, reference: Path, size: tuple[int, int], images: list[Path]) -> dict:
    """Labels of the built model against its source model's, both served as the service serves them."""
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
        raise BuildError("no readable photo for the parity check")
    return {"label_agreement": same / total, "images": len(images)}


def parity_images(opts: BuildOptions) -> list[Path]:
    """Real photos for the parity check: a few calibration images, else the bundled street scene."""
    return calibration_files(Path(opts.calib_dir), PARITY_IMAGES) if opts.calib_dir else [sample_image()]


def compile_model(onnx_path: Path, out_path: Path, opts: BuildOptions,
                  progress: Callable[[str], None] = log.info) -> ModelMeta:
    """Build ``out_path`` from ``onnx_path``: a TensorRT engine, or (``.onnx``) an fp16 or int8 model for ONNX Runtime.

    Returns the metadata written beside it."""
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    target = opts.target
    suffixes = ONNX_SUFFIXES if target == "onnxruntime" else ENGINE_SUFFIXES
    if out_path.suffix.lower() not in suffixes:
        raise BuildError(f"{out_path.name}: the output of a {target} build must end in {', '.join(suffixes)} (.onnx: "
                         "an fp16 or int8 model for ONNX Runtime; .engine, .plan, .trt: TensorRT)")
    if out_path.resolve() == onnx_path.resolve():
        raise BuildError("the output would overwrite the source model; pick another name")
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
        meta.extra = {k: v for k, v in meta.extra.items() if k not in ("check", "evaluation")}
        meta.precision = opts.precision
        meta.build = BuildInfo(
            target=target, source=onnx_path.name, source_sha256=sha256_file(onnx_path), **backend,
            **({"profile": {k: list(inp.shape(*v)) for k, v in shapes.items()}} if target == "tensorrt" else {}),
            **({"calibration_size": list(size)} if opts.precision == "int8" else {}),
            options=opts.model_dump(mode="json"), build_seconds=round(duration, 2), file_bytes=built.stat().st_size,
            parity=check)
        meta.sha256 = sha256_file(built)  # what a copy fetched from a remote repository is checked against
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
    import tensorrt as trt  # only reached once tensorrt_available() said yes

    return {"tensorrt_version": trt.__version__, **gpu_info()}
