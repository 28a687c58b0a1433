"""The FastAPI application: routers, error handlers, middleware, and the lifespan that starts the serving state and
the builds beside it."""

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from .api import errors, tracing
from .api.admin import AdminGate
from .api.deps import require_admin
from .api.limits import BodyLimitMiddleware
from .api.middleware import MetricsMiddleware
from .api.routes import bench, engines, health, live, models, page, segment, v2, video
from .builds.jobs import Runner
from .builds.service import Builds
from .core.config import Settings, get_settings
from .core.resources import web_dir
from .serving.budget import PixelBudget
from .serving.live import LiveStreams
from .serving.state import ServiceState
from .serving.video_jobs import VideoJobs

VERSION = "0.1.0"
DESCRIPTION = """Real-time semantic segmentation with the BiSeNet family.

`curl -F image=@street.jpg http://localhost:8000/segment -o mask.png` returns the colourised mask.
Models run through Polygraphy runners: ONNX Runtime for `.onnx`, TensorRT for engines.
"""


def create_app(settings: Settings | None = None, state: ServiceState | None = None,
               build_runner: Runner | None = None) -> FastAPI:
    """Build the service; the model is loaded in the lifespan, once, and closed at shutdown. ``state``: another
    serving state (Ray mode passes one whose model runs in a model deployment); ``build_runner``: where builds run
    (Ray mode: as Ray tasks; else child processes)."""
    settings = settings or get_settings()
    state = state or ServiceState(settings)
    builds = Builds(state.repository, build_runner)
    video_jobs = VideoJobs(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        builds.start(state.store)
        video_jobs.start()
        grpc_server = None
        if settings.grpc_address:
            from .api import grpc_v2

            grpc_server = await grpc_v2.start(state, settings.grpc_address, VERSION, app.state.pixels)
        yield
        if grpc_server is not None:
            await grpc_server.stop(grace=5)
        video_jobs.stop()
        builds.stop()
        state.stop()
        if app.state.tracing is not None:
            app.state.tracing.shutdown()

    traces = tracing.from_settings(settings, VERSION)
    app = FastAPI(title="bisenet-serve", version=VERSION, description=DESCRIPTION, lifespan=lifespan,
                  telemetry=traces.fastapi_telemetry() if traces is not None else None)
    app.state.service, app.state.builds, app.state.video_jobs = state, builds, video_jobs
    app.state.live_streams = LiveStreams(settings.live_max_streams)
    app.state.pixels = PixelBudget(settings.max_pixels_inflight)
    app.state.templates = Jinja2Templates(directory=web_dir("templates"))
    app.mount("/static", StaticFiles(directory=web_dir("static")), name="static")
    routers = [module.router for module in (segment, video, live, engines, health, models, bench, page, v2)]
    for router in routers:
        app.include_router(router)
    errors.install(app)
    # Outermost last: metrics see every answer; the admin token is checked before the body limits read a byte.
    # Multipart framing adds a little to the file itself; ONNX and video uploads have their own, larger limits.
    own_limits = {"/engines": settings.max_onnx_bytes, "/segment/video": settings.max_video_bytes}
    app.add_middleware(BodyLimitMiddleware, limit_for=lambda path: 65536 + max(
        own_limits.get(path, 0), settings.max_upload_bytes),
        timeout_s=settings.body_timeout_s, idle_timeout_s=settings.body_idle_timeout_s)
    app.add_middleware(AdminGate, routes=[r for router in routers for r in router.routes], settings=settings,
                       marker=require_admin)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.state.tracing = traces
    if traces is not None:
        app.add_middleware(tracing.TracerMiddleware, tracer=traces.tracer)
    return app
