"""The FastAPI application: routers, error handlers, middleware, and the lifespan that starts the serving state and
the builds beside it."""

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from .api import errors
from .api.admin import AdminGate
from .api.deps import require_admin
from .api.limits import BodyLimitMiddleware
from .api.middleware import MetricsMiddleware
from .api.routes import bench, engines, health, models, page, segment
from .builds.service import Builds
from .core.config import Settings, get_settings
from .core.resources import web_dir
from .serving.budget import PixelBudget
from .serving.state import ServiceState

DESCRIPTION = """Real-time semantic segmentation with the BiSeNet family.

`curl -F image=@street.jpg http://localhost:8000/segment -o mask.png` returns the colourised mask.
Models run through Polygraphy runners: ONNX Runtime for `.onnx`, TensorRT for engines.
"""


def create_app(settings: Settings | None = None, state: ServiceState | None = None) -> FastAPI:
    """Build the service; the model is loaded in the lifespan, once, and closed at shutdown. ``state``: another
    serving state (Ray mode passes one whose model runs in a model deployment)."""
    settings = settings or get_settings()
    state = state or ServiceState(settings)
    builds = Builds(state.repository)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        builds.start(state.store)
        yield
        builds.stop()
        state.stop()

    app = FastAPI(title="bisenet-serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.service, app.state.builds = state, builds
    app.state.pixels = PixelBudget(settings.max_pixels_inflight)
    app.state.templates = Jinja2Templates(directory=web_dir("templates"))
    app.mount("/static", StaticFiles(directory=web_dir("static")), name="static")
    routers = [module.router for module in (segment, engines, health, models, bench, page)]
    for router in routers:
        app.include_router(router)
    errors.install(app)
    # Outermost last: metrics see every answer; the admin token is checked before the body limits read a byte.
    # Multipart framing adds a little to the file itself; ONNX uploads have their own, larger limit.
    app.add_middleware(BodyLimitMiddleware, limit_for=lambda path: 65536 + (
        max(settings.max_onnx_bytes, settings.max_upload_bytes) if path == "/engines" else settings.max_upload_bytes),
        timeout_s=settings.body_timeout_s, idle_timeout_s=settings.body_idle_timeout_s)
    app.add_middleware(AdminGate, routes=[r for router in routers for r in router.routes], settings=settings,
                       marker=require_admin)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app
