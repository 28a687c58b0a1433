"""OpenTelemetry traces (``SEGMENT_TRACING=true``, the ``otel`` extra).

FastAPI's native telemetry makes the server span of each request (continuing an incoming W3C ``traceparent``) and
its operation spans (dependencies, endpoint, serialization); this module gives it a tracer provider whose exporter
comes from the standard variables, and adds a span per stage of the work inside the endpoint's: read, decode,
preprocess, queue (a dynamic batch's wait), inference, postprocess, encode, with the model, the image size and the
batch size as attributes.

Variables: ``OTEL_TRACES_EXPORTER`` (otlp, console or none; otlp by default, over HTTP/protobuf),
``OTEL_EXPORTER_OTLP_*`` (endpoint, headers, timeout), ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``, ``OTEL_PROPAGATORS``, ``OTEL_BSP_*``.

Off by default, and then free: the SDK and the exporter are not imported, no middleware is added, and the calls the
routes make (:func:`stage`, :func:`segmentations`) return at once. (The OpenTelemetry API itself is a dependency of
FastAPI, which imports it in any case.)
"""

import os
import time
from contextvars import ContextVar

from ..core.config import Settings
from ..core.errors import ServiceError
from ..serving.pipeline import Segmentation, epoch_ns

# The tracer of the app serving this request; set only when tracing is on.
_tracer: ContextVar = ContextVar("segment_tracer", default=None)


def stage(name: str, start_perf_ns: int) -> None:
    """A span of the current request from ``start_perf_ns`` (``time.perf_counter_ns``) until now."""
    if (tracer := _tracer.get()) is not None:
        tracer.start_span(name, start_time=epoch_ns(start_perf_ns)).end(end_time=epoch_ns(time.perf_counter_ns()))


def segmentations(segs: list[Segmentation], model) -> None:
    """The pipeline's stages of each image as spans, with the model, image size and batch size."""
    if (tracer := _tracer.get()) is None:
        return
    from opentelemetry import trace

    trace.get_current_span().set_attributes({"segment.model": model.name, "segment.images": len(segs)})
    for seg in segs:
        height, width = seg.labels.shape[:2]
        attributes = {"segment.model": model.name, "segment.backend": model.backend, "segment.image.width": width,
                      "segment.image.height": height, "segment.batch_size": seg.batch_size}
        for name, start, end in seg.spans:
            tracer.start_span(name, start_time=start, attributes=attributes).end(end_time=end)


class Tracing:
    """The tracer provider of one app, its exporter chosen by the ``OTEL_*`` variables."""

    def __init__(self, service_version: str):
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
        except ImportError:
            raise ServiceError("SEGMENT_TRACING=true needs OpenTelemetry's SDK: pip install 'bisenet-serve[otel]'") \
                from None
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "bisenet-serve",
                                    "service.version": service_version})
        self.provider = TracerProvider(resource=resource)
        if (processor := _exporting_processor()) is not None:
            self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("bisenet-serve", service_version)

    def fastapi_telemetry(self) -> dict:
        """FastAPI's ``telemetry`` option: request and operation spans on this provider; metrics stay Prometheus'."""
        return {"tracer_provider": self.provider, "metrics": False, "logs": False}

    def shutdown(self) -> None:
        """Send what is still buffered."""
        self.provider.shutdown()


def _exporting_processor():
    """A batching processor for the exporter ``OTEL_TRACES_EXPORTER`` names (None for ``none``)."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if name == "none":
        return None
    if name == "console":
        return BatchSpanProcessor(ConsoleSpanExporter())
    if name != "otlp":
        raise ServiceError(f"OTEL_TRACES_EXPORTER={name!r}: this service exports traces with otlp, console or none")
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol not in (None, "", "http/protobuf"):
        raise ServiceError(f"OTLP protocol {protocol!r}: this service sends traces over http/protobuf")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return BatchSpanProcessor(OTLPSpanExporter())  # endpoint, headers, timeout: from OTEL_EXPORTER_OTLP_*


class TracerMiddleware:
    """Pure ASGI: makes the app's tracer the one :func:`stage` and :func:`segmentations` use in this request."""

    def __init__(self, app, tracer):
        self.app, self.tracer = app, tracer

    async def __call__(self, scope, receive, send):
        token = _tracer.set(self.tracer)
        try:
            await self.app(scope, receive, send)
        finally:
            _tracer.reset(token)


def from_settings(settings: Settings, service_version: str) -> Tracing | None:
    """The app's tracing when ``settings.tracing`` is on, else None (and nothing of OpenTelemetry's SDK loaded)."""
    return Tracing(service_version) if settings.tracing else None
