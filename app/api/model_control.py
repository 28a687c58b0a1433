"""Model control as the protocol routes see it: which models exist, which are loaded, load and unload.

One adapter over the service's own model control (``serving.models.ModelSet``, kept in step across workers by the
control store), so the Open Inference Protocol's transports never reach into it: every repository model has
metadata; ``load`` loads a model beside the others in every worker (``POST /models/{name}/load``), ``unload``
unloads it (``POST /models/{name}/unload``; the default model cannot be); inference uses a loaded model by name
(404 unknown; 409 not loaded, unless ``SEGMENT_AUTOLOAD`` loads it).
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi.concurrency import run_in_threadpool

from ..core.errors import MetadataError
from ..core.metadata import load_meta
from ..serving.served import ServedModel
from ..serving.state import ServiceState


class ModelControl:
    """Names are repository stems (``camvid_bisenetv2``), as ``GET /models`` lists them. States are this worker's."""

    def __init__(self, state: ServiceState):
        self.state, self.models = state, state.models

    def loaded(self, name: str) -> bool:
        return self.models.get(name) is not None

    def index(self) -> list[dict]:
        """Every repository model with its state here: READY loaded, LOADING, else UNAVAILABLE with the reason."""
        states = self.models.states()
        names = {"loaded": "READY", "loading": "LOADING"}
        return [{"name": e["name"], "version": "1",
                 "state": names.get(states.get(e["name"], {}).get("state"), "UNAVAILABLE"),
                 "reason": states.get(e["name"], {}).get("error") or e["problem"] or
                 ("" if e["name"] in states else "not loaded")}
                for e in self.state.repository.list()]

    def facts(self, name: str) -> dict:
        """What metadata tells without loading: kind (onnx or tensorrt) and number of classes (None if unknown);
        the loaded model's own figures where it is loaded. :class:`NotFound` (404) for an unknown name."""
        path = self.state.repository.path(name)
        kind = self.state.repository.describe(path)["kind"]
        if (model := self.models.get(name)) is not None:
            return {"kind": kind, "num_classes": model.num_classes}
        try:
            num_classes = load_meta(path).num_classes
        except MetadataError:
            num_classes = None
        return {"kind": kind, "num_classes": num_classes}

    @asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[ServedModel]:
        """The model ``name``, held for one request (the control plane's 404, 409 and autoload)."""
        async with self.state.hold(name) as model:
            yield model

    async def load(self, name: str) -> None:
        """Load ``name`` in every worker, beside the models already loaded."""
        await run_in_threadpool(self.models.load, name)

    async def unload(self, name: str) -> None:
        """Unload ``name`` in every worker (409 for the default model)."""
        await run_in_threadpool(self.models.unload, name)
