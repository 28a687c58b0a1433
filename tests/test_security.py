"""What a hostile client and a fault-injection run broke once (issue 23), each kept fixed: admin token, body reads
before auth, slow uploads, decompression bombs in containers, decoded pixels in flight, /bench bounds, a full or
read-only repository, class ids beyond a model's classes, metrics cardinality, model names."""

import errno
import pathlib
import re
import socket
import threading
import time

import numpy as np
import pytest
from onnx import TensorProto, helper

from app.core.config import Settings
from app.core.errors import ModelError
from app.repository import check_name
from app.serving import bench

from .corpus import ICO_BOMB
from .models import RGB_META, _save, decode_png, make_client, png_bytes, quadrants, rgb_model
from .server import TOKEN, Server

ADMIN = {"Authorization": "Bearer t"}


def post_image(client, data: bytes, **params):
    return client.post("/segment", files={"image": ("p.png", data, "image/png")}, params=params)


# --- 1. a blank admin token is no token -------------------------------------------------------------------------

@pytest.mark.parametrize("blank", ["", "   ", "\t\n"])
def test_blank_admin_token_is_unset(engines, blank):
    assert Settings(admin_token=blank).admin_token is None
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    with make_client(engines, "rgb", admin_token=blank) as c:
        for header in ("Bearer", "Bearer ", f"Bearer {blank}"):
            r = c.post("/engines/rgb/activate", headers={"Authorization": header})
            assert r.status_code == 403 and "disabled" in r.json()["detail"]


def test_empty_bearer_is_refused(engines):
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    with make_client(engines, "rgb", admin_token="t") as c:
        for header in ("Bearer", "Bearer ", "Bearer  ", "t", "Basic t"):
            assert c.post("/engines/rgb/activate", headers={"Authorization": header}).status_code == 401
        assert c.post("/engines/rgb/activate", headers=ADMIN).status_code == 200


def test_every_route_that_writes_needs_the_admin_token(client):
    """Read from the OpenAPI schema, so a route added later is covered: without the token, every route that writes
    (but segmentation) is refused by the gate, before its body is read (the gate closes the connection)."""
    # Segmentation, the Open Inference Protocol's form of it, and video jobs (a job's random 128-bit id is the
    # capability to read or delete it).
    public = {"/segment", "/segment/json", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer",
              "/segment/video", "/segment/video/{job_id}"}
    writers = [(method, path) for path, ops in client.app.openapi()["paths"].items() for method in ops
               if method in ("post", "put", "patch", "delete") and path not in public]
    assert len(writers) >= 3
    for method, path in writers:
        r = client.request(method.upper(), re.sub(r"\{[^}]+\}", "x", path), content=b"x" * 1000,
                           headers={"content-type": "multipart/form-data; boundary=zz"})
        assert r.status_code == 403 and r.headers["connection"] == "close", (method, path)


# --- the real server on loopback: auth before the body, slow bodies, a bomb in a container --------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engines = tmp_path_factory.mktemp("secure") / "engines"
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    srv = Server(engines, env={"SEGMENT_BODY_TIMEOUT_S": "3", "SEGMENT_BODY_IDLE_TIMEOUT_S": "1"})
    try:
        yield srv
    finally:
        srv.stop()


def raw_request(server: Server, head: str, body_parts=(), pause: float = 0.0, wait: float = 20.0,
                sent_at: list | None = None) -> bytes:
    """Send ``head`` then each body part (``pause`` seconds apart, stopping if the server answers meanwhile); the
    bytes the server sent back before closing or ``wait`` seconds. ``sent_at`` collects when each part went out."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait) as s:
        s.sendall(head.encode())
        s.setblocking(False)
        answer = b""
        for part in body_parts:
            if sent_at is not None:
                sent_at.append(time.monotonic())
            try:
                answer += s.recv(65536)
            except BlockingIOError:
                pass
            if answer:
                break
            try:
                s.sendall(part)
            except (BrokenPipeError, ConnectionResetError, BlockingIOError):
                break
            time.sleep(pause)
        s.setblocking(True)
        s.settimeout(wait)
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return answer


def status_of(answer: bytes) -> int:
    assert answer, "no answer from the server"
    return int(answer.split(b" ", 2)[1])


PART = b'--zz\r\nContent-Disposition: form-data; name="onnx"; filename="m.onnx"\r\n\r\n'


def test_admin_upload_refused_before_its_body_is_read(server):
    # 200 MB declared, the start of a valid form sent: the refusal must come without waiting for the rest.
    head = ("POST /engines HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
            "Content-Length: 200000000\r\n\r\n")
    for auth in ("", "Authorization: Bearer wrong\r\n", "Authorization: Bearer\r\n"):
        answer = raw_request(server, head.replace("\r\n\r\n", f"\r\n{auth}\r\n"), [PART], wait=10)
        assert status_of(answer) == 401 and b"admin token" in answer
    assert raw_request(server, "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200")


def test_trickling_upload_is_cut_off_with_408(server):
    head = ("POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
            "Content-Length: 100000\r\n\r\n")
    # One byte every 0.1 s never trips the 1 s idle limit; the 3 s total limit cuts it off. Unless this client itself
    # stalled for a large part of a second (a loaded CI machine did once): then the pattern was not sent, try again.
    for _ in range(3):
        sent_at = []
        trickle = raw_request(server, head, [PART.replace(b"onnx", b"image")] + [b"\0"] * 100, pause=0.1,
                              sent_at=sent_at)
        if max(b - a for a, b in zip(sent_at, sent_at[1:])) < 0.6:
            break
    # Nothing after the headers: the idle limit.
    idle = raw_request(server, head)
    for answer, why in ((trickle, b"3 s"), (idle, b"1 s")):
        assert status_of(answer) == 408 and why in answer and b"connection: close" in answer.lower()
    assert raw_request(server, "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200")


def peak_rss_kib(server: Server) -> int:
    status = pathlib.Path(f"/proc/{server.proc.pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1))


def test_bomb_inside_an_ico_is_never_decoded(server):
    import httpx

    before = peak_rss_kib(server)
    r = httpx.post(f"{server.url}/segment", files={"image": ("a.ico", ICO_BOMB, "image/x-icon")}, timeout=60)
    assert r.status_code == 415 and r.json()["detail"]
    # Decoded, the 24000x24000 RGB PNG inside takes 1.7 GB; refused by its magic bytes, nothing.
    assert peak_rss_kib(server) - before < 200_000


# --- 3. decoded pixels in flight --------------------------------------------------------------------------------

def test_decoded_pixels_in_flight_are_bounded(engines):
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    photo = png_bytes(quadrants(100, 100)[0])  # 10,000 pixels: two fit in the budget, a third does not
    with make_client(engines, "rgb", max_pixels=20_000, max_pixels_inflight=20_000) as c:
        served = c.app.state.service.model
        entered, go = threading.Semaphore(0), threading.Event()
        infer = served.infer

        def held_infer(batch):  # holds each request in inference until the test lets go
            entered.release()
            go.wait(30)
            return infer(batch)

        served.infer = held_infer
        results = []
        threads = [threading.Thread(target=lambda: results.append(post_image(c, photo))) for _ in range(2)]
        for t in threads:
            t.start()
        assert entered.acquire(timeout=30) and entered.acquire(timeout=30)  # two requests hold 20,000 pixels
        third = post_image(c, photo)
        go.set()
        for t in threads:
            t.join()
        assert third.status_code == 503 and third.headers["retry-after"] == "1" and "pixels" in third.json()["detail"]
        assert [r.status_code for r in results] == [200, 200]
        assert post_image(c, photo).status_code == 200  # released after the responses
        assert c.app.state.pixels.in_use == 0


def test_pixel_budget_cannot_be_below_one_image():
    with pytest.raises(ValueError, match="max_pixels_inflight"):
        Settings(max_pixels=1000, max_pixels_inflight=999)
    assert Settings(max_pixels=300_000_000).max_pixels_inflight == 300_000_000  # the default follows


# --- 6. /bench bounded ------------------------------------------------------------------------------------------

def test_bench_refuses_runs_beyond_its_bounds(engines):
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    with make_client(engines, "rgb", admin_token="t") as c:
        for params in ({"batch": 64, "warmup": 100, "seconds": 5},  # 9,600 images
                       {"batch": 8, "height": 4096, "width": 4096, "iterations": 1}):  # 134 M pixels in one call
            r = c.get("/bench", headers=ADMIN, params=params)
            assert r.status_code == 422 and "at most" in r.json()["detail"], params
        assert c.get("/bench", headers=ADMIN, params={"iterations": 3, "warmup": 1}).status_code == 200


def test_bench_deadline_covers_the_warm_up(engines):
    from app.engines import load_model

    model = load_model(rgb_model(engines / "rgb.onnx", height="H", width="W"))
    try:
        report = bench.run(model, bench.BenchConfig(iterations=100_000, warmup_iterations=10**9, deadline_s=0.3))
    finally:
        model.close()
    assert report["warmup_iterations"] < 10**9 and report["iterations"] >= 1


# --- 9. a full or read-only repository --------------------------------------------------------------------------

def fail_inside(monkeypatch, method: str, root: pathlib.Path, code: int) -> None:
    """``Path.<method>`` raises ``OSError(code)`` for paths inside ``root`` (a full or read-only disk, injected)."""
    original = getattr(pathlib.Path, method)

    def failing(self, *args, **kwargs):
        if self.resolve().is_relative_to(root.resolve()):
            raise OSError(code, errno.errorcode[code].lower(), str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, method, failing)


@pytest.mark.parametrize("code,status", [(errno.ENOSPC, 507), (errno.EROFS, 503), (errno.EACCES, 503)])
def test_full_or_read_only_repository_answers_json_and_keeps_serving(engines, monkeypatch, code, status):
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    rgb_model(engines / "spare.onnx", height="H", width="W")
    model_bytes = (engines / "rgb.onnx").read_bytes()
    photo = png_bytes(quadrants(32, 32)[0])
    requests = {  # each request, with the file-system call that fails under it
        "write_bytes": lambda c: c.post("/engines", headers=ADMIN, files={"onnx": ("m.onnx", model_bytes)},
                                        data={"name": "new", "target": "onnxruntime", "precision": "fp32"}),
        "unlink": lambda c: c.delete("/engines/spare", headers=ADMIN),
        "mkdir": lambda c: c.post("/engines", headers=ADMIN, files=[("calib_images", ("a.png", photo, "image/png"))],
                                  data={"name": "q", "source": "rgb", "target": "onnxruntime", "precision": "int8"}),
    }
    with make_client(engines, "rgb", admin_token="t") as c:
        answers = []
        for method, request in requests.items():
            with monkeypatch.context() as m:
                fail_inside(m, method, engines, code)
                answers.append(request(c))
        for r in answers:
            assert r.status_code == status and r.headers["content-type"] == "application/json", r.text
            assert "repository" in r.json()["detail"]
        assert post_image(c, photo).status_code == 200 and c.get("/readyz").status_code == 200
    assert not list(engines.glob(".upload.*")) and not (engines / "new.onnx").exists()
    assert (engines / "spare.onnx").exists()


def test_read_only_control_store_answers_json_and_keeps_serving(engines, monkeypatch):
    """The desired-state database in the repository refusing writes (SQLite's own READONLY, through
    ``PRAGMA query_only``): a change answers 503 with a detail, segmentation goes on."""
    from contextlib import contextmanager

    from app.repository import ControlStore

    rgb_model(engines / "rgb.onnx", height="H", width="W")
    rgb_model(engines / "spare.onnx", height="H", width="W")
    with make_client(engines, "rgb", admin_token="t") as c:
        original = ControlStore._connect

        @contextmanager
        def read_only(self):
            with original(self) as db:
                db.execute("PRAGMA query_only=ON")
                yield db

        with monkeypatch.context() as m:
            m.setattr(ControlStore, "_connect", read_only)
            r = c.post("/models/spare/default", headers=ADMIN)
        assert r.status_code == 503 and "read-only" in r.json()["detail"], r.text
        assert post_image(c, png_bytes(quadrants(32, 32)[0])).status_code == 200


# --- 11. class ids beyond the model's classes --------------------------------------------------------------------

def offset_labels_model(path: pathlib.Path, offset: int) -> pathlib.Path:
    """Labels = strongest channel + ``offset``: with three named classes, every id past 2 is unknown."""
    x = helper.make_tensor_value_info("input_image", TensorProto.FLOAT, ["N", 3, "H", "W"])
    y = helper.make_tensor_value_info("preds", TensorProto.UINT8, ["N", "H", "W"])
    nodes = [helper.make_node("ArgMax", ["input_image"], ["idx"], axis=1, keepdims=0),
             helper.make_node("Add", ["idx", "offset"], ["shifted"]),
             helper.make_node("Cast", ["shifted"], ["preds"], to=TensorProto.UINT8)]
    offset_t = helper.make_tensor("offset", TensorProto.INT64, [], [offset])
    return _save(helper.make_graph(nodes, "offset", [x], [y], initializer=[offset_t]), path, RGB_META)


def test_class_ids_beyond_the_classes_are_coloured_as_unknown(engines):
    offset_labels_model(engines / "off.onnx", 2)  # red -> 2 (blue), green -> 3, blue -> 4: two unknown ids
    photo, truth = quadrants(64, 64)
    with make_client(engines, "off") as c:
        for view in ("mask", "overlay", "labels"):
            r = post_image(c, png_bytes(photo), view=view, alpha=1.0)
            assert r.status_code == 200, (view, r.text[:200])
            out = decode_png(r.content)
            if view == "labels":
                assert np.array_equal(out, truth + 2)
            else:
                mask = decode_png(r.content, flags=1)  # BGR, also for the indexed mask
                assert tuple(mask[truth == 1][0]) == (255, 0, 255)  # id 3: the unknown colour (BGR)
                assert tuple(mask[truth == 0][0]) == tuple(RGB_META["palette"][2][::-1])  # id 2: blue
        r = c.post("/segment/json", files={"image": ("p.png", png_bytes(photo), "image/png")})
        assert r.status_code == 200
        classes = {k["id"]: k for k in r.json()["classes"]}
        assert classes[3]["name"] == "unknown (id 3)" and classes[3]["color"] == "#ff00ff"
        assert classes[2]["name"] == "blue"


# --- 12. metrics cardinality ------------------------------------------------------------------------------------

def test_made_up_methods_and_paths_collapse_in_metrics(client):
    for i in range(20):
        client.request(f"FAKE{i}", "/segment")
        client.get(f"/no/such/path/{i}")
    text = client.get("/metrics").text
    methods = set(re.findall(r'segment_http_requests_total\{method="([^"]+)"', text))
    routes = set(re.findall(r'segment_http_requests_total\{[^}]*route="([^"]+)"', text))
    assert methods <= {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "other"} and "other" in methods
    assert "unmatched" in routes and not any(r.startswith("/no/such") for r in routes)


# --- 13. names --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["rgb\n", "rgb\r", "a\x00b", "", "-lead", "a.b", "../x", "a/b", "caf\u00e9",
                                 "\uff41", "x" * 65, " a"])
def test_names_outside_the_pattern_are_refused(bad):
    with pytest.raises(ModelError, match="invalid model name"):
        check_name(bad)


@pytest.mark.parametrize("good", ["a", "A9", "city_v2-fp16", "x" * 64])
def test_names_inside_the_pattern_pass(good):
    assert check_name(good) == good


def test_name_with_a_newline_is_refused_and_never_written(engines):
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    with make_client(engines, "rgb", admin_token="t") as c:
        r = c.post("/engines", headers=ADMIN, data={"name": "evil\n", "target": "onnxruntime", "precision": "fp32"},
                   files={"onnx": ("m.onnx", (engines / "rgb.onnx").read_bytes())})
        assert r.status_code == 400 and "invalid model name" in r.json()["detail"]
        assert c.get("/engines/rgb%0A").status_code == 400
    assert sorted(p.name for p in engines.iterdir() if not p.name.startswith(".control")) == ["rgb.json", "rgb.onnx"]
