"""The serving state: the model repository, the served model (swapped atomically) and admission."""

import logging
import threading
from contextlib import contextmanager

from ..core.config import Settings
from ..core.errors import MetadataError, ModelError
from ..core.resources import seed_repository
from ..engines import OrtOptions, load_model
from ..repository import ModelRepository
from .metrics import Metrics
from .served import ServedModel

log = logging.getLogger("segment.state")


class ServiceState:
    """Holds the active :class:`ServedModel`; each request holds the one it started with to the end."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None):
        self.settings = settings
        self.repository = ModelRepository(settings.engines_dir)
        self.metrics = metrics or Metrics()
        self.model: ServedModel | None = None
        self.problem: str | None = "not started"
        self._swap = threading.Lock()
        self.bench_lock = threading.Lock()  # one benchmark at a time
        self.inflight = 0

    def load(self, name: str) -> ServedModel:
        """Load a model of the repository with the configured backend and serving options (not yet served)."""
        s = self.settings
        model = load_model(self.repository.path(name), backend=s.backend, ort=OrtOptions.from_settings(s))
        served = ServedModel.serve(model, s.batch_max, s.batch_wait_ms, self.metrics.batch_size.observe, s.gpu_decode)
        if s.gpu_decode and served.decodes_on_gpu:
            log.info("%s: JPEG uploads of %dx%d are decoded on the GPU (nvImageCodec)", name, *model.input_hw[::-1])
        return served

    def activate(self, model: ServedModel) -> None:
        """Serve ``model`` from now on; the previous one finishes its requests, then closes."""
        with self._swap:
            old, self.model, self.problem = self.model, model, None
        self.metrics.set_model(model.describe())
        if old is not None and old is not model:
            old.retire()

    def serves(self, path) -> bool:
        """Whether the model file at ``path`` is the one being served."""
        model = self.model
        return model is not None and model.path.resolve() == path.resolve()

    @contextmanager
    def use_model(self):
        """The served model, held for the duration of one request (None when there is none)."""
        with self._swap:
            model = self.model.acquire() if self.model is not None else None
        try:
            yield model
        finally:
            if model is not None:
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

    def start(self) -> None:
        """Load the configured model, or record in plain words why none can be served."""
        s = self.settings
        seed_repository(s.engines_dir)
        try:
            self.activate(self.load(s.model))
        except (ModelError, MetadataError) as exc:
            self.problem = (f"{exc}. To serve a model, put NAME.onnx (with NAME.json) in {s.engines_dir} and set "
                            f"SEGMENT_MODEL=NAME; export one with `segment export ...`.")
            log.error("no model served: %s", self.problem)
            self.metrics.set_model(None)

    def stop(self) -> None:
        with self._swap:
            model, self.model = self.model, None
        if model is not None:
            model.retire()
