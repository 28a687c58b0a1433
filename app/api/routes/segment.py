"""POST /segment: an image in, a PNG (mask, overlay or class ids) out."""

from typing import Annotated, Literal

from fastapi import APIRouter, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from ...imaging import ImageError
from ...pipeline import Stopwatch, render, segment_bytes
from ..deps import ModelDep, StateDep

router = APIRouter(tags=["segmentation"])

PNG_RESPONSE = {200: {"content": {"image/png": {}},
                      "description": "The PNG; headers `Server-Timing` and `X-Timing-*-Ms` give per-stage times."}}
ERRORS = {400: {"description": "Corrupt or truncated image, too small, or more than one image"},
          413: {"description": "Upload or image too large"}, 415: {"description": "Not a supported image format"},
          503: {"description": "No model loaded, or too many requests in flight (see Retry-After)"}}


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    """The upload's bytes, refusing with 413 as soon as it passes ``limit``."""
    chunks, size = [], 0
    while chunk := await upload.read(1 << 20):
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, detail=f"upload is larger than the {limit:,}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("/segment", response_class=Response, responses={**PNG_RESPONSE, **ERRORS})
async def segment(
    request: Request,
    state: StateDep,
    model: ModelDep,
    image: Annotated[UploadFile, File(description="The photo: JPEG, PNG, BMP, WebP or TIFF.")],
    view: Annotated[Literal["mask", "overlay", "labels"], Query(
        description="mask: colour mask; overlay: mask blended on the photo; labels: 1-channel PNG of class ids")] = "mask",
    alpha: Annotated[float, Query(ge=0.0, le=1.0, description="Mask weight in the overlay view")] = 0.5,
):
    """Segment one photo. Example: `curl -F image=@street.jpg http://localhost:8000/segment -o mask.png`."""
    s = state.settings
    if len((await request.form()).getlist("image")) != 1:
        raise HTTPException(400, detail="send exactly one file in the `image` field")
    with state.admit() as admitted:
        if not admitted:  # bounded work in flight: shed load instead of queueing without limit
            raise HTTPException(503, detail="the server is busy; retry shortly", headers={"Retry-After": "1"})
        data = await read_upload(image, s.max_upload_bytes)
        try:
            # Decode, inference and encode release the GIL in OpenCV / ONNX Runtime: run them off the event loop.
            seg = await run_in_threadpool(segment_bytes, model, data, s.max_pixels, s.max_dynamic_side, s.min_side)
        except ImageError as exc:
            raise HTTPException(exc.status_code, detail=exc.detail) from None
        watch = Stopwatch()
        png = await run_in_threadpool(render, seg, model, view, alpha, s.png_compression)
        watch.lap("encode")
    timings = {**seg.timings, **watch.timings}
    state.metrics.observe_stages(timings)
    headers = {
        "Server-Timing": ", ".join(f"{k};dur={v:.2f}" for k, v in timings.items()),
        **{f"X-Timing-{k.capitalize()}-Ms": f"{v:.2f}" for k, v in timings.items()},
        "X-Model": model.name,
        "X-Image-Size": f"{seg.labels.shape[1]}x{seg.labels.shape[0]}",
    }
    return Response(png, media_type="image/png", headers=headers)
