"""The model repository over HTTP: list, inspect, register or build, activate, delete."""

import json
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ...builds.options import BuildOptions, check_precision, parse_shape
from ...core.errors import BuildError, Conflict, MetadataError
from ...core.metadata import ModelMeta
from ...repository import check_name
from ..deps import AdminDep, BuildsDep, ModelsDep, StateDep
from ..uploads import read_upload, save_calibration_set

router = APIRouter(prefix="/engines", tags=["engines"])


@router.get("")
def list_engines(state: StateDep) -> dict:
    """Every model in the repository (ONNX and TensorRT), with its metadata; `active` names the served one."""
    model = state.model  # the default model
    active = model.path.name if model else None
    return {"active": active,
            "engines": [{**e, "active": model is not None and e["name"] == model.name} for e in state.repository.list()]}


@router.get("/jobs/{job_id}")
def job(job_id: str, builds: BuildsDep) -> dict:
    """A build job: state (queued, running, succeeded, failed), progress lines, error."""
    return builds.job(job_id).view()  # from the control store: the same whichever worker queued or runs it


@router.get("/{name}")
def get_engine(name: str, state: StateDep) -> dict:
    """One model of the repository."""
    return state.repository.describe(state.repository.path(name))


@router.post("/{name}/activate", dependencies=[AdminDep])
async def activate(name: str, models: ModelsDep) -> dict:
    """Serve `name` by default from now on, in every worker (`POST /models/{name}/default`). Requests in flight
    finish on the previous model; new ones use this one."""
    model = await run_in_threadpool(models.make_default, name)
    return {"active": model.describe()}


@router.delete("/{name}", dependencies=[AdminDep])
async def delete(name: str, state: StateDep, models: ModelsDep) -> dict:
    """Remove a model and its metadata, unloaded in every worker first; the default model cannot be deleted."""
    path = state.repository.path(name)
    state.repository.check_writable()  # before anything is unloaded
    model = state.repository.describe(path)["name"]  # NAME of NAME.onnx or NAME.<gpu-kind>.engine
    if model == models.default:
        raise Conflict(f"{name!r} is being served as the default model; activate another model first")
    await run_in_threadpool(models.unload, model)
    await run_in_threadpool(models.wait_unloaded_everywhere, model)
    files = state.repository.delete(name)
    return {"deleted": path.name, "files": files}


def parse_metadata(text: str | None) -> ModelMeta | None:
    """Metadata sent as JSON with an upload (422 when it is not valid)."""
    if not text:
        return None
    try:
        return ModelMeta.model_validate(json.loads(text))
    except (ValueError, ValidationError) as exc:
        raise MetadataError(f"invalid metadata: {exc}", status_code=422) from None


@router.post("", status_code=202, dependencies=[AdminDep], responses={
    201: {"description": "ONNX model registered as it is for ONNX Runtime (target=onnxruntime, fp32)"},
    202: {"description": "Build queued (a TensorRT engine, or an fp16 or int8 model for ONNX Runtime); poll `status_url`"},
    503: {"description": "TensorRT is not installed on this host (Ray mode: no node has a GPU)"}})
async def create(
    state: StateDep,
    builds: BuildsDep,
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
    shapes = {key: parse_shape(value) for key, value in
              (("min_shape", min_shape), ("opt_shape", opt_shape), ("max_shape", max_shape)) if value}
    check_name(name)
    if (onnx is None) == (source is None):
        raise BuildError("give exactly one of: an `onnx` file upload, or `source` (a registered ONNX name)")
    check_precision(target, precision)
    builds.runner.check_target(target)
    meta = parse_metadata(metadata)
    build = not (target == "onnxruntime" and precision == "fp32")
    if build:
        builds.check_free(name)
    if onnx is not None:
        staged = state.repository.temp_upload()
        try:
            staged.write_bytes(await read_upload(onnx, state.settings.max_onnx_bytes))
            source = f"{name}-source" if build else name
            entry = await run_in_threadpool(builds.register, source, staged, meta)
        finally:
            staged.unlink(missing_ok=True)
        if not build:
            return JSONResponse(entry, status_code=201)
    elif not build:
        raise Conflict(f"{source!r} is already registered for ONNX Runtime; precision=fp16 or int8 builds a copy")
    calib_dir = None
    if precision == "int8":
        if calib_images:
            calib_source = name
            s = state.settings
            await save_calibration_set(state.repository, name, calib_images, s.max_upload_bytes, s.max_pixels,
                                       s.min_side)
        if not calib_source:
            raise BuildError("int8 needs calibration photos: upload `calib_images`, or name a folder under "
                             "engines/calibration with `calib_source`")
        calib_dir = builds.calibration_folder(calib_source)
    options = BuildOptions.parse(target=target, precision=precision, workspace_mb=workspace_mb, calib_dir=calib_dir,
                                 **shapes)
    job = builds.submit(name, source, options)
    return {"job_id": job.id, "status_url": f"/engines/jobs/{job.id}", "state": job.state}
