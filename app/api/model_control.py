"""Model control as the protocol routes see it: which models exist, which are loaded, load and unload.

One adapter over the service's own model control, so the Open Inference Protocol routes never reach into it.
Today the service serves one model at a time: every repository model has metadata, the served one is the one
loaded (and infers), ``load`` activates a model in its place, and the served model cannot be unloaded (load
another instead).
"""

from contextlib import contextmanager
from typing import Iterator

from fastapi.concurrency import run_in_threadpool

from ..core.errors import Conflict, MetadataError, ModelError
from ..core.metadata import load_meta
from ..serving.served import ServedModel
from ..serving.state import ServiceState


class NotLoaded(ModelError):
    """A repository model that is not loaded cannot infer (400, as Triton answers)."""


class ModelControl:
    """Names are repository stems (``camvid_bisenetv2``), as ``/engines`` lists them."""

    def __init__(self, state: ServiceState):
        self.state = state

    def loaded(self, name: str) -> bool:
        model = self.state.model
        return model is not None and model.name == name

    def index(self) -> list[dict]:
        """Every repository model with its state: READY when loaded, else UNAVAILABLE with the reason."""
        return [{"name": e["name"], "version": "1",
                 "state": "READY" if self.loaded(e["name"]) else "UNAVAILABLE",
                 "reason": "" if self.loaded(e["name"]) else (e["problem"] or "not loaded")}
                for e in self.state.repository.list()]

    def facts(self, name: str) -> dict:
        """What metadata tells without loading: kind (onnx or tensorrt) and number of classes (None if unknown);
        the loaded model's own figures where it is loaded. :class:`NotFound` (404) for an unknown name."""
        path = self.state.repository.path(name)
        kind = self.state.repository.describe(path)["kind"]
        model = self.state.model
        if model is not None and model.name == name:
            return {"kind": kind, "num_classes": model.num_classes}
        try:
            num_classes = load_meta(path).num_classes
        except MetadataError:
            num_classes = None
        return {"kind": kind, "num_classes": num_classes}

    @contextmanager
    def use(self, name: str) -> Iterator[ServedModel]:
        """The loaded model ``name``, held for one request; 404 unknown, 400 not loaded, 503 none served."""
        with self.state.use_model() as model:
            if model is None or model.name != name:
                self.state.repository.path(name)  # NotFound (404) when there is no such model at all
                served = f"; the loaded model is {model.name!r}" if model is not None else ""
                raise NotLoaded(f"model {name!r} is not loaded{served}: load it with "
                                f"POST /v2/repository/models/{name}/load")
            yield model

    async def load(self, name: str) -> None:
        """Load ``name`` (it replaces the served model; requests in flight finish on the previous one)."""
        if not self.loaded(name):
            self.state.activate(await run_in_threadpool(self.state.load, name))

    def unload(self, name: str) -> None:
        """Unload ``name``: a model not loaded needs nothing; the served model cannot be left without a successor."""
        self.state.repository.path(name)
        if self.loaded(name):
            raise Conflict(f"{name!r} is the served model and cannot be unloaded: load another model to replace it")
