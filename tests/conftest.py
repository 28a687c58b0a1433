"""Fixtures only; the helpers they use live in ``models.py`` and ``server.py``."""

from pathlib import Path

import pytest

from .models import make_client, rgb_model


@pytest.fixture
def engines(tmp_path) -> Path:
    d = tmp_path / "engines"
    d.mkdir()
    return d


@pytest.fixture
def client(engines):
    """A running service on a dynamic-H/W RGB labels model."""
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    with make_client(engines, "rgb") as c:
        yield c
