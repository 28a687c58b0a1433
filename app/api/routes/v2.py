"""The Open Inference Protocol v2 over REST (KServe v2, Triton's HTTP API), beside the service's own routes: the
tensors of ``api/inference.py`` in the JSON encoding or as binary data, errors as ``{"error": "..."}``."""

import json
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from .. import inference, tracing
from ..deps import AdminDep, AdmittedDep, StateDep
from ..inference import check_version
from ..model_control import ModelControl
from ..oip import ProtocolError, V2Route, encode_response, error, read_request

router = APIRouter(prefix="/v2", tags=["open inference protocol"], route_class=V2Route)


async def model_control(state: StateDep) -> ModelControl:
    return ModelControl(state)


ControlDep = Annotated[ModelControl, Depends(model_control)]


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
    return inference.model_metadata(control, name)


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
def model_ready(name: str, control: ControlDep, version: str | None = None):
    """200 when the model is loaded in this worker; 400 when it exists but is not; 404 when there is no such model."""
    check_version(version)
    control.facts(name)
    if not control.loaded(name):
        return error(400, f"model {name!r} is not loaded")
    return {"name": name, "ready": True}


@router.post("/models/{name}/infer", dependencies=[AdmittedDep])
@router.post("/models/{name}/versions/{version}/infer", dependencies=[AdmittedDep])
async def infer(name: str, request: Request, state: StateDep, control: ControlDep, version: str | None = None):
    """Segment the images of one request: JSON tensors, or binary tensor data after a JSON header of
    `Inference-Header-Content-Length` bytes."""
    check_version(version)
    start = time.perf_counter_ns()
    req, raw = await read_request(request)
    tracing.stage("read", start)
    outputs = await inference.infer(state, control, name, req, raw, request.app.state.pixels)
    start = time.perf_counter_ns()
    response = encode_response(name, req, outputs)
    tracing.stage("encode", start)
    return response


@router.post("/repository/index", dependencies=[AdminDep])
async def repository_index(request: Request, control: ControlDep) -> list[dict]:
    """Every repository model with its state (READY or UNAVAILABLE); `{"ready": true}` lists only the loaded."""
    body = (await request.body()).strip() or b"{}"
    try:
        ready_only = bool(json.loads(body).get("ready", False))
    except (ValueError, AttributeError):
        raise ProtocolError('the index request is empty or a JSON object such as {"ready": true}') from None
    return [m for m in control.index() if not ready_only or m["state"] == "READY"]


@router.post("/repository/models/{name}/load", dependencies=[AdminDep])
async def load(name: str, control: ControlDep) -> Response:
    """Load a model in every worker, beside those loaded (admin token; as `POST /models/{name}/load`)."""
    await control.load(name)
    return Response(status_code=200)


@router.post("/repository/models/{name}/unload", dependencies=[AdminDep])
async def unload(name: str, control: ControlDep) -> Response:
    """Unload a model in every worker (admin token; as `POST /models/{name}/unload`); 409 for the default model."""
    await control.unload(name)
    return Response(status_code=200)

