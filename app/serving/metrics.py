"""Prometheus metrics, one registry per application instance (so tests can build many apps).

With several worker processes (`segment serve --workers N` sets ``PROMETHEUS_MULTIPROC_DIR``) every process
writes its values to that folder and ``/metrics`` adds them up, whichever worker answers.
"""

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

STAGE_BUCKETS = (0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


class Metrics:
    """Request counts by route and status, stage latency histograms, and the active model."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("segment_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("segment_http_request_duration_seconds", "HTTP request latency by route",
                                 ["route"], registry=self.registry)
        self.stage = Histogram("segment_stage_duration_ms", "Pipeline stage durations in milliseconds",
                               ["stage"], buckets=STAGE_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("segment_batch_size", "Images per runner call with dynamic batching",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        # A gauge rather than an Info, which multiprocess mode lacks: 1 for the model served, 0 for earlier ones.
        self.model = Gauge("segment_active_model_info", "The model being served",
                           ["name", "backend", "device", "output_kind"], multiprocess_mode="max", registry=self.registry)
        self._model_labels: tuple | None = None
        # Per model (the control plane serves several at once): requests and latency of the model routes, the
        # models each worker has loaded ("liveall": one series per live worker, labelled with its pid), and how
        # long after a change in the control store a worker applied it.
        self.model_requests = Counter("segment_model_requests", "Requests to a model by route and status",
                                      ["model", "route", "status"], registry=self.registry)
        self.model_latency = Histogram("segment_model_request_duration_seconds", "Request latency by model",
                                       ["model"], registry=self.registry)
        self.loaded = Gauge("segment_loaded_models", "Models loaded in this worker (1 loaded, 0 unloaded)",
                            ["model"], multiprocess_mode="liveall", registry=self.registry)
        self.reconcile_lag = Histogram("segment_reconcile_lag_seconds", "From a change in the control store to this "
                                       "worker having applied it", buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                       registry=self.registry)

    def observe_stages(self, timings: dict[str, float]) -> None:
        for stage, ms in timings.items():
            self.stage.labels(stage).observe(ms)

    def set_model(self, description: dict | None) -> None:
        if self._model_labels is not None:
            self.model.labels(*self._model_labels).set(0)
        self._model_labels = None
        if description is not None:
            self._model_labels = tuple(str(description[k]) for k in ("name", "backend", "device", "output_kind"))
            self.model.labels(*self._model_labels).set(1)

    def exposition(self) -> tuple[bytes, str]:
        """The text ``/metrics`` returns and its content type: every worker's values in multiprocess mode."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
