"""Liveness, readiness, metrics and the active model."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from ..deps import ModelDep, StateDep

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict:
    """The process is up (says nothing about the model)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "No model loaded; `detail` says why"}})
def readyz(state: StateDep):
    """200 when a model is loaded and can serve, else 503."""
    if state.model is None:
        return JSONResponse({"status": "unavailable", "detail": state.problem}, status_code=503)
    return {"status": "ready", "model": state.model.name}


@router.get("/metrics", response_class=Response)
def metrics(state: StateDep):
    """Prometheus metrics: requests by route and status, stage latencies, the active model."""
    body, content_type = state.metrics.exposition()
    return Response(body, media_type=content_type)


@router.get("/models/active", responses={503: {"description": "No model loaded"}})
def active_model(model: ModelDep) -> dict:
    """The served model: backend, device, input contract, classes and metadata."""
    return model.describe()
