"""The Open Inference Protocol v2 over REST (KServe v2, Triton's HTTP API), beside the service's own routes.

Tensors: input ``image`` (BYTES [N], encoded images, decoded as ``POST /segment`` decodes them) or ``pixels``
(UINT8 [H,W,3] or [N,H,W,3], RGB); outputs ``labels`` (UINT8, INT32 beyond 256 classes, [N,H,W] at the images'
size) and ``class_shares`` (FP32 [N,C], each class's share of the pixels). Errors are ``{"error": "..."}``.
"""

import json
import time
from typing import Annotated

import cv2
import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from ...core.errors import ImageError, NotFound
from ...serving.imaging import check_size
from ...serving.pipeline import Segmentation, segment_bytes, segment_image
from ...serving.served import ServedModel
from .. import tracing
from ..deps import AdminDep, AdmittedDep, OneProcessDep, StateDep
from ..model_control import ModelControl
from ..oip import InferRequest, ProtocolError, V2Route, bytes_elements, encode_response, error, numeric, read_request

router = APIRouter(prefix="/v2", tags=["open inference protocol"], route_class=V2Route)

PLATFORMS = {"onnx": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
INPUTS_HINT = "send one input: `image` (BYTES [N], encoded images) or `pixels` (UINT8 [H,W,3] or [N,H,W,3], RGB)"


def model_control(state: StateDep) -> ModelControl:
    return ModelControl(state)


ControlDep = Annotated[ModelControl, Depends(model_control)]


def check_version(version: str | None) -> None:
    """Every model has the one version "1" (the repository keeps one file per name)."""
    if version not in (None, "", "1"):
        raise NotFound(f"version {version!r} not found: models here have the one version '1'")


@router.get("")
def server_metadata(request: Request) -> dict:
    """Server metadata: name, version and the protocol extensions spoken."""
    return {"name": request.app.title, "version": request.app.version,
            "extensions": ["binary_tensor_data", "model_repository"]}


@router.get("/health/live")
def live() -> dict:
    """200 while the process is up."""
    return {"live": True}


@router.get("/health/ready")
def ready(state: StateDep):
    """200 when a model is loaded and can infer, else 503 saying why."""
    if state.model is None:
        return error(503, f"no model is loaded: {state.problem}")
    return {"ready": True}


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
def model_metadata(name: str, control: ControlDep, version: str | None = None) -> dict:
    """Inputs and outputs of any repository model, loaded or not; -1 marks a dimension of any size."""
    check_version(version)
    facts = control.facts(name)
    classes = facts["num_classes"] or -1
    labels = "INT32" if classes > 256 else "UINT8"
    return {"name": name, "versions": ["1"], "platform": PLATFORMS[facts["kind"]],
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                       {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
            "outputs": [{"name": "labels", "datatype": labels, "shape": [-1, -1, -1]},
                        {"name": "class_shares", "datatype": "FP32", "shape": [-1, classes]}]}


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
def model_ready(name: str, control: ControlDep, version: str | None = None):
    """200 when the model is loaded; 400 when it exists but is not; 404 when there is no such model."""
    check_version(version)
    control.facts(name)
    if not control.loaded(name):
        return error(400, f"model {name!r} is not loaded")
    return {"name": name, "ready": True}


def segment_all(model: ServedModel, images: list, settings, pixels: bool) -> list[Segmentation]:
    """The pipeline on each image of one request: encoded bytes decoded like ``POST /segment`` uploads, or RGB
    arrays. An image's error names it when the request holds several."""
    results = []
    for i, item in enumerate(images):
        try:
            if pixels:
                check_size(item.shape[1], item.shape[0], settings.max_pixels, settings.min_side)
                seg = segment_image(model, cv2.cvtColor(item, cv2.COLOR_RGB2BGR), settings.max_dynamic_side)
            else:
                seg = segment_bytes(model, item, settings.max_pixels, settings.max_dynamic_side, settings.min_side,
                                    settings.gpu_decode and model.decodes_on_gpu)
        except ImageError as exc:
            raise ImageError(exc.status_code, f"image {i}: {exc.detail}" if len(images) > 1 else exc.detail) from None
        results.append(seg)
    return results


def input_images(req: InferRequest, raw: dict[str, bytes], max_images: int) -> tuple[list, bool]:
    """The request's images: encoded bytes from ``image``, or uint8 RGB arrays from ``pixels`` (True)."""
    if len(req.inputs) != 1 or req.inputs[0].name not in ("image", "pixels"):
        raise ProtocolError(f"{INPUTS_HINT}; got {', '.join(repr(t.name) for t in req.inputs)}")
    tensor = req.inputs[0]
    if tensor.name == "image":
        if tensor.datatype != "BYTES" or len(tensor.shape) != 1:
            raise ProtocolError(f"input 'image' is BYTES [N], not {tensor.datatype} {tensor.shape}")
        images, pixels = bytes_elements(tensor, raw.get("image")), False
    else:
        if tensor.datatype != "UINT8" or len(tensor.shape) not in (3, 4) or tensor.shape[-1] != 3:
            raise ProtocolError(f"input 'pixels' is UINT8 [H,W,3] or [N,H,W,3], not {tensor.datatype} {tensor.shape}")
        array = numeric(tensor, raw.get("pixels"))
        images, pixels = list(array[None] if array.ndim == 3 else array), True
    if not 1 <= len(images) <= max_images:
        raise ProtocolError(f"send 1 to {max_images} images in one request, not {len(images)}")
    return images, pixels


def output_tensors(segs: list[Segmentation], model: ServedModel) -> dict[str, np.ndarray]:
    sizes = {seg.labels.shape for seg in segs}
    if len(sizes) > 1:
        raise ProtocolError(f"the images have different sizes ({', '.join(f'{w}x{h}' for h, w in sorted(sizes))}), "
                            "so their labels cannot form one [N,H,W] tensor: send them in separate requests")
    shares = np.stack([np.bincount(seg.labels.ravel(), minlength=model.num_classes)[: model.num_classes]
                       / seg.labels.size for seg in segs]).astype(np.float32)
    return {"labels": np.stack([seg.labels.astype(model.label_dtype, copy=False) for seg in segs]),
            "class_shares": shares}


@router.post("/models/{name}/infer", dependencies=[AdmittedDep])
@router.post("/models/{name}/versions/{version}/infer", dependencies=[AdmittedDep])
async def infer(name: str, request: Request, state: StateDep, control: ControlDep, version: str | None = None):
    """Segment the images of one request: JSON tensors, or binary tensor data after a JSON header of
    `Inference-Header-Content-Length` bytes."""
    check_version(version)
    start = time.perf_counter_ns()
    req, raw = await read_request(request)
    tracing.stage("read", start)
    with control.use(name) as model:
        images, pixels = input_images(req, raw, state.settings.max_request_images)
        segs = await run_in_threadpool(segment_all, model, images, state.settings, pixels)
        for seg in segs:
            state.metrics.observe_stages(seg.timings)
        tracing.segmentations(segs, model)
        start = time.perf_counter_ns()
        response = encode_response(name, req, output_tensors(segs, model))
        tracing.stage("encode", start)
        return response


@router.post("/repository/index")
async def repository_index(request: Request, control: ControlDep) -> list[dict]:
    """Every repository model with its state (READY or UNAVAILABLE); `{"ready": true}` lists only the loaded."""
    body = (await request.body()).strip() or b"{}"
    try:
        ready_only = bool(json.loads(body).get("ready", False))
    except (ValueError, AttributeError):
        raise ProtocolError('the index request is empty or a JSON object such as {"ready": true}') from None
    return [m for m in control.index() if not ready_only or m["state"] == "READY"]


@router.post("/repository/models/{name}/load", dependencies=[AdminDep, OneProcessDep])
async def load(name: str, control: ControlDep) -> Response:
    """Load a model (admin token). While one model is served at a time, it replaces the served one."""
    await control.load(name)
    return Response(status_code=200)


@router.post("/repository/models/{name}/unload", dependencies=[AdminDep])
def unload(name: str, control: ControlDep) -> Response:
    """Unload a model (admin token); the served model cannot be unloaded while it is the only one (409)."""
    control.unload(name)
    return Response(status_code=200)

