"""The model repository over HTTP: list, inspect, register or compile, activate, delete."""

import json
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, HTTPException, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ...compiler import ONNXRUNTIME_BUILDS, parse_shape
from ...metadata import MetadataError, ModelMeta
from ...registry import Conflict, NotFound, check_name
from ...runner import IncompatibleEngine, ModelError, TensorRTUnavailable, tensorrt_available
from ..deps import AdminDep, StateDep, one_process
from .segment import read_upload

router = APIRouter(prefix="/engines", tags=["engines"])


def _http(exc: ModelError) -> HTTPException:
    status = 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, (Conflict, IncompatibleEngine)) else \
        503 if isinstance(exc, TensorRTUnavailable) else 400
    return HTTPException(status, detail=str(exc))


async def save_calibration_set(state, name: str, uploads: list[UploadFile]) -> None:
    """Check each upload is a usable image, then store the set as engines/calibration/<name>/."""
    from ...imaging import ImageError, decode

    folder = state.registry.root / "calibration" / name
    if folder.exists():
        raise HTTPException(409, detail=f"a calibration set called {name!r} already exists; use calib_source={name}")
    s, files = state.settings, []
    for i, upload in enumerate(uploads):
        data = await read_upload(upload, s.max_upload_bytes)
        try:
            await run_in_threadpool(decode, data, s.max_pixels, s.min_side)
        except ImageError as exc:
            raise HTTPException(exc.status_code, detail=f"calibration image {i} ({upload.filename}): {exc.detail}") from None
        files.append(data)
    folder.mkdir(parents=True)
    for i, data in enumerate(files):
        (folder / f"{i:04d}.img").write_bytes(data)


@router.get("")
def list_engines(state: StateDep) -> dict:
    """Every model in the repository (ONNX and TensorRT), with its metadata; `active` names the served one."""
    active = state.model.path.name if state.model else None
    return {"active": active, "engines": [{**e, "active": e["file"] == active} for e in state.registry.list()]}


@router.get("/jobs/{job_id}")
def job(job_id: str, state: StateDep) -> dict:
    """A build job: state (queued, running, succeeded, failed), progress lines, error."""
    found = state.jobs.jobs.get(job_id) if state.jobs else None
    if found is None:
        raise HTTPException(404, detail=f"no job {job_id!r}")
    return found.view()


@router.get("/{name}")
def get_engine(name: str, state: StateDep) -> dict:
    """One model of the repository."""
    try:
        return state.registry.describe(state.registry.path(name))
    except ModelError as exc:
        raise _http(exc) from None


@router.post("/{name}/activate", dependencies=[AdminDep])
async def activate(name: str, state: StateDep) -> dict:
    """Serve `name` from now on. Requests in flight finish on the previous model; new ones use this one."""
    one_process(state, "switching models")
    try:
        model = await run_in_threadpool(state.load, name)
    except (ModelError, MetadataError) as exc:
        raise _http(exc) if isinstance(exc, ModelError) else HTTPException(400, detail=str(exc)) from None
    state.activate(model)
    return {"active": model.describe()}


@router.delete("/{name}", dependencies=[AdminDep])
def delete(name: str, state: StateDep) -> dict:
    """Remove a model and its metadata; the served model cannot be deleted."""
    try:
        path = state.registry.path(name)
        if state.model is not None and state.model.path.resolve() == path.resolve():
            raise Conflict(f"{name!r} is being served; activate another model first")
        state.registry.delete(name)
    except ModelError as exc:
        raise _http(exc) from None
    return {"deleted": path.name}


@router.post("", status_code=202, dependencies=[AdminDep], responses={
    201: {"description": "ONNX model registered as it is for ONNX Runtime (target=onnxruntime, fp32)"},
    202: {"description": "Build queued (a TensorRT engine, or an fp16 or int8 model for ONNX Runtime); poll `status_url`"},
    503: {"description": "TensorRT is not installed on this host"}})
async def create(
    state: StateDep,
    name: Annotated[str, Form(description="Name of the new model")],
    onnx: UploadFile | None = None,
    source: Annotated[str | None, Form(description="A registered ONNX model to compile, instead of an upload")] = None,
    target: Annotated[Literal["tensorrt", "onnxruntime"], Form()] = "tensorrt",
    precision: Annotated[Literal["fp32", "fp16", "bf16", "int8"] | None,
                         Form(description="TensorRT: default fp16. ONNX Runtime: fp32 (as uploaded), fp16 (CUDA) or int8")] = None,
    min_shape: Annotated[str | None, Form(description="Dynamic profile minimum, 'batch,height,width'")] = None,
    opt_shape: Annotated[str | None, Form(description="Dynamic profile optimum, 'batch,height,width'")] = None,
    max_shape: Annotated[str | None, Form(description="Dynamic profile maximum, 'batch,height,width'")] = None,
    workspace_mb: Annotated[int | None, Form(gt=0)] = None,
    calib_source: Annotated[str | None, Form(description="int8: calibration image folder name under engines/calibration")] = None,
    calib_images: Annotated[list[UploadFile] | None, File(description="int8: calibration photos, stored as "
                                                          "engines/calibration/<name>")] = None,
    metadata: Annotated[str | None, Form(description="JSON metadata for an uploaded ONNX (dataset, classes, mean/std...)")] = None,
):
    """Register an ONNX model for ONNX Runtime (201), or build a TensorRT engine or an fp16 or int8 ONNX model
    (202 + job)."""
    precision = precision or ("fp16" if target == "tensorrt" else "fp32")
    try:
        shapes = {flag: parse_shape(value) for flag, value in
                  (("--min-shape", min_shape), ("--opt-shape", opt_shape), ("--max-shape", max_shape)) if value}
    except ValueError as exc:
        raise HTTPException(422, detail=f"invalid shape: {exc}") from None
    try:
        check_name(name)
        if (onnx is None) == (source is None):
            raise HTTPException(422, detail="give exactly one of: an `onnx` file upload, or `source` (a registered ONNX name)")
        if target == "onnxruntime" and precision not in ("fp32", *ONNXRUNTIME_BUILDS):
            raise HTTPException(422, detail=f"ONNX Runtime serves fp32, fp16 (CUDA) or int8 models, not {precision} "
                                            "(bf16 is a TensorRT precision)")
        if target == "tensorrt" and not tensorrt_available():
            raise TensorRTUnavailable()
        meta = ModelMeta.model_validate(json.loads(metadata)) if metadata else None
    except ModelError as exc:
        raise _http(exc) from None
    except (ValueError, ValidationError) as exc:
        raise HTTPException(422, detail=f"invalid metadata: {exc}") from None
    build = not (target == "onnxruntime" and precision == "fp32")
    if build:
        one_process(state, "building")

    registry = state.registry
    if onnx is not None:
        staged = registry.temp_upload()
        try:
            staged.write_bytes(await read_upload(onnx, state.settings.max_onnx_bytes))
            src_name = f"{name}-source" if build else name
            entry = await run_in_threadpool(registry.register_onnx, src_name, staged, meta)
        except ModelError as exc:
            raise _http(exc) from None
        finally:
            staged.unlink(missing_ok=True)
        if not build:
            return JSONResponse(entry, status_code=201)
        source = src_name
    try:
        src_path = registry.path(source)
    except ModelError as exc:
        raise _http(exc) from None
    if src_path.suffix != ".onnx":
        raise HTTPException(400, detail=f"source {source!r} is not an ONNX model")
    if not build:
        raise HTTPException(409, detail=f"{source!r} is already registered for ONNX Runtime; "
                                        "precision=fp16 or int8 builds a copy")
    try:
        registry.ensure_free(name)
    except Conflict as exc:
        raise _http(exc) from None
    out = registry.root / f"{name}{'.onnx' if target == 'onnxruntime' else '.engine'}"
    args = ["compile", str(src_path), str(out), f"--{precision}"]
    for flag, value in shapes.items():
        args += [flag, ",".join(map(str, value))]
    if workspace_mb is not None:
        args += ["--workspace-mb", str(workspace_mb)]
    if precision == "int8":
        if calib_images:
            calib_source = name
            await save_calibration_set(state, name, calib_images)
        if not calib_source:
            raise HTTPException(422, detail="int8 needs calibration photos: upload `calib_images`, or name a folder "
                                            "under engines/calibration with `calib_source`")
        try:
            folder = registry.root / "calibration" / check_name(calib_source)
        except ModelError as exc:
            raise _http(exc) from None
        if not folder.is_dir():
            raise HTTPException(404, detail=f"no calibration folder {calib_source!r} under engines/calibration")
        args[-1] = "--int8"
        args.append(str(folder))
    job = state.jobs.submit(name, args)
    return {"job_id": job.id, "status_url": f"/engines/jobs/{job.id}", "state": job.state}
