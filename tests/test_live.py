"""WebSocket /ws/segment: the reply protocol, errors that keep the stream open, latest-wins dropping under a fast
sender, the stream limit, and nothing left behind when a client goes."""

import cv2
import numpy as np
import pytest
from starlette.websockets import WebSocketDisconnect

from .models import decode_png, make_client, quadrants, rgb_model
from .videos import colour_frames


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    engines = tmp_path_factory.mktemp("live") / "engines"
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    with make_client(engines, "rgb", results_dir=engines.parent / "results", live_max_streams=2) as c:
        yield c


def jpeg(bgr: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def test_each_frame_gets_its_header_and_png_in_the_chosen_view(client):
    photo, truth = quadrants(96, 128)
    with client.websocket_connect("/ws/segment?view=labels") as ws:
        for n in range(3):
            ws.send_bytes(jpeg(photo))
            header = ws.receive_json()
            assert header["frame"] == n and header["dropped"] == 0 and "inference" in header["timings_ms"]
            labels = decode_png(ws.receive_bytes())
            assert labels.shape == truth.shape and (labels == truth).mean() > 0.99  # JPEG edges may differ
    with client.websocket_connect("/ws/segment?view=mask") as ws:
        ws.send_bytes(jpeg(photo))
        ws.receive_json()
        mask = decode_png(ws.receive_bytes(), cv2.IMREAD_COLOR)
        assert mask[10, 10].tolist() == [10, 10, 200]  # red class's palette colour (BGR)
    with client.websocket_connect("/ws/segment?view=overlay&alpha=1") as ws:
        ws.send_bytes(jpeg(photo))
        ws.receive_json()
        assert decode_png(ws.receive_bytes(), cv2.IMREAD_COLOR)[10, 10].tolist() == [10, 10, 200]


def test_a_bad_frame_is_answered_and_the_stream_goes_on(client):
    with client.websocket_connect("/ws/segment") as ws:
        ws.send_bytes(b"not a jpeg")
        assert ws.receive_json() == {"frame": 0, "status": 415, "error": ws_error(client)}
        ws.send_text("text messages are ignored")
        ws.send_bytes(jpeg(colour_frames([2])[0]))
        assert ws.receive_json()["frame"] == 1
        assert decode_png(ws.receive_bytes()).shape[:2] == (64, 96)
    with client.websocket_connect("/ws/segment?model=nosuch") as ws:  # a model the repository does not have
        ws.send_bytes(jpeg(colour_frames([2])[0]))
        reply = ws.receive_json()
        assert reply["status"] == 404 and "nosuch" in reply["error"]
    with client.websocket_connect("/ws/segment?model=rgb&view=labels") as ws:  # named, as ?model= elsewhere
        ws.send_bytes(jpeg(colour_frames([2])[0]))
        ws.receive_json()
        assert (decode_png(ws.receive_bytes()) == 2).all()


def ws_error(client) -> str:
    """The service's own words for an upload that is not an image (as POST /segment gives them)."""
    return client.post("/segment", files={"image": ("x.jpg", b"not a jpeg")}).json()["detail"]


def test_a_fast_sender_gets_the_newest_frames_never_a_backlog(client):
    big = 480, 640  # frames that take a while to decode, sent all at once
    colours = [0, 1] * 20 + [2]  # the last frame is blue
    frames = [jpeg(f) for f in colour_frames(colours, *big)]
    with client.websocket_connect("/ws/segment?view=labels") as ws:
        for data in frames:
            ws.send_bytes(data)
        replies = []
        while not replies or replies[-1][0]["frame"] != len(frames) - 1:
            header = ws.receive_json()
            replies.append((header, decode_png(ws.receive_bytes())))
    numbers = [h["frame"] for h, _ in replies]
    assert numbers == sorted(numbers) and len(numbers) < len(frames)  # in order, and some never processed
    last = replies[-1][0]
    assert last["dropped"] == len(frames) - len(replies) > 0  # every frame is answered or counted dropped
    for header, labels in replies:  # each reply is the frame it names
        assert (labels == colours[header["frame"]]).all()


def test_stream_limit_and_nothing_left_after_close(client):
    state, streams = client.app.state.service, client.app.state.live_streams
    with client.websocket_connect("/ws/segment") as a, client.websocket_connect("/ws/segment") as b:
        for ws in (a, b):
            ws.send_bytes(jpeg(colour_frames([1])[0]))
            ws.receive_json()
            ws.receive_bytes()
        assert streams.open == 2
        with client.websocket_connect("/ws/segment") as c:
            with pytest.raises(WebSocketDisconnect) as exc:
                c.receive_json()
            assert exc.value.code == 1013 and "limit" in exc.value.reason
        a.send_bytes(jpeg(colour_frames([1])[0]))  # closed with a frame in flight
    deadline = __import__("time").time() + 30
    while (streams.open or state.model._users) and __import__("time").time() < deadline:
        __import__("time").sleep(0.02)
    assert streams.open == 0 and state.model._users == 0  # no stream counted, the model held by no one
