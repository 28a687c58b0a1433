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


@pytest.fixture(scope="session")
def protocol_server(tmp_path_factory):
    """One real server on loopback for the protocol and client tests: the dynamic-H/W RGB model served, a raw-pixel
    model beside it in the repository, gRPC on ``server.grpc_address`` where grpcio is installed. Tests that load
    another model load ``rgb`` back."""
    import importlib.util

    from .models import raw_rgb_model
    from .server import Server, free_port

    engines = tmp_path_factory.mktemp("protocols") / "engines"
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    raw_rgb_model(engines / "raw.onnx", height=64, width=64)
    grpc_address = f"127.0.0.1:{free_port()}" if importlib.util.find_spec("grpc") else None
    server = Server(engines, "rgb", env={"SEGMENT_GRPC_ADDRESS": grpc_address} if grpc_address else None)
    server.grpc_address = grpc_address
    try:
        yield server
    finally:
        server.stop()
