"""FastAPI dependencies for the shared state."""

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from ..runner import SegmentationModel
from ..state import ServiceState


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


def get_model(state: Annotated[ServiceState, Depends(get_state)]) -> SegmentationModel:
    """The served model, or 503 saying why there is none."""
    model = state.model
    if model is None:
        raise HTTPException(503, detail=f"no model is loaded: {state.problem}")
    return model


StateDep = Annotated[ServiceState, Depends(get_state)]
ModelDep = Annotated[SegmentationModel, Depends(get_model)]
