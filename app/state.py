"""The service's shared state: the served model, swapped atomically, and why none is served."""

import logging
import threading
from pathlib import Path

from .core.config import Settings
from .metadata import MetadataError
from .metrics import Metrics
from .runner import ModelError, SegmentationModel, load_model, resolve_model_path

log = logging.getLogger("segment.state")


class ServiceState:
    """Holds the active :class:`SegmentationModel`; requests take a reference and keep it to the end."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.model: SegmentationModel | None = None
        self.problem: str | None = "not started"
        self._swap = threading.Lock()

    def load(self, path: Path) -> SegmentationModel:
        """Load a model file with the configured backend options (not yet served)."""
        s = self.settings
        return load_model(path, backend=s.backend, providers=s.ort_providers, threads=s.ort_threads)

    def activate(self, model: SegmentationModel) -> None:
        """Serve ``model`` from now on; the previous one is closed once no request holds it."""
        with self._swap:
            old, self.model, self.problem = self.model, model, None
        self.metrics.set_model(model.describe())
        if old is not None and old is not model:
            old.close()

    def start(self) -> None:
        """Load the configured model, or record in plain words why none can be served."""
        s = self.settings
        try:
            self.activate(self.load(resolve_model_path(s.engines_dir, s.model)))
        except (ModelError, MetadataError) as exc:
            self.problem = (f"{exc}. To serve a model, put NAME.onnx (with NAME.json) in {s.engines_dir} and set "
                            f"SEGMENT_MODEL=NAME; export one with `segment export ...`.")
            log.error("no model served: %s", self.problem)
            self.metrics.set_model(None)

    def stop(self) -> None:
        with self._swap:
            model, self.model = self.model, None
        if model is not None:
            model.close()
