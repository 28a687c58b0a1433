"""POST /segment: an image in, a PNG (mask, overlay or class ids) out; POST /segment/json for the page."""

import base64
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from ...imaging import ImageError
from ...pipeline import Segmentation, Stopwatch, render, segment_bytes
from ...runner import SegmentationModel
from ...state import ServiceState
from ..deps import ModelDep, StateDep

router = APIRouter(tags=["segmentation"])

PNG_RESPONSE = {200: {"content": {"image/png": {}},
                      "description": "The PNG; headers `Server-Timing` and `X-Timing-*-Ms` give per-stage times."}}
ERRORS = {400: {"description": "Corrupt or truncated image, too small, or more than one image"},
          413: {"description": "Upload or image too large"}, 415: {"description": "Not a supported image format"},
          503: {"description": "No model loaded, or too many requests in flight (see Retry-After)"}}
ImageField = Annotated[UploadFile, File(description="The photo: JPEG, PNG, BMP, WebP or TIFF.")]


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    """The upload's bytes, refusing with 413 as soon as it passes ``limit``."""
    chunks, size = [], 0
    while chunk := await upload.read(1 << 20):
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, detail=f"upload is larger than the {limit:,}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def segment_upload(request: Request, state: ServiceState, model: SegmentationModel,
                         image: UploadFile, photo: bool = False) -> Segmentation:
    """Admission, reading with limits, and the pipeline, off the event loop; HTTP errors for bad input.

    ``photo``: the response shows the photo (the overlay), so it must be decoded on the host."""
    s = state.settings
    if len((await request.form()).getlist("image")) != 1:
        raise HTTPException(400, detail="send exactly one file in the `image` field")
    with state.admit() as admitted:
        if not admitted:  # bounded work in flight: shed load instead of queueing without limit
            raise HTTPException(503, detail="the server is busy; retry shortly", headers={"Retry-After": "1"})
        data = await read_upload(image, s.max_upload_bytes)
        try:
            # Decode, inference and encode release the GIL in OpenCV / ONNX Runtime: run them off the event loop.
            return await run_in_threadpool(segment_bytes, model, data, s.max_pixels, s.max_dynamic_side, s.min_side,
                                           s.gpu_decode and not photo)
        except ImageError as exc:
            raise HTTPException(exc.status_code, detail=exc.detail) from None


async def encode(seg: Segmentation, model: SegmentationModel, view: str, alpha: float, state: ServiceState) -> bytes:
    """Render a view to PNG off the event loop, adding its time to ``seg.timings`` and the metrics."""
    watch = Stopwatch()
    png = await run_in_threadpool(render, seg, model, view, alpha, state.settings.png_compression)
    watch.lap("encode")
    seg.timings["encode"] = seg.timings.get("encode", 0.0) + watch.timings["encode"]
    return png


@router.post("/segment", response_class=Response, responses={**PNG_RESPONSE, **ERRORS})
async def segment(
    request: Request,
    state: StateDep,
    model: ModelDep,
    image: ImageField,
    view: Annotated[Literal["mask", "overlay", "labels"], Query(
        description="mask: colour mask; overlay: mask blended on the photo; labels: 1-channel PNG of class ids")] = "mask",
    alpha: Annotated[float, Query(ge=0.0, le=1.0, description="Mask weight in the overlay view")] = 0.5,
):
    """Segment one photo. Example: `curl -F image=@street.jpg http://localhost:8000/segment -o mask.png`."""
    seg = await segment_upload(request, state, model, image, photo=view == "overlay")
    png = await encode(seg, model, view, alpha, state)
    state.metrics.observe_stages(seg.timings)
    headers = {
        "Server-Timing": ", ".join(f"{k};dur={v:.2f}" for k, v in seg.timings.items()),
        **{f"X-Timing-{k.capitalize()}-Ms": f"{v:.2f}" for k, v in seg.timings.items()},
        "X-Model": model.name,
        "X-Image-Size": f"{seg.labels.shape[1]}x{seg.labels.shape[0]}",
    }
    return Response(png, media_type="image/png", headers=headers)


@router.post("/segment/json", responses=ERRORS)
async def segment_json(request: Request, state: StateDep, model: ModelDep, image: ImageField) -> dict:
    """The mask and class-id PNGs (base64), the classes present with their share of pixels, stage timings and
    the model: everything the upload page shows, from one request."""
    seg = await segment_upload(request, state, model, image)
    mask = await encode(seg, model, "mask", 1.0, state)
    labels = await encode(seg, model, "labels", 1.0, state)
    state.metrics.observe_stages(seg.timings)
    counts = np.bincount(seg.labels.ravel(), minlength=model.num_classes)
    total = int(counts.sum())
    names = model.meta.class_names
    classes = [{"id": i, "name": names[i] if i < len(names) else f"class {i}",
                "color": "#{:02x}{:02x}{:02x}".format(*model.palette[i]), "pixels": int(n),
                "percent": 100.0 * int(n) / total}
               for i, n in sorted(enumerate(counts), key=lambda kv: -kv[1]) if n]
    info = model.describe()
    return {
        "model": {"name": model.name, "backend": model.backend, "device": model.device,
                  "precision": info["precision"], "dataset": model.meta.dataset, "trained": model.meta.trained},
        "width": int(seg.labels.shape[1]), "height": int(seg.labels.shape[0]),
        "timings_ms": seg.timings, "classes": classes,
        "mask_png": base64.b64encode(mask).decode(), "labels_png": base64.b64encode(labels).decode(),
    }
