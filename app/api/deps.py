"""FastAPI dependencies: the serving state, the served model, admission, the builds, admin authentication.

Those that cannot block are ``async``: FastAPI runs a plain ``def`` dependency on a worker thread, a hop per
request (and, in a Ray Serve replica, a new thread per request: docs/ray.md)."""

from typing import Annotated

from fastapi import Depends, Header, HTTPException, Query, Request

from ..builds.service import Builds
from ..serving.models import ModelSet
from ..serving.budget import Reservation
from ..serving.served import ServedModel
from ..serving.state import ServiceState
from .admin import check_admin


async def get_models(request: Request) -> ModelSet:
    """This worker's model set (it follows the control store; its changes go to every worker)."""
    return request.app.state.service.started_models()


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


async def get_builds(request: Request) -> Builds:
    return request.app.state.builds


async def get_model(request: Request, state: Annotated[ServiceState, Depends(get_state)],
                    model: Annotated[str | None, Query(description="A model of the repository (default: the "
                                                                   "default model); GET /models lists them")] = None):
    """The model asked for (``?model=NAME``, else the default), held until the response is sent: 404 for an
    unknown name (listing the known), 409 for one not loaded (unless autoload), 503 when no default is loaded."""
    async with state.hold(model or None) as served:
        request.scope.setdefault("state", {})["model"] = served.name  # the metrics' model label
        yield served


async def admitted(state: Annotated[ServiceState, Depends(get_state)]):
    """One segmentation in flight, or 503 + Retry-After when ``max_inflight`` are already running: bounded work,
    shedding load instead of queueing without limit."""
    with state.admit() as ok:
        if not ok:
            raise HTTPException(503, detail="the server is busy; retry shortly", headers={"Retry-After": "1"})
        yield


async def pixels(request: Request):
    """This request's share of the decoded-pixel budget (``SEGMENT_MAX_PIXELS_INFLIGHT``), taken from the image
    header before decoding and given back once the response is done."""
    reservation = Reservation(request.app.state.pixels)
    try:
        yield reservation
    finally:
        reservation.release()


def require_admin(state: Annotated[ServiceState, Depends(get_state)],
                  authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> None:
    """The admin token (``admin.AdminGate`` has already checked it, before the body, for every route declaring
    this dependency; checked again here so a route is never open by the gate's omission)."""
    check_admin(state.settings, authorization)


StateDep = Annotated[ServiceState, Depends(get_state)]
BuildsDep = Annotated[Builds, Depends(get_builds)]
ModelDep = Annotated[ServedModel, Depends(get_model)]
ModelsDep = Annotated[ModelSet, Depends(get_models)]
PixelsDep = Annotated[Reservation, Depends(pixels)]
AdminDep = Depends(require_admin)
AdmittedDep = Depends(admitted)
