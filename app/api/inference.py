"""The Open Inference Protocol's operations whatever the transport (REST in ``routes/v2.py``, gRPC in
``grpc_v2.py``): a model's metadata, and inference on one request's tensors through the segmentation pipeline.

Tensors: input ``image`` (BYTES [N], encoded images, decoded as ``POST /segment`` decodes them) or ``pixels``
(UINT8 [H,W,3] or [N,H,W,3], RGB); outputs ``labels`` (UINT8, INT32 beyond 256 classes, [N,H,W] at the images'
size) and ``class_shares`` (FP32 [N,C], each class's share of the pixels).
"""

from contextlib import contextmanager

import cv2
import numpy as np

from ..core.errors import ImageError, NotFound
from ..serving.budget import PixelBudget, Reservation
from ..serving.imaging import check_header, check_size
from ..serving.pipeline import Segmentation, segment_bytes, segment_image
from ..serving.served import ServedModel
from ..serving.state import ServiceState
from . import tracing
from .model_control import ModelControl
from .oip import InferRequest, ProtocolError, bytes_elements, numeric

PLATFORMS = {"onnx": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
INPUTS_HINT = "send one input: `image` (BYTES [N], encoded images) or `pixels` (UINT8 [H,W,3] or [N,H,W,3], RGB)"


def check_version(version: str | None) -> None:
    """Every model has the one version "1" (the repository keeps one file per name)."""
    if version not in (None, "", "1"):
        raise NotFound(f"version {version!r} not found: models here have the one version '1'")


def model_metadata(control: ModelControl, name: str) -> dict:
    """Inputs and outputs of any repository model, loaded or not; -1 marks a dimension of any size."""
    facts = control.facts(name)
    classes = facts["num_classes"] or -1
    labels = "INT32" if classes > 256 else "UINT8"
    return {"name": name, "versions": ["1"], "platform": PLATFORMS[facts["kind"]],
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                       {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
            "outputs": [{"name": "labels", "datatype": labels, "shape": [-1, -1, -1]},
                        {"name": "class_shares", "datatype": "FP32", "shape": [-1, classes]}]}


async def infer(state: ServiceState, control: ModelControl, name: str, req: InferRequest,
                raw: dict[str, bytes], budget: PixelBudget) -> dict[str, np.ndarray]:
    """Every output of the model ``name`` for the request's images (the transport picks those asked for). The
    images' pixels are reserved from the decoded-pixel ``budget`` before any is decoded (503 when it is spent)."""
    reservation = Reservation(budget)
    try:
        async with control.use(name) as model:
            images, pixels = input_images(req, raw, state.settings.max_request_images)
            sizes = image_sizes(images, pixels, state.settings)
            reservation.take(sum(width * height for width, height, _ in sizes))
            segs = await state.run(segment_all, model, images, sizes, state.settings, pixels)
            for seg in segs:
                state.metrics.observe_stages(seg.timings)
            tracing.segmentations(segs, model)
            return output_tensors(segs, model)
    finally:
        reservation.release()


def image_sizes(images: list, pixels: bool, settings) -> list[tuple[int, int, str | None]]:
    """(width, height, format) of each request image, within the limits: from its header for encoded bytes (read
    once here, nothing decoded; the format is None for arrays). An image's error names it when there are several."""
    sizes = []
    for i, item in enumerate(images):
        with naming(i, len(images)):
            if pixels:
                check_size(item.shape[1], item.shape[0], settings.max_pixels, settings.min_side)
                sizes.append((int(item.shape[1]), int(item.shape[0]), None))
            else:
                sizes.append(check_header(item, settings.max_pixels, settings.min_side))
    return sizes


def segment_all(model: ServedModel, images: list, sizes: list, settings, pixels: bool) -> list[Segmentation]:
    """The pipeline on each image of one request (``sizes`` from :func:`image_sizes`): encoded bytes decoded like
    ``POST /segment`` uploads, or RGB arrays."""
    results = []
    for i, (item, header) in enumerate(zip(images, sizes)):
        with naming(i, len(images)):
            if pixels:
                seg = segment_image(model, cv2.cvtColor(item, cv2.COLOR_RGB2BGR), settings.max_dynamic_side)
            else:
                seg = segment_bytes(model, item, settings.max_pixels, settings.max_dynamic_side, settings.min_side,
                                    model.decodes_on_gpu, header=header)
        results.append(seg)
    return results


@contextmanager
def naming(index: int, count: int):
    """Prefix an image's error with ``image N:`` when the request holds several."""
    try:
        yield
    except ImageError as exc:
        raise ImageError(exc.status_code, f"image {index}: {exc.detail}" if count > 1 else exc.detail) from None


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
