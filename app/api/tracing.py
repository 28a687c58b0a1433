"""OpenTelemetry traces (``SEGMENT_TRACING=true``, the ``otel`` extra): a server span per HTTP request, continued
from an incoming W3C ``traceparent``, with a child span per stage of the work (read, decode, preprocess, queue,
inference, postprocess, encode).

Off by default, and then free: OpenTelemetry is not even imported, no middleware is added, and the calls the routes
make (:func:`stage`, :func:`segmentations`) return at once. The exporter comes from the standard variables:
``OTEL_TRACES_EXPORTER`` (otlp, console or none; otlp by default, over HTTP/protobuf), ``OTEL_EXPORTER_OTLP_*``
(endpoint, headers, timeout), ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and
``OTEL_BSP_*``.
"""

import os
import time
from contextvars import ContextVar

from fastapi import FastAPI

from ..core.config import Settings
from ..core.errors import ServiceError
from ..serving.pipeline import Segmentation, epoch_ns
from .middleware import StatusRecorder

_request: ContextVar["RequestSpan | None"] = ContextVar("segment_request_span", default=None)


def stage(name: str, start_perf_ns: int, **attributes) -> None:
    """A child span of the request's, from ``start_perf_ns`` (``time.perf_counter_ns``) until now."""
    if (request := _request.get()) is not None:
        request.child(name, epoch_ns(start_perf_ns), epoch_ns(time.perf_counter_ns()), attributes)


def segmentations(segs: list[Segmentation], model) -> None:
    """The pipeline's stages of each image as child spans, with the model, image size and batch size."""
    if (request := _request.get()) is None:
        return
    request.span.set_attribute("segment.model", model.name)
    request.span.set_attribute("segment.images", len(segs))
    for seg in segs:
        height, width = seg.labels.shape[:2]
        attributes = {"segment.model": model.name, "segment.backend": model.backend, "segment.image.width": width,
                      "segment.image.height": height, "segment.batch_size": seg.batch_size}
        for name, start, end in seg.spans:
            request.child(name, start, end, attributes)


class RequestSpan:
    """The server span of one request, and how to hang children under it."""

    def __init__(self, tracer, span, context):
        self.tracer, self.span, self.context = tracer, span, context

    def child(self, name: str, start_ns: int, end_ns: int, attributes: dict) -> None:
        span = self.tracer.start_span(name, context=self.context, start_time=start_ns, attributes=attributes)
        span.end(end_time=end_ns)


class Tracing:
    """The tracer provider of one app, its exporter from the ``OTEL_*`` variables."""

    def __init__(self, service_version: str):
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
        except ImportError:
            raise ServiceError("SEGMENT_TRACING=true needs OpenTelemetry: pip install 'bisenet-serve[otel]'") from None
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "bisenet-serve",
                                    "service.version": service_version})
        self.provider = TracerProvider(resource=resource)
        if (processor := _exporting_processor()) is not None:
            self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("bisenet-serve", service_version)

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


class TracingMiddleware:
    """Pure ASGI: the server span of each HTTP request, current while the request runs."""

    def __init__(self, app, tracing: Tracing):
        from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.app, self.tracer = app, tracing.tracer
        self.propagator = TraceContextTextMapPropagator()
        self._kind, self._error, self._in_context = SpanKind.SERVER, Status(StatusCode.ERROR), set_span_in_context

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method = scope["method"]
        span = self.tracer.start_span(f"{method} {scope['path']}", context=self.propagator.extract(headers),
                                      kind=self._kind, attributes={"http.request.method": method,
                                                                   "url.path": scope["path"]})
        token = _request.set(RequestSpan(self.tracer, span, self._in_context(span)))
        recorder = StatusRecorder(send)
        try:
            await self.app(scope, receive, recorder)
        except Exception as exc:
            span.record_exception(exc)
            raise
        finally:
            if (route := getattr(scope.get("route"), "path", None)) is not None:
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", recorder.status)
            if recorder.status >= 500:
                span.set_status(self._error)
            span.end()
            _request.reset(token)


def install(app: FastAPI, settings: Settings) -> Tracing | None:
    """Trace ``app`` when ``settings.tracing`` is on (add this middleware last: it must see the whole request)."""
    if not settings.tracing:
        return None
    tracing = Tracing(app.version)
    app.add_middleware(TracingMiddleware, tracing=tracing)
    return tracing
