"""Opening a model file: the backend for its kind, activation, the contract, and a dry run that proves it serves."""

import logging
from pathlib import Path

import numpy as np
import onnx

from ..core.datasets import serving_palette
from ..core.errors import ModelError
from ..core.metadata import load_meta
from . import onnxrt, tensorrt
from .model import InputContract, SegmentationModel
from .onnxrt import OrtOptions

log = logging.getLogger("segment.engines")

ONNX_SUFFIXES = onnxrt.SUFFIXES
ENGINE_SUFFIXES = tensorrt.SUFFIXES
MODEL_SUFFIXES = ONNX_SUFFIXES + ENGINE_SUFFIXES


def check_onnx_graph(path: Path) -> None:
    """Refuse ONNX graphs we know cannot run here, with the fix, before ONNX Runtime says it obscurely."""
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # protobuf raises several types
        raise ModelError(f"{path.name} is not a readable ONNX model ({exc.__class__.__name__})") from exc
    if any(node.op_type == "CustomArgMax" for node in graph.node):
        raise ModelError(
            f"{path.name} uses upstream's CustomArgMax op (exported in 'pred' mode), which needs upstream's "
            "TensorRT plugin. Re-export it with upstream's `tools/export_onnx.py --aux-mode eval`, or with "
            "`segment export` here.")


def onnx_contract(path: Path) -> InputContract:
    """The input contract of an ONNX file read from its graph, without loading it (builds need it before any
    runner exists)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inp = next(i for i in graph.input if i.name not in initializers)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type))
    try:
        return InputContract.from_dims(inp.name, dtype, dims)
    except ValueError as exc:
        raise ModelError(f"{path.name}: {exc}") from None


def open_backend(path: Path, backend: str = "auto", ort: OrtOptions = OrtOptions()):
    """The backend object for ``path`` (its runner not yet activated), chosen by the file's kind."""
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        if backend == "tensorrt":
            raise ModelError(f"{path.name} is an ONNX model but backend=tensorrt: compile it first "
                             "(`segment compile` or POST /engines)")
        check_onnx_graph(path)
        return onnxrt.OnnxRuntime(path, ort)
    if suffix in ENGINE_SUFFIXES:
        if backend == "onnxruntime":
            raise ModelError(f"{path.name} is a TensorRT engine but backend=onnxruntime")
        return tensorrt.TensorRT(path, load_meta(path))
    raise ModelError(f"{path.name}: unknown model type (expected one of {', '.join(MODEL_SUFFIXES)})")


def load_model(path: Path, backend: str = "auto", ort: OrtOptions = OrtOptions()) -> SegmentationModel:
    """Load, activate and dry-run the model at ``path``; :class:`ModelError` says why it cannot serve."""
    meta = load_meta(path)
    runtime = open_backend(path, backend, ort)
    try:
        runtime.runner.activate()
    except ModelError:
        raise
    except Exception as exc:  # ONNX Runtime / TensorRT raise their own types for bad files
        raise ModelError(f"{path.name} could not be loaded by {runtime.name}: {exc}") from exc
    try:
        model = _inspect(path, meta, runtime)
    except Exception:
        runtime.runner.deactivate()
        raise
    log.info("loaded %s (%s on %s): input %s %s, %s output, %d classes%s", model.name, runtime.name,
             model.device, model.input_hw, model.input_dtype, model.output_kind, model.num_classes,
             "" if meta.trained else " [UNTRAINED WEIGHTS]")
    if meta.precision == "fp16" and model.device != "cuda":
        # Correct on CPU, but ONNX Runtime's CPU kernels gain nothing from fp16 (15% slower than fp32 measured).
        log.warning("%s is an fp16 build for ONNX Runtime's CUDA provider; on a CPU its fp32 source is faster",
                    model.name)
    return model


def _inspect(path: Path, meta, runtime) -> SegmentationModel:
    from polygraphy.datatype import DataType

    inputs = runtime.runner.get_input_metadata(use_numpy_dtypes=False)
    if len(inputs) != 1:
        raise ModelError(f"{path.name} has {len(inputs)} inputs; a segmentation model takes one image tensor")
    input_name, tmeta = next(iter(inputs.items()))
    try:
        contract = InputContract.from_dims(input_name, np.dtype(DataType.to_dtype(tmeta.dtype, "numpy")),
                                           list(tmeta.shape))
    except ValueError as exc:
        raise ModelError(f"{path.name}: {exc}") from None
    # NAME.onnx, NAME.engine or NAME.<gpu-kind>.engine: the model is NAME
    name = path.name.split(".", 1)[0] if path.suffix.lower() in ENGINE_SUFFIXES else path.stem
    model = SegmentationModel(name=name, path=path, meta=meta, runtime=runtime, contract=contract)
    # Dry run: proves the model executes, and tells logits from labels by what comes out.
    h = contract.hw[0] or (meta.input_size[0] if meta.input_size else 64)
    w = contract.hw[1] or (meta.input_size[1] if meta.input_size else 64)
    probe = np.zeros(contract.shape(1, h, w), contract.dtype)
    try:
        out = np.asarray(next(iter(runtime.runner.infer({input_name: probe}).values())))
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
    # A dry run on zeros cannot show which ids a labels model outputs, so the palette covers every id instead: ids
    # past the classes get the unknown colour (and are named so), never an index out of range.
    model.palette = np.ascontiguousarray(np.asarray(serving_palette(meta.palette, model.num_classes), np.uint8))
    return model
