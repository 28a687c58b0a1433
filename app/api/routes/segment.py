"""POST /segment: an image in, a PNG (mask, overlay or class ids) out; POST /segment/json for the page."""

import base64
import time
from typing import Annotated, Literal

from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.responses import Response

from ...serving.budget import Reservation
from ...serving.imaging import check_header
from ...serving.pipeline import Segmentation, render, segment_bytes
from ...serving.served import ServedModel
from ...serving.state import ServiceState
from .. import tracing
from ..deps import AdmittedDep, ModelDep, PixelsDep, StateDep
from ..uploads import read_one_image

router = APIRouter(tags=["segmentation"], dependencies=[AdmittedDep])

PNG_RESPONSE = {200: {"content": {"image/png": {}},
                      "description": "The PNG; headers `Server-Timing` and `X-Timing-*-Ms` give per-stage times."}}
ERRORS = {400: {"description": "Corrupt or truncated image, too small, or more than one image"},
          413: {"description": "Upload or image too large"}, 415: {"description": "Not a supported image format"},
          503: {"description": "No model loaded, or too many requests or decoded pixels in flight (see Retry-After)"}}
ImageField = Annotated[UploadFile, File(description="The photo: JPEG, PNG, BMP, WebP or TIFF.")]


async def segment_upload(request: Request, state: ServiceState, model: ServedModel, image: UploadFile,
                         pixels: Reservation, photo: bool = False) -> Segmentation:
    """Read the one uploaded image, reserve its pixels from the header (503 when the budget is spent), and run the
    pipeline off the event loop (decode, inference and encode release the GIL in OpenCV and ONNX Runtime).
    ``photo``: the response shows the photo, so it is decoded on the host."""
    s = state.settings
    start = time.perf_counter_ns()
    data = await read_one_image(request, image, s.max_upload_bytes)
    tracing.stage("read", start)
    header = check_header(data, s.max_pixels, s.min_side)  # the header alone: no pixel is decoded yet
    pixels.take(header[0] * header[1])
    return await state.run(segment_bytes, model, data, s.max_pixels, s.max_dynamic_side, s.min_side,
                           model.decodes_on_gpu and not photo, header)


async def encode(seg: Segmentation, model: ServedModel, view: str, alpha: float, state: ServiceState) -> bytes:
    return await state.run(render, seg, model, view, alpha, state.settings.png_compression)


@router.post("/segment", response_class=Response, responses={**PNG_RESPONSE, **ERRORS})
async def segment(
    request: Request,
    state: StateDep,
    model: ModelDep,
    pixels: PixelsDep,
    image: ImageField,
    view: Annotated[Literal["mask", "overlay", "labels"], Query(
        description="mask: colour mask; overlay: mask blended on the photo; labels: 1-channel PNG of class ids")] = "mask",
    alpha: Annotated[float, Query(ge=0.0, le=1.0, description="Mask weight in the overlay view")] = 0.5,
):
    """Segment one photo. Example: `curl -F image=@street.jpg http://localhost:8000/segment -o mask.png`."""
    seg = await segment_upload(request, state, model, image, pixels, photo=view == "overlay")
    png = await encode(seg, model, view, alpha, state)
    state.metrics.observe_stages(seg.timings)
    tracing.segmentations([seg], model)
    headers = {
        "Server-Timing": ", ".join(f"{k};dur={v:.2f}" for k, v in seg.timings.items()),
        **{f"X-Timing-{k.capitalize()}-Ms": f"{v:.2f}" for k, v in seg.timings.items()},
        "X-Model": model.name,
        "X-Image-Size": f"{seg.labels.shape[1]}x{seg.labels.shape[0]}",
    }
    return Response(png, media_type="image/png", headers=headers)


@router.post("/segment/json", responses=ERRORS)
async def segment_json(request: Request, state: StateDep, model: ModelDep, pixels: PixelsDep,
                       image: ImageField) -> dict:
    """The mask and class-id PNGs (base64), the classes present with their share of pixels, stage timings and
    the model: everything the upload page shows, from one request."""
    seg = await segment_upload(request, state, model, image, pixels)
    mask = await encode(seg, model, "mask", 1.0, state)
    labels = await encode(seg, model, "labels", 1.0, state)
    state.metrics.observe_stages(seg.timings)
    tracing.segmentations([seg], model)
    return {
        "model": {"name": model.name, "backend": model.backend, "device": model.device,
                  "precision": model.meta.precision, "dataset": model.meta.dataset, "trained": model.meta.trained},
        "width": int(seg.labels.shape[1]), "height": int(seg.labels.shape[0]),
        "timings_ms": seg.timings, "classes": seg.class_shares(model),
        "mask_png": base64.b64encode(mask).decode(), "labels_png": base64.b64encode(labels).decode(),
    }
