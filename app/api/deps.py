"""FastAPI dependencies for the shared state and admin authentication."""

import secrets
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from ..runner import SegmentationModel
from ..state import ServiceState


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


def get_model(state: Annotated[ServiceState, Depends(get_state)]):
    """The served model, held until the response is sent, or 503 saying why there is none."""
    with state.use_model() as model:
        if model is None:
            raise HTTPException(503, detail=f"no model is loaded: {state.problem}")
        yield model


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


def one_process(state: ServiceState, what: str) -> None:
    """409 where ``what`` would change state that lives in one worker process (the served model, the build
    queue) while several workers serve: the others would not see it."""
    if (n := state.settings.workers) > 1:
        raise HTTPException(409, detail=f"{what} is not available with {n} worker processes, each with its own "
                                        "model and build queue: build with `segment compile`, switch models by "
                                        "restarting with SEGMENT_MODEL=NAME, or run a single-worker server")


StateDep = Annotated[ServiceState, Depends(get_state)]
ModelDep = Annotated[SegmentationModel, Depends(get_model)]
AdminDep = Depends(require_admin)
