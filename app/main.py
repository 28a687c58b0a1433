"""The FastAPI application: routers, the model in app state, metrics middleware."""

import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from .api.routes import bench, engines, health, page, segment
from .core.config import PROJECT_ROOT, Settings, get_settings
from .limits import BodyLimitMiddleware
from .state import ServiceState


log = logging.getLogger("segment")

DESCRIPTION = """Real-time semantic segmentation with the BiSeNet family.

`curl -F image=@street.jpg http://localhost:8000/segment -o mask.png` returns the colourised mask.
Models run through Polygraphy runners: ONNX Runtime for `.onnx`, TensorRT for engines.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service; the model is loaded in the lifespan, once, and closed at shutdown."""
    settings = settings or get_settings()
    state = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        yield
        state.stop()

    app = FastAPI(title="bisenet-serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.service = state
    app.state.templates = Jinja2Templates(directory=PROJECT_ROOT / "templates")
    app.mount("/static", StaticFiles(directory=PROJECT_ROOT / "static"), name="static")
    for module in (segment, engines, bench, health, page):
        app.include_router(module.router)
    # Multipart framing adds a little to the file itself; ONNX uploads have their own, larger limit.
    app.add_middleware(BodyLimitMiddleware, limit_for=lambda path: 65536 + (
        max(settings.max_onnx_bytes, settings.max_upload_bytes) if path == "/engines" else settings.max_upload_bytes))

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        state.metrics.requests.labels(request.method, route, str(response.status_code)).inc()
        state.metrics.latency.labels(route).observe(time.perf_counter() - start)
        return response

    return app
