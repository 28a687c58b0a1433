"""The serving state: the model repository, the control store, the models served (a :class:`ModelSet`) and
admission."""

import asyncio
import contextvars
import functools
import hashlib
import logging
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path

from ..core.config import Settings
from ..core.resources import bundled_models, seed_repository
from ..engines import MODEL_SUFFIXES, OrtOptions, load_model
from ..repository import ControlStore, open_repository
from .metrics import Metrics
from .models import ModelSet, NoModel
from .served import ServedModel

log = logging.getLogger("segment.state")


def control_db_path(settings: Settings) -> Path:
    """Where the control store lives: ``SEGMENT_CONTROL_DB``, else ``.control.db`` in the model repository (in the
    temporary folder, named after the repository, when the repository is read-only or the package's own bundled
    models). An object-store repository has no place for it: Settings insist on ``SEGMENT_CONTROL_DB`` then."""
    if settings.control_db:
        return Path(settings.control_db)
    root = Path(settings.engines_dir)
    if root.is_dir() and (not os.access(root, os.W_OK) or root.resolve() == bundled_models().resolve()):
        key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"segment-control-{key}.db"
    return root / ".control.db"


class ServiceState:
    """One worker's serving state: every request holds the model it started with to the end."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None):
        self.settings = settings
        self.repository = open_repository(settings)
        self.metrics = metrics or Metrics()
        self.store: ControlStore | None = None
        self.models: ModelSet | None = None
        self.bench_lock = threading.Lock()  # one benchmark at a time
        self.inflight = 0
        self.pool: ThreadPoolExecutor | None = None  # the request threads, from start() to stop()

    @property
    def model(self) -> ServedModel | None:
        """The default model, when it is loaded in this worker."""
        return self.models.get() if self.models else None

    @property
    def problem(self) -> str | None:
        return self.models.problem if self.models else "not started"

    def load(self, name: str) -> ServedModel:
        """Load a model of the repository with the configured backend and serving options (not yet served).

        With several models loaded, ONNX Runtime's idle threads sleep instead of spinning, so N models do not
        keep N thread pools busy-waiting on the same cores."""
        s = self.settings
        ort = replace(OrtOptions.from_settings(s), spin=len(self.store.desired().loaded | {name}) <= 1)
        model = load_model(self.repository.local_path(name), backend=s.backend, ort=ort)
        served = ServedModel.serve(model, s.batch_max, s.batch_wait_ms, self.metrics.batch_size.observe, s.gpu_decode)
        if served.decodes_on_gpu:
            log.info("%s: JPEG uploads of %dx%d are decoded on the GPU (nvImageCodec)", name, *model.input_hw[::-1])
        return served

    def started_models(self) -> ModelSet:
        """This worker's model set; :class:`NoModel` (503) while it is still starting."""
        if self.models is None:  # still starting (Ray mode starts in a thread)
            raise NoModel(f"no model is loaded: {self.problem}")
        return self.models

    @contextmanager
    def use_model(self, name: str | None = None):
        """The model ``name`` (None: the default), held for the duration of one request."""
        with self.started_models().use(name) as model:
            yield model

    @asynccontextmanager
    async def hold(self, name: str | None = None):
        """:meth:`use_model` for a request on the event loop: a model loaded here is taken at once; an unknown name
        or an autoload (the repository's listing, a load) goes to a request thread."""
        models = self.started_models()
        model = models.acquire(name)
        if model is None:
            got: list[ServedModel] = []
            try:
                await self.run(lambda: got.append(models.acquire_missing(name)))
            except BaseException:
                for held in got:  # cancelled while it loaded (run waits for the thread): let go of it
                    held.release()
                raise
            model = got[0]
        try:
            yield model
        finally:
            model.release()

    @contextmanager
    def admit(self):
        """Count one segmentation request in flight; yields False when ``max_inflight`` are already running."""
        # Only the event loop thread touches the counter, so no lock is needed.
        if self.inflight >= self.settings.max_inflight:
            yield False
            return
        self.inflight += 1
        try:
            yield True
        finally:
            self.inflight -= 1

    async def run(self, fn, /, *args):
        """``fn(*args)``, blocking work of a request (decode, inference, encode), on this worker's request threads;
        context variables (tracing) go with it. A request cancelled meanwhile (its client gone, a timeout) still
        waits for the thread to finish, so that what it holds (its model, its admission, its pixels) is not let go
        of while the work runs."""
        pool = self.pool
        if pool is None:
            raise NoModel(f"no model is loaded: {self.problem}")
        work = asyncio.get_running_loop().run_in_executor(
            pool, functools.partial(contextvars.copy_context().run, fn, *args))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            while not work.done():
                try:
                    await asyncio.wait({work})
                except asyncio.CancelledError:
                    pass
            raise

    def start(self) -> None:
        """Fill an empty repository, clean what a crash left staged, open the control store and load what it
        wants (the default: persisted, else the configured model)."""
        s = self.settings
        # The same few threads for every request, so that what a thread keeps of its own on the GPU (ONNX Runtime's
        # CUDA handles, nvImageCodec's decoders) is made once. anyio's worker threads, FastAPI's default, last one
        # request on an event loop without a root task, as in a Ray Serve replica: there every request paid for a
        # new thread and its GPU handles (docs/ray.md).
        self.pool = ThreadPoolExecutor(s.max_inflight + s.live_max_streams, thread_name_prefix="segment-request")
        seed_repository(s.engines_dir)
        if removed := self.repository.clean_staged():
            log.warning("removed %d staged upload file(s) left by a process that died: %s", len(removed), removed)
        self.store = ControlStore(control_db_path(s))
        self.models = ModelSet(s, self.repository, self.store, self.metrics, self.load)
        configured = s.model
        if (suffix := Path(configured).suffix.lower()) in MODEL_SUFFIXES:
            configured = configured[: -len(suffix)]
        self.models.start(configured)
        if self.model is None:
            self.metrics.set_model(None)

    def stop(self) -> None:
        if self.models is not None:
            self.models.stop()
        if self.pool is not None:
            pool, self.pool = self.pool, None  # a request now answers 503, as before the start
            pool.shutdown(wait=False)
