"""OpenTelemetry traces, read back from the SDK's in-memory exporter: the request span continues an incoming W3C
trace, each stage is a child of it, with the model, image size and batch size; off, OpenTelemetry is not loaded."""

import base64
import subprocess
import sys

import pytest

from .models import ROOT, make_client, png_bytes, quadrants, rgb_model

pytest.importorskip("opentelemetry.sdk", reason="the otel extra (in the dev extra) is not installed")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}


@pytest.fixture
def traced(engines, monkeypatch):
    """A traced service (no exporter of its own: OTEL_TRACES_EXPORTER=none) whose spans land in memory."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")

    def start(**settings):
        rgb_model(engines / "rgb.onnx", height="H", width="W")
        client = make_client(engines, "rgb", tracing=True, **settings)
        exporter = InMemorySpanExporter()
        client.app.state.tracing.provider.add_span_processor(SimpleSpanProcessor(exporter))
        return client, exporter

    return start


def by_name(spans) -> dict:
    return {s.name: s for s in spans}


def test_segment_request_span_continues_the_callers_trace(traced):
    client, exporter = traced()
    with client:
        r = client.post("/segment", files={"image": ("p.png", png_bytes(quadrants(48, 80)[0]), "image/png")},
                        headers=TRACEPARENT)
    assert r.status_code == 200
    spans = by_name(exporter.get_finished_spans())
    request, endpoint = spans["POST /segment"], spans["fastapi.endpoint"]
    assert format(request.context.trace_id, "032x") == TRACE_ID
    assert format(request.parent.span_id, "016x") == PARENT_ID and request.parent.is_remote
    assert request.attributes["http.route"] == "/segment" and request.attributes["http.response.status_code"] == 200
    assert endpoint.parent.span_id == request.context.span_id and endpoint.attributes["segment.model"] == "rgb"
    for stage in ("read", "decode", "preprocess", "inference", "postprocess", "encode"):
        span = spans[stage]
        assert span.parent.span_id == endpoint.context.span_id and span.context.trace_id == request.context.trace_id
        assert request.start_time <= span.start_time <= span.end_time <= request.end_time
    inference = spans["inference"].attributes
    assert (inference["segment.model"], inference["segment.image.width"], inference["segment.image.height"],
            inference["segment.batch_size"]) == ("rgb", 80, 48, 1)
    assert "queue" not in spans  # no batcher, no queue


def test_batched_inference_has_a_queue_span_and_batch_size(traced):
    client, exporter = traced(batch_max=4, batch_wait_ms=1)
    with client:
        client.post("/segment", files={"image": ("p.png", png_bytes(quadrants(32, 32)[0]), "image/png")})
    spans = by_name(exporter.get_finished_spans())
    queue, inference = spans["queue"], spans["inference"]
    assert queue.end_time == inference.start_time and queue.parent.span_id == spans["fastapi.endpoint"].context.span_id
    assert inference.attributes["segment.batch_size"] == 1


def test_v2_infer_and_errors_are_traced(traced):
    client, exporter = traced()
    image = base64.b64encode(png_bytes(quadrants(32, 32)[0])).decode()
    with client:
        client.post("/v2/models/rgb/infer", json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                                                              "data": [image, image]}]})
        client.post("/v2/models/rgb/infer", content=b"{")
    spans = exporter.get_finished_spans()
    requests = [s for s in spans if s.name == "POST /v2/models/{name}/infer"]
    assert [r.attributes["http.response.status_code"] for r in requests] == [200, 400]
    assert requests[0].parent is None  # no traceparent: a new trace
    (ok,) = [s for s in spans if s.name == "fastapi.endpoint" and s.parent.span_id == requests[0].context.span_id]
    assert ok.attributes["segment.images"] == 2
    children = [s.name for s in spans if s.parent is not None and s.parent.span_id == ok.context.span_id]
    assert children.count("decode") == 2 and children.count("inference") == 2
    assert children[0] == "read" and children[-1] == "encode"


def test_off_by_default_without_importing_opentelemetry(engines):
    """The default app, serving a request, never loads OpenTelemetry's SDK or an exporter (the API is FastAPI's
    own dependency, imported by FastAPI whatever the settings)."""
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    code = ("import sys\nfrom tests.models import make_client, png_bytes, quadrants\n"
            f"with make_client({str(engines)!r}, 'rgb') as c:\n"
            "    assert c.app.state.tracing is None\n"
            "    r = c.post('/segment', files={'image': ('p.png', png_bytes(quadrants(32, 32)[0]), 'image/png')})\n"
            "    assert r.status_code == 200\n"
            "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter'))))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_exporter_from_the_standard_variables(engines, monkeypatch):
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "segmenter-eu")
    client = make_client(engines, "rgb", tracing=True)
    tracing = client.app.state.tracing
    (processor,) = tracing.provider._active_span_processor._span_processors
    assert type(processor.span_exporter).__name__ == "OTLPSpanExporter"
    assert tracing.provider.resource.attributes["service.name"] == "segmenter-eu"
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="otlp, console or none"):
        make_client(engines, "rgb", tracing=True)
