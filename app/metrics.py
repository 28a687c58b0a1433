"""Prometheus metrics, one registry per application instance (so tests can build many apps)."""

from prometheus_client import CollectorRegistry, Counter, Histogram, Info

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
        self.model = Info("segment_active_model", "The model being served", registry=self.registry)

    def observe_stages(self, timings: dict[str, float]) -> None:
        for stage, ms in timings.items():
            self.stage.labels(stage).observe(ms)

    def set_model(self, description: dict | None) -> None:
        if description is None:
            self.model.info({"name": "", "backend": "", "device": ""})
        else:
            self.model.info({k: str(description[k]) for k in ("name", "backend", "device", "output_kind")})
