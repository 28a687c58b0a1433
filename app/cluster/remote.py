"""The ingress side of Ray mode: a model that runs in the model deployment, and the serving state that holds it.

The FastAPI app, its routes and its pipeline are the embedded service's own: decode, resize and encode run in the
ingress replica on CPU; only the model call crosses to a model replica: ``infer`` with the image as RGB uint8 (a
quarter of the bytes of the float tensor through Ray's object store; the model replica normalises it), or, with
GPU decoding, ``infer_jpeg`` with the JPEG's own bytes.
"""

import contextvars
import logging
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import ray
from ray import serve
from ray.exceptions import RayActorError, RayTaskError

from ..core.config import Settings
from ..core.errors import ModelError, ServiceError, Unavailable
from ..core.metadata import ModelMeta
from ..engines import InputContract, SegmentationModel
from ..serving.served import ServedModel
from ..serving.state import ServiceState

log = logging.getLogger("segment.cluster")

# Which replicas served the current request: set per request by ServedByMiddleware, filled by RemoteModel.ask
# (in a worker thread: the context is copied there, the dict is shared).
SERVED_BY: contextvars.ContextVar[dict | None] = contextvars.ContextVar("served_by", default=None)

MODEL_DEPLOYMENT = "SegmentModel"
CONNECT_PATIENCE_S = 600  # how long an ingress replica waits for the model deployment to answer at all
INGRESS_DEPLOYMENT = "SegmentIngress"
SERVER_DEPLOYMENT = "SegmentServer"  # the fused layout: ingress and runners in one replica


def here() -> dict:
    """This replica and its node, as the response headers name them."""
    context = serve.get_replica_context()
    return {"replica": context.replica_id.unique_id, "node": ray.get_runtime_context().get_node_id()}


def ask(handle, settings: Settings, model: str, method: str, *args):
    """A model replica's answer to ``method(*args)`` for ``model`` (Serve's multiplexed model id). A call whose
    replica is lost (its node gone) is sent again, to another replica, ``ray_retries`` times, then 503 +
    Retry-After; so is one that gets no answer within ``ray_request_timeout_s``: never a hang. Blocking: call it
    from a worker thread."""
    for attempt in range(settings.ray_retries + 1):
        response = getattr(handle.options(multiplexed_model_id=model), method).remote(*args)
        try:
            return response.result(timeout_s=settings.ray_request_timeout_s)
        except TimeoutError:
            response.cancel()
            raise Unavailable(f"no model replica answered within {settings.ray_request_timeout_s:g} s; retry "
                              "shortly") from None
        except RayTaskError as exc:  # the replica raised: our own errors keep their status and words
            if isinstance(exc.cause, ServiceError):
                raise exc.cause from None
            raise
        except RayActorError as exc:
            log.warning("model replica lost (%s), attempt %d of %d", type(exc).__name__, attempt + 1,
                        settings.ray_retries + 1)
    raise Unavailable("the model replica serving this request was lost (its node or process died); retry shortly")


@dataclass
class RemoteModel(SegmentationModel):
    """A model held by the model deployment, as the ingress sees it: the contract, metadata and palette a model
    replica described, and ``infer`` through the deployment handle (model chosen per call by its name, Serve's
    multiplexed model id)."""

    handle: object = None
    settings: Settings = None
    description: dict = field(default_factory=dict)

    @classmethod
    def from_description(cls, desc: dict, path, handle, settings: Settings) -> "RemoteModel":
        inp = desc["input"]
        # The transport contract: RGB uint8 NHWC at the model's size; the replica turns it into the model's input.
        contract = InputContract(inp["name"], np.dtype(np.uint8), (inp["height"], inp["width"]), inp["dynamic_batch"])
        # The model lives in a replica's process: GET /models' memory figures here are the ingress process's own.
        runtime = SimpleNamespace(name=desc["backend"], device=desc["device"], runner=None, device_index=0,
                                  device_bytes=lambda: None, shape_change_is_costly=False, can_bind_gpu_input=False,
                                  release=lambda: None)
        public = {k: v for k, v in desc.items() if k not in ("palette", "served_by")}
        return cls(name=desc["name"], path=path, meta=ModelMeta.model_validate(desc["metadata"]), runtime=runtime,
                   contract=contract, output_kind="labels", num_classes=desc["num_classes"],
                   palette=np.asarray(desc["palette"], np.uint8), handle=handle, settings=settings,
                   description=public)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Labels for ``batch``, one call per image (the model deployment batches them with other requests');
        blocking, so call it from a worker thread."""
        return np.concatenate([self.ask("infer", row[None]) for row in batch])

    def ask(self, method: str, *args):
        """A model replica's answer to ``method(*args)`` for this model, noting which replica gave it."""
        answer, served_by = ask(self.handle, self.settings, self.name, method, *args)
        if (record := SERVED_BY.get()) is not None:
            record.update(served_by)
        return answer

    def describe(self) -> dict:
        return self.description

    def close(self) -> None:  # the model lives in the model deployment
        pass


class RemoteServedModel(ServedModel):
    """A :class:`RemoteModel` as the ingress serves it. With ``SEGMENT_GPU_DECODE`` on a model replica that can
    (nvImageCodec, a raw-pixel model on CUDA), a JPEG of the model's size crosses to the replica as it came (its
    bytes, not 6 MB of pixels), which decodes it on the GPU in a batch with other requests'."""

    def __init__(self, model: RemoteModel):
        super().__init__(model, gpu_decode_on=model.settings.gpu_decode)
        self.can_decode_on_gpu = bool(model.description.get("gpu_decode"))  # the model replica's say

    def infer_jpeg(self, data: bytes) -> np.ndarray | None:
        """Labels from a model replica that decoded the JPEG on the GPU; None (decode it here) when it declined,
        or when it predates ``infer_jpeg`` (a rolling update from an older release)."""
        try:
            return self.model.ask("infer_jpeg", data)
        except RayTaskError as exc:
            if isinstance(exc.cause, AttributeError) and "infer_jpeg" in str(exc.cause):
                log.warning("a model replica has no infer_jpeg (an older release): decoding on the ingress")
                return None
            raise


class ClusterState(ServiceState):
    """The serving state of an ingress replica: the embedded service's own (the control store in the repository,
    a model set following it, admission), except that loading a model means asking the model deployment to
    describe it (a model replica loads it then) and serving a :class:`RemoteModel`.

    Start-up runs in a thread: the model deployment may still be starting, and a blocking call must not wait on
    the replica's event loop. Until the default model is connected ``/readyz`` answers 503 saying why."""

    def __init__(self, settings: Settings, handle):
        super().__init__(settings)
        # Every call to the model deployment blocks a worker thread (``ask``). Serve's throughput-optimized mode
        # (RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0) would put the handle's router on the replica's event loop,
        # which refuses calls from other threads ("No event loop running"): keep it on Serve's router thread.
        if not handle.is_initialized:
            handle._init(_run_router_in_separate_loop=True)
        self.handle = handle
        self.start_error: str | None = None

    def load(self, name: str) -> ServedModel:
        """The model ``name`` as the model deployment serves it; ModelError saying why when it cannot."""
        path = self.repository.path(name)  # 404 for an unknown name, before anything is routed
        deadline = time.monotonic() + CONNECT_PATIENCE_S
        while True:
            try:
                desc = ask(self.handle, self.settings, name, "describe")
                break
            except (Unavailable, ray.exceptions.RayError) as exc:  # the model deployment is (re)starting
                if time.monotonic() > deadline:
                    raise ModelError(f"the model deployment did not answer for {CONNECT_PATIENCE_S} s: {exc}") from None
        if "error" in desc:
            where = desc.get("served_by", {})
            raise ModelError(f"model replica {where.get('replica', '?')} on node {where.get('node', '?')} "
                             f"cannot serve {name!r}: {desc['error']}")
        return RemoteServedModel(RemoteModel.from_description(desc, path, self.handle, self.settings))

    @property
    def problem(self) -> str | None:
        return self.start_error or super().problem

    def start(self) -> None:
        threading.Thread(target=self._start, name="cluster-start", daemon=True).start()

    def _start(self) -> None:
        try:
            super().start()
        except Exception as exc:  # said by /readyz and the log, not lost with the thread
            log.exception("the ingress could not start")
            self.start_error = f"the ingress could not start: {type(exc).__name__}: {exc}"


class ServedByMiddleware:
    """Response headers naming the ingress replica and node, and the model replica and node that ran the model
    and the size of the batch it ran in. ``fused``: the replica runs its models itself, so it is both."""

    def __init__(self, app, fused: bool = False):
        self.app, self.fused = app, fused
        self.ingress = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.ingress is None:
            self.ingress = here()
        record: dict = {}
        token = SERVED_BY.set(record)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"x-ingress-replica", self.ingress["replica"].encode()),
                            (b"x-ingress-node", self.ingress["node"].encode())]
                if self.fused and any(name == b"x-model" for name, _ in headers):  # it ran a model here
                    record.update(self.ingress)
                if record:
                    headers += [(b"x-model-replica", record["replica"].encode()),
                                (b"x-model-node", record["node"].encode())]
                if "batch" in record:  # a model replica of an older release (a rolling update) does not say
                    headers.append((b"x-model-batch", str(record["batch"]).encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, with_headers)
        finally:
            SERVED_BY.reset(token)
