"""The service's shared state: the model repository, the served model (swapped atomically), build jobs."""

import logging
import threading
from contextlib import contextmanager

from . import gpu_decode
from .core.config import Settings
from .jobs import JobQueue
from .metadata import MetadataError
from .metrics import Metrics
from .onnxrt import OrtOptions
from .registry import Registry
from .runner import ModelError, SegmentationModel, load_model

log = logging.getLogger("segment.state")


class ServiceState:
    """Holds the active :class:`SegmentationModel`; each request holds the one it started with to the end."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.registry = Registry(settings.engines_dir)
        self.metrics = Metrics()
        self.model: SegmentationModel | None = None
        self.problem: str | None = "not started"
        self._swap = threading.Lock()
        self.jobs: JobQueue | None = None
        self.bench_lock = threading.Lock()  # one benchmark at a time
        self.inflight = 0

    def load(self, name: str) -> SegmentationModel:
        """Load a model of the repository with the configured backend options (not yet served)."""
        s = self.settings
        model = load_model(self.registry.path(name), backend=s.backend, ort=OrtOptions.from_settings(s))
        model.enable_batching(s.batch_max, s.batch_wait_ms, self.metrics.batch_size.observe)
        if s.gpu_decode and model.decodes_on_gpu:
            gpu_decode.warm(*model.input_hw)  # the decoders' first runs now, not on the first requests
            log.info("%s: JPEG uploads of %dx%d are decoded on the GPU (nvImageCodec)", name, *model.input_hw[::-1])
        return model

    def activate(self, model: SegmentationModel) -> None:
        """Serve ``model`` from now on; the previous one finishes its requests, then closes."""
        with self._swap:
            old, self.model, self.problem = self.model, model, None
        self.metrics.set_model(model.describe())
        if old is not None and old is not model:
            old.retire()

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
        self.jobs = JobQueue()
        try:
            self.activate(self.load(s.model))
        except (ModelError, MetadataError) as exc:
            self.problem = (f"{exc}. To serve a model, put NAME.onnx (with NAME.json) in {s.engines_dir} and set "
                            f"SEGMENT_MODEL=NAME; export one with `segment export ...`.")
            log.error("no model served: %s", self.problem)
            self.metrics.set_model(None)

    def stop(self) -> None:
        if self.jobs is not None:
            self.jobs.stop()
        with self._swap:
            model, self.model = self.model, None
        if model is not None:
            model.retire()
