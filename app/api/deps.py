"""FastAPI dependencies: the serving state, the served model, admission, the builds, admin authentication."""

import secrets
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from ..builds.service import Builds
from ..serving.served import ServedModel
from ..serving.state import ServiceState


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


def get_builds(request: Request) -> Builds:
    return request.app.state.builds


def get_model(state: Annotated[ServiceState, Depends(get_state)]):
    """The served model, held until the response is sent, or 503 saying why there is none."""
    with state.use_model() as model:
        if model is None:
            raise HTTPException(503, detail=f"no model is loaded: {state.problem}")
        yield model


def admitted(state: Annotated[ServiceState, Depends(get_state)]):
    """One segmentation in flight, or 503 + Retry-After when ``max_inflight`` are already running: bounded work,
    shedding load instead of queueing without limit."""
    with state.admit() as ok:
        if not ok:
            raise HTTPException(503, detail="the server is busy; retry shortly", headers={"Retry-After": "1"})
        yield


def require_admin(state: Annotated[ServiceState, Depends(get_state)],
                  authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> None:
    """``Authorization: Bearer <SEGMENT_ADMIN_TOKEN>``, compared in constant time."""
    s = state.settings
    if s.admin_token is None:
        if s.allow_unauthenticated_admin:
            return
        raise HTTPException(403, detail="admin routes are disabled: set SEGMENT_ADMIN_TOKEN and send "
                                        "'Authorization: Bearer <token>' (or, for local development only, "
                                        "SEGMENT_ALLOW_UNAUTHENTICATED_ADMIN=true)")
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), s.admin_token.get_secret_value().encode()):
        raise HTTPException(401, detail="missing or wrong admin token", headers={"WWW-Authenticate": "Bearer"})


def one_process(state: Annotated[ServiceState, Depends(get_state)]) -> None:
    """409 for a change to state that lives in one worker process (the served model, the build queue) while
    several workers serve: the others would not see it."""
    check_one_process(state.settings.workers)


def check_one_process(workers: int) -> None:
    """:func:`one_process` for a route that knows only from its form whether it changes such state."""
    if (n := workers) > 1:
        raise HTTPException(409, detail=f"this change is not available with {n} worker processes, each with its own "
                                        "model and build queue: build with `segment compile`, switch models by "
                                        "restarting with SEGMENT_MODEL=NAME, or run a single-worker server")


StateDep = Annotated[ServiceState, Depends(get_state)]
BuildsDep = Annotated[Builds, Depends(get_builds)]
ModelDep = Annotated[ServedModel, Depends(get_model)]
AdminDep = Depends(require_admin)
AdmittedDep = Depends(admitted)
OneProcessDep = Depends(one_process)
