"""The two Ray Serve deployments and the application that binds them.

- ``SegmentModel`` holds the runners: one replica per GPU (``num_gpus``, fractions share one) or on CPU; models
  chosen per call by name with ``@serve.multiplexed`` (least recently used unloaded beyond
  ``ray_models_per_replica``); images batched as the embedded server batches them (``batch_max``,
  ``batch_wait_ms``).
- ``SegmentIngress`` serves the project's FastAPI app (every route, the page, the same errors), decoding and
  encoding on CPU. Its replicas follow the control store in the model repository (``?model=``, ``/models`` load,
  unload, default), as the embedded server's workers do; the model replicas load what the store wants. Its
  builds (``POST /engines``) run as Ray tasks (``builds.py``).
- ``SegmentServer`` (``ray_layout="fused"``) instead: the whole app with its own runners in each replica, the
  embedded server's worker on Ray (a fraction of a GPU each): no hop between replicas, Serve still places,
  scales, replaces and routes them.

Settings are the service's own (``SEGMENT_*``), given to every replica as an argument (``env_of``) that it puts in
its environment before it reads them: a Serve config that names ``ray_actor_options`` replaces the options this
module sets, runtime environment included, but never a replica's arguments.
"""

import asyncio
import functools
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import ray
from pydantic import SecretStr
from ray import serve
from ray.util import metrics

from ..core.config import Settings
from ..core.errors import ServiceError
from ..engines import OrtOptions, load_model
from ..main import create_app
from ..repository import ControlStore, open_repository
from ..serving.batching import batch_size, infer_with_batch
from ..serving.pipeline import preprocess
from ..serving.served import ServedModel
from ..serving.state import ServiceState, control_db_path
from .builds import RayRunner
from .remote import (INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT, SERVER_DEPLOYMENT, ClusterState, ServedByMiddleware,
                     here)

log = logging.getLogger("segment.cluster")


class LoadedModel(ServedModel):
    """A model in a replica's multiplexed cache; Serve calls ``__del__`` when it evicts it, and the runner closes
    once the batches still using it are done."""

    on_evict = None  # told when Serve evicts it

    def __del__(self):
        if self.on_evict is not None:
            self.on_evict()
        self.retire()


@serve.deployment(name=MODEL_DEPLOYMENT)
class SegmentModel:
    """Runs models on RGB uint8 images, or on JPEGs it decodes on the GPU, batched with other requests for the same
    model; each answer names the replica and node that ran it.

    Batching is the embedded server's own (``ServedModel.serve``: ``batch_max``, ``batch_wait_ms``), not
    ``@serve.batch``: Ray 2.60's batcher closes a batch when its wait ends even while the previous batch still
    runs, and the closed batches queue for their turn, so under load on a model slower than the wait every batch
    held one image (58 of 58 at 8 clients on CPU; 16 img/s on the H200 padded to 8 rows each). Ours gathers while
    the model is busy: the next batch is whatever arrived meanwhile."""

    async def __init__(self, env: dict[str, str]):
        s = replica_settings(env)
        self.settings, self.repository = s, open_repository(s)
        self.served_by = here()
        # A request waits for its batch in one of these threads: as many as requests the replica takes at once.
        self.pool = ThreadPoolExecutor(max_ongoing(s), thread_name_prefix="segment-model")
        self.batch_size = metrics.Histogram("segment_model_batch_size", "Images per runner call in a model replica",
                                            boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("model",))
        self.cached: set[str] = set()  # the names in Serve's multiplexed cache
        # Serve routes a model's requests to the replicas that hold it, so one without it would sit idle: every
        # replica loads the models the control store wants (the default first) before it takes requests, and
        # follows the store's changes. A failure is logged here and said by ``describe`` (then in /readyz).
        self.store, self.generation = ControlStore(control_db_path(s)), -1
        await self.follow_store(first=s.model)
        self._follower = asyncio.get_running_loop().create_task(self._follow())

    async def follow_store(self, first: str | None = None) -> None:
        """Load what the control store wants (and ``first``) when its generation moved."""
        loop = asyncio.get_running_loop()
        desired = await loop.run_in_executor(None, self.store.desired)
        if desired.generation == self.generation:
            return
        for name in dict.fromkeys(n for n in (first, desired.default, *sorted(desired.loaded)) if n):
            try:
                await loop.run_in_executor(None, self.repository.path, name)  # may list an object store
                await self.model(name)
            except Exception as exc:
                log.error("%s could not be loaded: %s", name, exc)
        self.generation = desired.generation

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(max(self.settings.reconcile_interval_ms, 500) / 1000)
            try:
                await self.follow_store()
            except Exception:  # a busy store: next time
                log.exception("could not read the control store")

    def _open(self, name: str) -> LoadedModel:
        s = self.settings
        model = load_model(self.repository.local_path(name), backend=s.backend, ort=OrtOptions.from_settings(s))
        observe = functools.partial(self.batch_size.observe, tags={"model": name})
        # On ONNX Runtime's CUDA provider this also warms the one batch shape every call is padded to.
        loaded = LoadedModel.serve(model, s.batch_max, s.batch_wait_ms, on_batch=observe, gpu_decode_on=s.gpu_decode)
        loaded.on_evict = functools.partial(self.cached.discard, name)
        self.cached.add(name)
        return loaded

    @serve.multiplexed(max_num_models_per_replica=int(os.environ.get("SEGMENT_RAY_MODELS_PER_REPLICA", "3")))
    async def model(self, name: str) -> LoadedModel:
        return await asyncio.get_running_loop().run_in_executor(None, self._open, name)

    async def _model(self) -> LoadedModel:
        name = serve.get_multiplexed_model_id()
        if name not in self.cached:
            # An unknown name fails here, before the cache evicts anything for it; off the event loop, since an
            # object store's listing may be read on the way
            await asyncio.get_running_loop().run_in_executor(None, self.repository.path, name)
        return await self.model(name)

    async def describe(self) -> dict:
        """The model's description (and palette) for the ingress, or ``error`` saying why it cannot be loaded."""
        try:
            model = await self._model()
        except ServiceError as exc:
            return {"error": exc.detail, "served_by": self.served_by}
        except Exception as exc:  # a load that failed in a way we did not foresee: still said, not hidden
            return {"error": f"{type(exc).__name__}: {exc}", "served_by": self.served_by}
        return {**model.describe(), "palette": model.palette.tolist(), "served_by": self.served_by,
                "gpu_decode": model.decodes_on_gpu}

    async def infer(self, image: np.ndarray) -> tuple[np.ndarray, dict]:
        """Labels [1,H,W] for one RGB uint8 [1,H,W,3] image, run in a batch with others for the same model; with
        the replica and node that ran it and the batch's size."""
        return await self._run(self._labels_of_pixels, image)

    async def infer_jpeg(self, data: bytes) -> tuple[np.ndarray | None, dict]:
        """Labels [1,H,W] for a JPEG of the model's size, decoded on the GPU in a batch with others (None when the
        GPU decoder declines it, or this replica does not decode on the GPU: the ingress decodes it then); with the
        replica, node and batch size."""
        return await self._run(self._labels_of_jpeg, data)

    async def _run(self, step, x) -> tuple:
        """``step(model, x)`` for this request's model in one of the replica's threads; ``model`` is released
        in that thread, not on the event loop: a request cancelled meanwhile must not let an evicted model close
        under its run."""
        model = (await self._model()).acquire()

        def run():
            try:
                return step(model, x)
            finally:
                model.release()

        try:
            work = asyncio.get_running_loop().run_in_executor(self.pool, run)
        except BaseException:
            model.release()
            raise
        labels, batch = await work
        return labels, {**self.served_by, "batch": batch_size(batch)}

    @staticmethod
    def _labels_of_jpeg(model: LoadedModel, jpeg: bytes):
        if not model.decodes_on_gpu:  # replicas may differ: nodes without a decoder
            return None, None
        return infer_with_batch(model.infer_jpeg, jpeg)

    @staticmethod
    def _labels_of_pixels(model: LoadedModel, rgb: np.ndarray):
        """The model's own input from the RGB uint8 image the ingress sent (normalised NCHW for a float model,
        in this request's thread), then its batch: the labels and the batch it ran in."""
        x = rgb if model.uint8_input else preprocess(cv2.cvtColor(rgb[0], cv2.COLOR_RGB2BGR), model, rgb.shape[1:3])
        return infer_with_batch(model.infer, x)


def deployed_settings(env: dict[str, str]) -> Settings:
    """The settings a replica was deployed with (``env``, from :func:`env_of`), put in its environment first so
    that everything in the replica's process, and the processes it starts, reads the same."""
    os.environ.update(env)
    return Settings()


def replica_settings(env: dict[str, str]) -> Settings:
    """The settings of a replica that runs models: with ``SEGMENT_ORT_THREADS`` 0, one ONNX Runtime thread per CPU
    Ray gave it (ONNX Runtime ignores Ray's OMP_* limits and would take every core of the node). Ray's own
    figure, not ``ray_model_cpus``: a Serve config's ``ray_actor_options`` may have set another."""
    s = deployed_settings(env)
    if s.ort_threads:
        return s
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)  # none reserved: one thread
    return s.model_copy(update={"ort_threads": max(1, int(cpus))})


def max_ongoing(settings: Settings) -> int:
    """Requests a model replica takes at once: 8 batches, at least 32 requests. Beyond it Serve's routers hold
    requests and retry with back-off; measured on an H200 with batches of 8 and 32 clients: at 16 (two batches)
    the model call took 168 ms and one replica served 160 img/s, at 64 it took 106 ms at 253 img/s, every batch
    full."""
    return max(32, 8 * settings.batch_max)


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress()
class SegmentIngress:
    """The service's own FastAPI app, its models reached through the model deployment."""

    def __init__(self, model, env: dict[str, str]):  # model: the model deployment's handle (bound)
        self.settings = deployed_settings(env)
        self.state = ClusterState(self.settings, model)

    def __serve_build_asgi_app__(self):  # Serve builds the app on the replica, after __init__
        app = create_app(self.settings, self.state, build_runner=RayRunner())
        app.add_middleware(ServedByMiddleware)
        return app

    def check_health(self):
        """Serve's health check: a replica whose start-up failed is replaced, not kept answering 503."""
        if self.state.start_error:
            raise RuntimeError(self.state.start_error)


@serve.deployment(name=SERVER_DEPLOYMENT)
@serve.ingress()
class SegmentServer:
    """The whole service in one replica, models loaded here (``ray_layout="fused"``): the embedded server's
    worker, placed, scaled and replaced by Serve."""

    def __init__(self, env: dict[str, str]):
        self.settings = replica_settings(env)

    def __serve_build_asgi_app__(self):
        app = create_app(self.settings, ServiceState(self.settings), build_runner=RayRunner())
        app.add_middleware(ServedByMiddleware, fused=True)
        return app


def env_of(settings: Settings) -> dict[str, str]:
    """``settings`` as the ``SEGMENT_*`` variables a replica reads (only those set differently from the defaults
    or present in this environment, so a Serve config file stays the place for the rest)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("SEGMENT_")}
    for name in settings.model_fields_set:
        value, key = getattr(settings, name), f"SEGMENT_{name.upper()}"
        if value is None:  # None is "not set": no variable ("null" would not parse back)
            env.pop(key, None)
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[key] = str(value) if isinstance(value, (str, Path)) else json.dumps(value)
    return env


def application(settings: Settings, ingress_resources: dict | None = None):
    """The Serve application for ``settings``: resources, replicas, autoscaling and batching from them.
    ``ingress_resources``: custom Ray resources the ingress replicas need (e.g. ``{"head": 0.01}`` keeps them on
    the head node)."""
    s = settings
    env = env_of(s)
    # Also as the replicas' variables, for what a replica reads when it imports this module (the multiplexed
    # cache's size, ``ray_models_per_replica``), before its arguments arrive.
    runtime_env = {"env_vars": env}
    scaling = ({"num_replicas": s.ray_min_replicas} if s.ray_min_replicas == s.ray_max_replicas else
               {"autoscaling_config": {"min_replicas": s.ray_min_replicas, "max_replicas": s.ray_max_replicas,
                                       "target_ongoing_requests": s.ray_target_ongoing_requests}})
    runners = {"num_cpus": s.ray_model_cpus, "num_gpus": s.ray_model_gpus, "runtime_env": runtime_env}
    if s.ray_max_replicas_per_node:
        scaling["max_replicas_per_node"] = s.ray_max_replicas_per_node
    if s.ray_layout == "fused":
        return SegmentServer.options(ray_actor_options=runners, max_ongoing_requests=s.max_inflight,
                                     **scaling).bind(env)
    model = SegmentModel.options(ray_actor_options=runners, max_ongoing_requests=max_ongoing(s), **scaling)
    ingress = SegmentIngress.options(
        num_replicas=s.ray_ingress_replicas, max_ongoing_requests=s.max_inflight,
        ray_actor_options={"num_cpus": s.ray_ingress_cpus, "runtime_env": runtime_env,
                           **({"resources": ingress_resources} if ingress_resources else {})})
    return ingress.bind(model.bind(env), env)


def build(args: dict):
    """Application builder for Serve config files (``import_path: app.cluster.deployments:build``): ``args``
    are settings by field name (``model``, ``engines_dir``, ``ray_model_gpus``...); unset ones come from the
    environment."""
    return application(Settings(**(args or {})))
