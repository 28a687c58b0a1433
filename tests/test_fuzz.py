"""Schemathesis against /openapi.json: generated requests to every route (bounded), and no 5xx."""

import tempfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

from app.core.config import Settings
from app.main import create_app

from .models import rgb_model

schemathesis = pytest.importorskip("schemathesis")

_engines = Path(tempfile.mkdtemp(prefix="fuzz-engines-"))
rgb_model(_engines / "rgb.onnx", height="H", width="W")
# Admin routes open (in a throw-away repository) so the fuzzer reaches their code, not just the 403.
_app = create_app(Settings(engines_dir=_engines, model="rgb", allow_unauthenticated_admin=True))
schema = schemathesis.openapi.from_asgi("/openapi.json", _app)


@pytest.fixture(scope="module", autouse=True)
def running_app():
    with TestClient(_app):  # runs the lifespan: the model is loaded while the fuzzer calls
        yield


@schema.exclude(path="/bench").parametrize()  # /bench is bounded to 30 s a call: tested on its own
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    response = case.call()
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}"
