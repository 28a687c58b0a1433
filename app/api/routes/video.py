"""Video jobs over HTTP: POST /segment/video (202), its status, statistics (JSON or CSV), overlay video, label
archive, and DELETE."""

import shutil
from typing import Annotated, Literal

from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, PlainTextResponse, Response

from ...serving.video import FrameStats, probe
from ...serving.video_jobs import VideoJobs
from ..deps import ModelDep, StateDep
from ..uploads import save_upload

router = APIRouter(tags=["video"])

ERRORS = {400: {"description": "Damaged or truncated video, or one without frames"},
          404: {"description": "No such job, or its result is not there (yet)"},
          413: {"description": "Upload, frame size or frame count over the limits"},
          415: {"description": "Not a video, or a codec that cannot be decoded"},
          503: {"description": "No model loaded, or the video queue is full (see Retry-After)"}}


def jobs_of(request: Request) -> VideoJobs:
    return request.app.state.video_jobs


def describe(record: dict) -> dict:
    """A job's record with the links a client follows."""
    base = f"/segment/video/{record['id']}"
    links = {"status_url": base}
    if record["state"] == "done":
        links.update(video_url=f"{base}/video", stats_url=f"{base}/stats")
        if record["options"]["labels"]:
            links["labels_url"] = f"{base}/labels"
    keep = ("id", "state", "frames_done", "frames_total", "fps", "error", "model", "decoder", "created", "started",
            "finished", "source")
    return {**{k: record.get(k) for k in keep}, "job_id": record["id"], **links}


@router.post("/segment/video", status_code=202, responses=ERRORS)
async def submit(
    request: Request,
    state: StateDep,
    model: ModelDep,
    video: Annotated[UploadFile, File(description="The video: MP4, WebM, MOV, MKV or AVI (audio is dropped).")],
    labels: Annotated[bool, Query(description="Also keep every frame's class ids as PNGs in a ZIP (lossless)")] = False,
    alpha: Annotated[float, Query(ge=0.0, le=1.0, description="Mask weight in the overlay video")] = 0.5,
) -> dict:
    """Queue a video: every frame segmented into an overlay video (H.264 MP4), per-frame class shares, and with
    `labels=true` the class ids of every frame. Answers 202 at once; follow `status_url`.
    Example: `curl -F video=@drive.mp4 http://localhost:8000/segment/video`."""
    jobs, s = jobs_of(request), state.settings
    jobs.check_capacity()  # before reading a large upload
    job_id, folder = jobs.new_folder()
    try:
        await save_upload(video, jobs.input_path(job_id), s.max_video_bytes, "video upload")
        info = await run_in_threadpool(probe, jobs.input_path(job_id), s.max_pixels, s.max_video_frames)
        record = jobs.submit(job_id, model, info.as_dict(), alpha, labels, video.filename)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return describe(record)


@router.get("/segment/video/{job_id}", responses=ERRORS)
def status(request: Request, job_id: str) -> dict:
    """`state` (queued, running, done, failed), `frames_done`, `frames_total`, processing `fps`, `error`, and
    when done `video_url`, `stats_url` (and `labels_url`)."""
    return describe(jobs_of(request).status(job_id))


@router.get("/segment/video/{job_id}/stats", responses={200: {"content": {"application/json": {}, "text/csv": {}}},
                                                         **ERRORS})
def stats(request: Request, job_id: str,
          format: Annotated[Literal["json", "csv"], Query(description="json or csv")] = "json") -> Response:
    """Per frame: index, time in seconds, and the fraction of pixels of each class, by name."""
    path = jobs_of(request).result(job_id, "stats")
    if format == "json":
        return Response(path.read_bytes(), media_type="application/json")
    table = FrameStats.load(path)
    return PlainTextResponse(table.csv(), media_type="text/csv",
                             headers={"Content-Disposition": f'attachment; filename="{job_id}.csv"'})


@router.get("/segment/video/{job_id}/video", response_class=FileResponse, responses=ERRORS)
def result_video(request: Request, job_id: str) -> FileResponse:
    """The overlay video (H.264 MP4, plays in browsers; byte ranges served for seeking)."""
    path = jobs_of(request).result(job_id, "video")
    return FileResponse(path, media_type="video/mp4" if path.suffix == ".mp4" else "video/webm",
                        filename=f"{job_id}{path.suffix}", content_disposition_type="inline")


@router.get("/segment/video/{job_id}/labels", response_class=FileResponse, responses=ERRORS)
def result_labels(request: Request, job_id: str) -> FileResponse:
    """Every frame's class ids as a 1-channel PNG (`frame_000000.png`, ...) in a ZIP."""
    return FileResponse(jobs_of(request).result(job_id, "labels"), media_type="application/zip",
                        filename=f"{job_id}-labels.zip")


@router.delete("/segment/video/{job_id}", status_code=204, responses=ERRORS)
def delete(request: Request, job_id: str) -> Response:
    """Cancel the job if it is still queued or running, and delete its files."""
    jobs_of(request).delete(job_id)
    return Response(status_code=204)
