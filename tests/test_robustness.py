"""Bad input, limits and fuzzing: every odd upload gets its promised answer, never a 5xx, never a dead server."""

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.core.errors import ImageError

from app.serving.imaging import decode
from app.serving.pipeline import segment_image
from app.engines import load_model

from .models import decode_png, make_client, png_bytes, quadrants, rgb_model
from .corpus import CASES


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engines = tmp_path_factory.mktemp("engines")
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    with make_client(engines, "rgb", max_pixels=40_000_000) as c:
        yield c


def test_corpus_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name,filename,ctype,data,status,shape", CASES, ids=[c[0] for c in CASES])
def test_corpus(server, name, filename, ctype, data, status, shape):
    r = server.post("/segment", params={"view": "labels"}, files={"image": (filename, data, ctype)})
    assert r.status_code == status, (name, r.text[:200])
    if status == 200:
        labels = decode_png(r.content)
        assert labels.shape == shape
        assert labels.max() <= 2
    else:
        assert r.headers["content-type"] == "application/json" and r.json()["detail"]
    assert server.get("/readyz").status_code == 200


def test_request_shapes(server):
    good = png_bytes(quadrants(32, 32)[0])
    r = server.post("/segment", files={"photo": ("a.png", good, "image/png")})
    assert r.status_code == 422  # wrong field name
    r = server.post("/segment", files=[("image", ("a.png", good, "image/png")), ("image", ("b.png", good, "image/png"))])
    assert r.status_code == 400 and "exactly one" in r.json()["detail"]
    r = server.post("/segment", data={"image": "just a string"})
    assert r.status_code in (400, 422)
    r = server.post("/segment", content=b"raw body", headers={"content-type": "image/png"})
    assert r.status_code == 422
    assert server.post("/segment", params={"view": "nope"}, files={"image": ("a.png", good, "image/png")}).status_code == 422
    assert server.post("/segment", params={"alpha": 2}, files={"image": ("a.png", good, "image/png")}).status_code == 422


def test_declared_oversize_body_refused_before_reading(engines):
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    with make_client(engines, "rgb", max_upload_bytes=10_000) as c:
        r = c.post("/segment", content=b"x" * 200_000,
                   headers={"content-type": "multipart/form-data; boundary=zzz", "content-length": "200000"})
        assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_streamed_oversize_body_cut_off_while_reading(engines):
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    sent = []

    def chunks():  # no Content-Length: the limit must be enforced as the body streams in
        yield b"--zzz\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(200):
            sent.append(1)
            yield b"\0" * 65536
        yield b"\r\n--zzz--\r\n"

    with make_client(engines, "rgb", max_upload_bytes=100_000) as c:
        r = c.post("/segment", content=chunks(), headers={"content-type": "multipart/form-data; boundary=zzz"})
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        assert c.get("/readyz").status_code == 200


def test_symlink_out_of_the_repository_is_refused(engines, tmp_path):
    outside = rgb_model(tmp_path / "outside" / "secret.onnx")
    (engines / "sneaky.onnx").symlink_to(outside)
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    with make_client(engines, "rgb", admin_token="t") as c:
        r = c.post("/engines/sneaky/activate", headers={"Authorization": "Bearer t"})
        assert r.status_code == 400 and "outside the model repository" in r.json()["detail"]
    with make_client(engines, "sneaky") as c:
        assert c.get("/readyz").status_code == 503


def test_min_side(engines):
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    with make_client(engines, "rgb", min_side=8) as c:
        r = c.post("/segment", files={"image": ("a.png", png_bytes(quadrants(4, 40)[0]), "image/png")})
        assert r.status_code == 400 and "at least 8" in r.json()["detail"]


def test_overload_answers_503_with_retry_after(engines):
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    with make_client(engines, "rgb", max_inflight=1) as c:
        state = c.app.state.service
        with state.admit():  # one request already in flight
            r = c.post("/segment", files={"image": ("a.png", png_bytes(quadrants(32, 32)[0]), "image/png")})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert c.post("/segment", files={"image": ("a.png", png_bytes(quadrants(32, 32)[0]), "image/png")}).status_code == 200


@pytest.fixture(scope="module")
def dynamic_model(tmp_path_factory):
    m = load_model(rgb_model(tmp_path_factory.mktemp("m") / "rgb.onnx", height="H", width="W"))
    yield m
    m.close()


@given(h=st.integers(1, 300), w=st.integers(1, 300), seed=st.integers(0, 2**32 - 1),
       fmt=st.sampled_from([".png", ".jpg", ".bmp", ".webp"]), channels=st.sampled_from([1, 3, 4]))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_decodable_image_gives_a_mask_of_its_size(dynamic_model, h, w, seed, fmt, channels):
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, channels) if channels > 1 else (h, w), np.uint8)
    if fmt in (".jpg", ".webp") and channels == 4:
        pixels = pixels[..., :3]
    data = cv2.imencode(fmt, pixels)[1].tobytes()
    image = decode(data, max_pixels=10**8)
    seg = segment_image(dynamic_model, image)
    assert seg.labels.shape == (h, w)
    assert seg.labels.min() >= 0 and seg.labels.max() < dynamic_model.num_classes


@given(data=st.binary(max_size=2048))
@settings(max_examples=200, deadline=None)
def test_arbitrary_bytes_never_crash_the_decoder(data):
    try:
        image = decode(data, max_pixels=10**7)
    except ImageError as exc:
        assert exc.status_code in (400, 413, 415) and exc.detail
    else:
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8


def test_an_unexpected_failure_is_the_services_json_500_which_the_client_does_not_retry(engines):
    """A failure no handler expects (a bug, a runtime's error) answers 500 in the service's JSON (``error`` on the
    v2 routes), not Starlette's plain text: the shipped client retries only a proxy's plain-text 500."""
    from fastapi.testclient import TestClient

    from app.client.wire import worth_retrying

    def broken():
        raise RuntimeError("a bug")

    with make_client(engines, "rgb") as c:
        c.app.add_api_route("/broken", broken)
        c.app.add_api_route("/v2/broken", broken)
        raw = TestClient(c.app, raise_server_exceptions=False)
        r = raw.get("/broken")
        assert r.status_code == 500 and "RuntimeError" in r.json()["detail"], r.text
        assert not worth_retrying(r)
        assert "RuntimeError" in raw.get("/v2/broken").json()["error"]
        assert c.get("/healthz").status_code == 200  # the service goes on
