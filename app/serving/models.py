"""The models one worker process serves, kept in step with the control store (``repository.control``).

A :class:`ModelSet` holds several :class:`ServedModel` by name and a default. A background thread compares the
store's generation with the last one applied (every ``reconcile_interval_ms``) and, when it moved, loads the models
wanted (outside any lock a request takes), makes the default current and retires the models no longer wanted.
Requests hold the model they started with (its reference count) to the end, so a swap or an unload never cuts one
short. What this worker has loaded, is loading or failed to load (with the reason) is written back to the store for
the admin view (``GET /models``).
"""

import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Callable

from ..core.config import Settings
from ..core.errors import Conflict, ModelError, NotFound, ServiceError
from ..engines import OrtOptions
from ..engines.memory import load_device_bytes, process_gpu_bytes, rss_bytes
from ..repository import ControlStore, ModelRepository
from .metrics import Metrics
from .served import ServedModel

log = logging.getLogger("segment.models")


class NoModel(ServiceError):
    """No default model is loaded in this worker (503; the detail says why)."""

    status_code = 503


class ModelSet:
    """Several served models by name, reconciled to the control store; ``loader(name)`` loads one (not yet served)."""

    def __init__(self, settings: Settings, repository: ModelRepository, store: ControlStore, metrics: Metrics,
                 loader: Callable[[str], ServedModel]):
        self.settings, self.repository, self.store, self.metrics = settings, repository, store, metrics
        self.loader = loader
        self.pid = os.getpid()
        self._models: dict[str, ServedModel] = {}
        # what each load took: host RSS growth and GPU memory (approximate: other threads run meanwhile)
        self._memory: dict[str, dict] = {}
        self._cuda_device = OrtOptions.from_settings(settings).cuda_device
        self._failed: dict[str, str] = {}  # name -> why it could not be loaded here
        self._loading: set[str] = set()
        self._last_used: dict[str, float] = {}
        self._default: str | None = None
        self.problem: str | None = "not started"
        self.generation = -1  # the store generation applied last
        self._lock = threading.Lock()  # guards the dicts above; never held during a load or inference
        self._apply = threading.RLock()  # one load / reconcile sequence at a time in this process
        self._wake, self._stopping = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    # ---- what requests see ---------------------------------------------------------------------------------

    @property
    def default(self) -> str | None:
        return self._default

    def get(self, name: str | None = None) -> ServedModel | None:
        """The loaded model ``name`` (default: the default), not held; None when it is not loaded here."""
        with self._lock:
            return self._models.get(name or self._default or "")

    def loaded(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    @contextmanager
    def use(self, name: str | None = None):
        """The model ``name`` (None: the default), held for one request: 404 for a name the repository does not
        have (listing the known ones), 409 for one not loaded (unless autoload is on: then it is loaded now)."""
        model = self.acquire(name)
        if model is None:
            model = self.acquire_missing(name)
        try:
            yield model
        finally:
            model.release()

    def acquire(self, name: str | None) -> ServedModel | None:
        """The model ``name`` (None: the default) held for the caller, when this worker has it loaded; else None.
        Waits for nothing but a lock (safe on the event loop)."""
        with self._lock:
            key = name or self._default
            model = self._models.get(key) if key else None
            if model is not None:
                self._last_used[key] = time.monotonic()
                return model.acquire()
        return None

    def acquire_missing(self, name: str | None) -> ServedModel:
        """The model ``name`` held when :meth:`acquire` found none: loaded now with autoload, else the error that
        says why not. May block (the repository's listing, a load)."""
        if name is None:
            raise NoModel(f"no model is loaded: {self.problem}")
        self.check_known(name)
        if self.settings.autoload:
            self.load(name)
            self._evict(keep=name)
            if (model := self.acquire(name)) is not None:
                return model
        why = f" (loading failed in this worker: {self._failed[name]})" if name in self._failed else ""
        raise Conflict(f"model {name!r} is not loaded{why}; load it with POST /models/{name}/load (admin token), or "
                       "set SEGMENT_AUTOLOAD=true to load models on first use")

    def check_known(self, name: str) -> None:
        """:class:`NotFound` naming the known models when the repository has no model ``name``."""
        known = [m["name"] for m in self.repository.list()]
        if name not in known:
            raise NotFound(f"no model called {name!r}; known models: {', '.join(known) or 'none'}")

    # ---- changes (the API calls these; each writes the store, which the other workers follow) --------------

    def load(self, name: str) -> ServedModel:
        """Load ``name`` here first (so a model that cannot load is refused with its reason and nothing changes),
        then want it loaded everywhere."""
        self.check_known(name)
        with self._apply:
            model = self._load_here(name, raise_errors=True)
            self.store.load(name)
        self._report()
        return model

    def make_default(self, name: str) -> ServedModel:
        """Serve ``name`` by default from now on, in every worker; requests in flight finish on their model."""
        self.check_known(name)
        with self._apply:
            model = self._load_here(name, raise_errors=True)
            self.store.set_default(name)
            self._set_default(name)
        self._report()
        return model

    def unload(self, name: str) -> None:
        """Unload ``name`` everywhere (409 for the default)."""
        self.check_known(name)
        self.store.unload(name)
        self.reconcile()

    def wait_unloaded_everywhere(self, name: str, timeout_s: float = 5.0) -> bool:
        """Whether, within ``timeout_s``, no live worker reports ``name`` loaded."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not any(r["model"] == name and r["state"] in ("loaded", "loading") for r in self.store.workers()):
                return True
            time.sleep(0.05)
        return False

    def _evict(self, keep: str) -> None:
        """Autoload's LRU: unload, everywhere, the least recently used models beyond ``max_loaded_models`` (never
        the default, nor ``keep``)."""
        desired = self.store.desired()
        extra = len(desired.loaded) - self.settings.max_loaded_models
        candidates = sorted((n for n in desired.loaded if n not in (desired.default, keep)),
                            key=lambda n: self._last_used.get(n, 0.0))
        for name in candidates[:max(extra, 0)]:
            log.info("autoload: unloading %s, the least recently used of %d models", name, len(desired.loaded))
            self.store.unload(name)
        if extra > 0:
            self.reconcile()

    # ---- reconciling -------------------------------------------------------------------------------------

    def start(self, configured: str) -> None:
        """Pick the default (persisted, or the configured model), load what the store wants, then follow it."""
        available = [m["name"] for m in self.repository.list()]
        default, why = self.store.choose_default(configured, available)
        if default is None:
            try:
                reason = f"{self.repository.path(configured).name} is not usable"
            except ModelError as exc:  # the repository's own words: no such model, an invalid name
                reason = str(exc)
            self.problem = (f"{reason}. To serve a model, put NAME.onnx (with NAME.json) in {self.settings.engines_dir}"
                            " and set SEGMENT_MODEL=NAME; export one with `segment export ...`.")
            log.error("no model served: %s", self.problem)
        elif default != configured:
            log.warning("serving %s by default: %s (SEGMENT_MODEL=%s)", default, why, configured)
        self.reconcile()
        self._thread = threading.Thread(target=self._follow, name="model-reconcile", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        interval = self.settings.reconcile_interval_ms / 1000
        while not self._stopping.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            try:
                self.reconcile()
            except Exception:  # a locked or unreadable store: try again next tick, keep serving meanwhile
                log.exception("reconcile failed; serving on with the models loaded")

    def reconcile(self) -> None:
        """Apply the store's desired state if its generation moved since the last time."""
        if self.store.generation() == self.generation:
            return
        with self._apply:
            desired = self.store.desired()
            if desired.generation == self.generation:
                return
            first = self.generation < 0
            for name in sorted(desired.loaded - set(self.loaded())):
                if self._stopping.is_set():
                    return
                self._load_here(name)
            if desired.default and self.get(desired.default) is not None:
                self._set_default(desired.default)
            elif desired.default:
                self.problem = f"the default model {desired.default!r} failed to load: {self._failed.get(desired.default)}"
            for name in set(self.loaded()) - desired.loaded:
                self._drop(name)
            with self._lock:  # failures of models no longer wanted are forgotten; others are retried next change
                self._failed = {n: why for n, why in self._failed.items() if n in desired.loaded}
            self.generation = desired.generation
            if not first:
                self.metrics.reconcile_lag.observe(max(time.time() - desired.changed_at, 0.0))
        self._report()

    def _load_here(self, name: str, raise_errors: bool = False) -> ServedModel | None:
        """Load ``name`` in this worker unless it is loaded; a failure is recorded with its reason (and raised
        with ``raise_errors``)."""
        if (model := self.get(name)) is not None:
            return model
        with self._lock:
            self._loading.add(name)
            self._failed.pop(name, None)
        self._report()
        host_before, gpu_before = rss_bytes(), process_gpu_bytes(self.pid, self._cuda_device)
        try:
            model = self.loader(name)
        except (ServiceError, OSError) as exc:
            with self._lock:
                self._failed[name] = str(exc)
            log.error("%s could not be loaded: %s", name, exc)
            if raise_errors:
                raise
            return None
        finally:
            with self._lock:
                self._loading.discard(name)
        try:
            device_bytes = load_device_bytes(model, self.pid, gpu_before)
        except Exception:  # a figure, never a reason to lose a loaded model
            log.exception("GPU memory of %s could not be read", name)
            device_bytes = None
        memory = {"memory_bytes": max(rss_bytes() - host_before, 0), "device_bytes": device_bytes}
        with self._lock:
            self._models[name], self._memory[name] = model, memory
        self.metrics.loaded.labels(name).set(1)
        log.info("%s loaded (%s on %s)", name, model.backend, model.device)
        return model

    def _set_default(self, name: str) -> None:
        with self._lock:
            self._default, self.problem = name, None
            model = self._models[name]
        self.metrics.set_model(model.describe())

    def _drop(self, name: str) -> None:
        with self._lock:
            model = self._models.pop(name, None)
            self._memory.pop(name, None)
        if model is not None:
            self.metrics.loaded.labels(name).set(0)
            model.retire()  # closes once its last request has released it
            log.info("%s unloaded", name)

    def states(self) -> dict[str, dict]:
        """This worker's models: loaded, loading, or failed with the reason."""
        with self._lock:
            rows = {n: {"state": "loaded", **self._memory.get(n, {})} for n in self._models}
            rows.update({n: {"state": "loading"} for n in self._loading})
            rows.update({n: {"state": "failed", "error": why} for n, why in self._failed.items()})
        return rows

    def _report(self) -> None:
        try:
            self.store.report(self.pid, self.states(), self.generation, self._default)
        except Exception:  # the admin view is late; serving goes on
            log.exception("could not report this worker's models to the control store")

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            models, self._models, self._default = list(self._models.values()), {}, None
        for model in models:
            model.retire()
        try:
            self.store.forget_worker(self.pid)
        except Exception:
            log.exception("could not remove this worker from the control store")
