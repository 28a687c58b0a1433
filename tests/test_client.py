"""The Python client (app.client) and `segment client` against the real server on loopback."""

import asyncio
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from app.client import (AsyncClient, BadImage, Client, Conflict, ConnectionFailed, ModelMismatch, ServerError,
                        Unauthorized, Unavailable)

from .models import RGB_META, ROOT, decode_png, png_bytes, quadrants
from .server import TOKEN, free_port

PALETTE = np.array(RGB_META["palette"], np.uint8)


@pytest.fixture
def photos(tmp_path):
    """Three photos of different sizes on disk, and their true labels."""
    found = {}
    for i, (h, w) in enumerate([(32, 32), (48, 64), (40, 24)]):
        photo, truth = quadrants(h, w)
        path = tmp_path / f"photo{i}.png"
        path.write_bytes(png_bytes(photo))
        found[path] = truth
    return found


def test_segment_any_kind_of_image(protocol_server):
    photo, truth = quadrants(48, 64)
    rgb = np.ascontiguousarray(photo[..., ::-1])
    with Client(protocol_server.url) as client:
        for image in (png_bytes(photo), rgb, Image.fromarray(rgb)):
            labels = client.segment(image)
            assert labels.dtype == np.uint8 and np.array_equal(labels, truth)
        mask = client.segment(rgb, view="mask", output="pil")
        assert mask.size == (64, 48) and np.array_equal(np.asarray(mask.convert("RGB")), PALETTE[truth])
        overlay = client.segment(rgb, view="overlay", alpha=1.0)
        assert overlay.shape == (48, 64, 3) and np.array_equal(overlay, PALETTE[truth])
        assert np.array_equal(decode_png(client.segment(rgb, output="png")), truth)
        assert client.model_info()["name"] == "rgb" and client.ready()


def test_model_choice(protocol_server):
    photo, truth = quadrants(64, 64)
    with Client(protocol_server.url, token=TOKEN) as client:
        with pytest.raises(Conflict, match="'raw' is not loaded"):
            client.segment(png_bytes(photo), model="raw")
        client.load("raw")
        try:
            assert "raw" in client.models()["loaded_here"]
            assert np.array_equal(client.segment(png_bytes(photo), model="raw"), truth)
            assert np.array_equal(client.segment(png_bytes(photo)), truth)  # the default, rgb
        finally:
            client.unload("raw")
    with Client(protocol_server.url) as client, pytest.raises(Unauthorized, match="admin token"):
        client.load("raw")


def test_an_answer_from_another_model_is_refused(protocol_server):
    """A server that ignores ?model= (one without the control plane) answers with its own model: refused."""
    def other_model(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=png_bytes(quadrants(8, 8)[0]), headers={"X-Model": "rgb"})

    with Client(protocol_server.url, transport=httpx.MockTransport(other_model)) as client:
        with pytest.raises(ModelMismatch, match="asked for model 'raw'"):
            client.segment(png_bytes(quadrants(8, 8)[0]), model="raw")


def test_errors_are_typed_with_the_server_detail(protocol_server):
    with Client(protocol_server.url) as client, pytest.raises(BadImage) as caught:
        client.segment(b"this is not an image")
    assert caught.value.status == 415 and "unsupported or unrecognised image format" in caught.value.detail


def test_no_server_is_a_connection_error(tmp_path):
    with Client(f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.01) as client:
        with pytest.raises(ConnectionFailed, match="no answer"):
            client.segment(png_bytes(quadrants(8, 8)[0]))
        assert not client.ready()


def busy_then_real(busy: int, retry_after: str | None):
    """A transport answering 503 ``busy`` times, then passing requests to the real server; counts attempts."""
    real, calls = httpx.HTTPTransport(), []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) <= busy:
            headers = {"Retry-After": retry_after} if retry_after is not None else {}
            return httpx.Response(503, json={"detail": "the server is busy; retry shortly"}, headers=headers)
        return real.handle_request(request)

    return httpx.MockTransport(handle), calls


@pytest.mark.parametrize("retry_after", ["0", None])
def test_503_is_retried_with_backoff(protocol_server, retry_after):
    photo, truth = quadrants(32, 32)
    transport, calls = busy_then_real(2, retry_after)
    with Client(protocol_server.url, transport=transport, retries=3, backoff=0.01) as client:
        assert np.array_equal(client.segment(png_bytes(photo)), truth)
    assert len(calls) == 3
    transport, calls = busy_then_real(10, retry_after)
    with Client(protocol_server.url, transport=transport, retries=2, backoff=0.01) as client:
        with pytest.raises(Unavailable, match="busy"):
            client.segment(png_bytes(photo))
    assert len(calls) == 3


def first_answer_500(content_type: str):
    """A transport answering the first request with a 500 of ``content_type``, then passing to the real server."""
    real, calls = httpx.HTTPTransport(), []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            body = b'{"detail": "the service failed"}' if "json" in content_type else b"Internal Server Error"
            return httpx.Response(500, content=body, headers={"content-type": content_type})
        return real.handle_request(request)

    return httpx.MockTransport(handle), calls


def test_a_proxys_500_is_retried_and_the_services_own_is_not(protocol_server):
    """A plain-text 500 is a proxy's (Ray Serve's, for a replica lost with its node): tried again. A 500 with the
    service's JSON detail is its own answer: raised at once."""
    photo, truth = quadrants(32, 32)
    transport, calls = first_answer_500("text/plain; charset=utf-8")
    with Client(protocol_server.url, transport=transport, retries=1, backoff=0.01) as client:
        assert np.array_equal(client.segment(png_bytes(photo)), truth)
    assert len(calls) == 2
    transport, calls = first_answer_500("application/json")
    with Client(protocol_server.url, transport=transport, retries=1, backoff=0.01) as client:
        with pytest.raises(ServerError, match="the service failed"):
            client.segment(png_bytes(photo))
    assert len(calls) == 1


def test_many_files_with_progress_and_one_bad(protocol_server, photos, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with Client(protocol_server.url) as client:
        outcomes = client.segment_files([*photos, bad], view="labels", concurrency=2)
    assert "4/4" in capsys.readouterr().err  # tqdm's bar
    assert isinstance(outcomes[bad], BadImage) and not bad.with_name("broken.labels.png").exists()
    for path, truth in photos.items():
        assert outcomes[path] == path.with_name(f"{path.stem}.labels.png")
        assert np.array_equal(decode_png(outcomes[path].read_bytes()), truth)


def test_async_client(protocol_server, photos):
    async def run():
        async with AsyncClient(protocol_server.url) as client:
            first = next(iter(photos))
            labels = await client.segment(first)
            outcomes = await client.segment_files(photos, view="mask", concurrency=3, progress=False)
            return labels, outcomes, await client.model_info()

    labels, outcomes, info = asyncio.run(run())
    assert np.array_equal(labels, next(iter(photos.values()))) and info["name"] == "rgb"
    for path, truth in photos.items():
        assert np.array_equal(np.asarray(Image.open(outcomes[path]).convert("RGB")), PALETTE[truth])


def test_cli_writes_masks_beside_the_images(protocol_server, photos, tmp_path):
    run = subprocess.run([sys.executable, "-m", "app.cli", "client", protocol_server.url, *map(str, photos),
                          "--view", "labels", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for path, truth in photos.items():
        assert np.array_equal(decode_png(path.with_name(f"{path.stem}.labels.png").read_bytes()), truth)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"junk")
    run = subprocess.run([sys.executable, "-m", "app.cli", "client", protocol_server.url, str(junk)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 3 and "junk.jpg" in run.stderr and "unsupported" in run.stderr
    assert "0 written" in run.stdout and "1 failed" in run.stdout
