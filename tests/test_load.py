"""The real server on loopback: concurrent mixed load with model switches, memory, graceful shutdown.

The default run is short; `python -m pytest -m load` runs the long version (1000+ requests, memory bound).
"""

import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from .models import decode_png, png_bytes, quadrants, rgb_model

from .server import TOKEN, Server, free_port
from .test_engines import argmin_model

@pytest.fixture
def repo(tmp_path) -> Path:
    engines = tmp_path / "engines"
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    argmin_model(engines / "weakest.onnx")
    return engines


def run_load(server: Server, clients: int, requests_per_client: int, switch_every: float, budget_s: float) -> dict:
    """Mixed valid/invalid uploads from ``clients`` threads, while another thread switches models."""
    failures, counts = [], {"valid": 0, "invalid": 0, "switches": 0}
    lock = threading.Lock()
    stop = threading.Event()
    deadline = time.time() + budget_s

    def client(k: int):
        rng = np.random.default_rng(k)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for i in range(requests_per_client):
                if time.time() > deadline:
                    return
                if i % 5 == 4:  # one request in five is not an image
                    r = http.post("/segment", files={"image": ("x.jpg", b"not an image %d" % i, "image/jpeg")})
                    ok = r.status_code == 415 and "detail" in r.json()
                    kind = "invalid"
                else:
                    # Multiples of 32: the dynamic model then sees the image unresized, so labels are exact.
                    h, w = 32 * int(rng.integers(1, 5)), 32 * int(rng.integers(1, 6))
                    photo, strongest = quadrants(h, w)
                    r = http.post("/segment", params={"view": "labels"}, files={"image": ("p.png", png_bytes(photo), "image/png")})
                    kind = "valid"
                    ok = r.status_code == 200
                    if ok:  # the labels must be this request's own, from the model that served it
                        labels = decode_png(r.content)
                        expected = strongest if r.headers["x-model"] == "rgb" else photo[..., ::-1].argmin(axis=2)
                        ok = labels.shape == (h, w) and np.array_equal(labels, expected)
                with lock:
                    counts[kind] += 1
                    if not ok:
                        failures.append((kind, r.status_code, r.text[:120]))

    def switcher():
        with httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            names = ["weakest", "rgb"]
            while not stop.wait(switch_every):
                r = http.post(f"/engines/{names[counts['switches'] % 2]}/activate")
                with lock:
                    counts["switches"] += 1
                    if r.status_code != 200:
                        failures.append(("switch", r.status_code, r.text[:120]))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    sw = threading.Thread(target=switcher)
    sw.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    sw.join()
    return {"failures": failures, **counts}


def test_short_mixed_load_with_model_switches(repo):
    server = Server(repo)
    try:
        result = run_load(server, clients=8, requests_per_client=20, switch_every=0.2, budget_s=60)
    finally:
        assert server.stop()
    assert result["failures"] == []
    assert result["valid"] >= 100 and result["invalid"] >= 30 and result["switches"] >= 1


@pytest.mark.load
def test_long_load_memory_stays_flat(repo):
    """1000+ requests after a warm-up; resident memory grows by less than 5%."""
    server = Server(repo)
    try:
        run_load(server, clients=8, requests_per_client=25, switch_every=0.5, budget_s=30)  # warm-up
        before = server.rss_kib()
        result = run_load(server, clients=8, requests_per_client=130, switch_every=0.5, budget_s=60)
        after = server.rss_kib()
    finally:
        server.stop()
    assert result["failures"] == []
    assert result["valid"] + result["invalid"] >= 1000
    growth = (after - before) / before
    print(f"\nRSS before {before} KiB, after {after} KiB, growth {growth:.2%} over "
          f"{result['valid'] + result['invalid']} requests and {result['switches']} switches")
    assert growth < 0.05


def test_sigterm_lets_in_flight_requests_finish_and_restart_keeps_registry(repo):
    server = Server(repo)
    before = httpx.get(f"{server.url}/engines").json()["engines"]
    photo, truth = quadrants(2000, 3000)  # large enough to still be in flight when the signal lands
    data = png_bytes(photo)
    results = []

    def request():
        r = httpx.post(f"{server.url}/segment", params={"view": "labels"},
                       files={"image": ("p.png", data, "image/png")}, timeout=60)
        results.append(r)

    threads = [threading.Thread(target=request) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    graceful = server.stop()
    for t in threads:
        t.join()
    assert graceful
    assert [r.status_code for r in results] == [200, 200, 200]
    assert all(np.array_equal(decode_png(r.content), truth) for r in results)

    again = Server(repo)
    try:
        assert httpx.get(f"{again.url}/engines").json()["engines"] == before
    finally:
        again.stop()


def test_several_workers_share_metrics_and_accept_model_changes(engines, tmp_path):
    """`SEGMENT_WORKERS=2`: /metrics adds up every worker's counts whichever worker answers. Switching models and
    queueing a build, once refused with 409 because they reached one worker only, now go through the control
    store to every worker (the stronger behaviour; tests/test_control.py checks each worker sees them)."""
    rgb_model(engines / "rgb.onnx")
    shared = tmp_path / "prometheus"
    shared.mkdir()
    server = Server(engines, env={"SEGMENT_WORKERS": "2", "PROMETHEUS_MULTIPROC_DIR": str(shared)})
    try:
        photo, truth = quadrants(64, 64)
        for _ in range(20):  # a new connection each time, so that both workers take some
            r = httpx.post(f"{server.url}/segment", params={"view": "labels"}, timeout=30,
                           files={"image": ("p.png", png_bytes(photo), "image/png")})
            assert r.status_code == 200 and np.array_equal(decode_png(r.content), truth)
        for _ in range(6):
            text = httpx.get(f"{server.url}/metrics", timeout=10).text
            assert 'segment_http_requests_total{method="POST",route="/segment",status="200"} 20.0' in text
            assert 'segment_stage_duration_ms_count{stage="inference"} 20.0' in text
            assert 'segment_active_model_info{backend="onnxruntime"' in text
        assert len({p.stem.rsplit("_", 1)[-1] for p in shared.glob("counter_*.db")}) == 2  # both recorded
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = httpx.post(f"{server.url}/engines/rgb/activate", headers=auth, timeout=30)
        assert r.status_code == 200 and r.json()["active"]["name"] == "rgb"
        r = httpx.post(f"{server.url}/engines", headers=auth, timeout=30,
                       data={"name": "rgb16", "source": "rgb", "target": "onnxruntime", "precision": "fp16"})
        assert r.status_code == 202 and r.json()["state"] in ("queued", "running")
    finally:
        assert server.stop()


def test_requests_reuse_the_service_threads_on_a_loop_without_a_root_task(engines, monkeypatch):
    """Decode, inference and encode run on the service's own threads, kept for every next request, also where
    the event loop was started with ``run_forever`` and has no root task, as in a Ray Serve replica: there anyio's
    worker threads (FastAPI's default for blocking work) last one request, and a thread that runs the GPU costs
    its start-up on every request (docs/ray.md)."""
    import asyncio

    import uvicorn

    from app.core.config import Settings
    from app.main import create_app

    rgb_model(engines / "rgb.onnx", height="H", width="W")
    app = create_app(Settings(engines_dir=engines, model="rgb", results_dir=engines.parent / "results"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    loop = asyncio.new_event_loop()

    def run():
        loop.create_task(server.serve()).add_done_callback(lambda _: loop.stop())
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    photo, truth = quadrants(48, 64)
    started = []
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/segment?view=labels"
        for _ in range(3):  # the service's request threads start here
            assert httpx.post(url, files={"image": ("p.png", png_bytes(photo), "image/png")}).status_code == 200
        real_start = threading.Thread.start
        monkeypatch.setattr(threading.Thread, "start", lambda t: (started.append(t), real_start(t))[1])
        for _ in range(10):
            r = httpx.post(url, files={"image": ("p.png", png_bytes(photo), "image/png")})
            assert r.status_code == 200 and np.array_equal(decode_png(r.content), truth)
        time.sleep(0.5)  # a thread that lasted one request has ended by now
        # The pool may still add a thread (a request can come before the last one's thread says it is idle), and
        # keeps it: none of its threads ends, and no other kind starts.
        assert [t.name for t in started if not t.name.startswith("segment-request")] == []
        assert [t.name for t in started if not t.is_alive()] == []
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_cancelled_request_holds_its_model_until_its_thread_is_done(engines):
    """A request cancelled while its work runs on a request thread (its client gone, a Serve timeout) keeps its
    model until that thread is done, and only then answers with the cancellation: the thread cannot be stopped,
    and a model let go of meanwhile could be closed under it."""
    import asyncio

    from app.core.config import Settings
    from app.serving.state import ServiceState

    rgb_model(engines / "rgb.onnx", height="H", width="W")
    state = ServiceState(Settings(engines_dir=engines, model="rgb"))
    state.start()
    model, go_on, done = state.model, threading.Event(), []

    def work():
        go_on.wait(10)
        done.append(True)

    async def request():
        async with state.hold():
            await state.run(work)

    async def main():
        task = asyncio.create_task(request())
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.sleep(0.1)
        held_while_working = (task.done(), model._users)
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        return held_while_working

    try:
        assert asyncio.run(main()) == (False, 1)  # cancelled, yet still waiting, the model held
        assert done == [True] and model._users == 0
    finally:
        state.stop()
    with pytest.raises(Exception, match="no model is loaded"):  # stopped: a request answers 503, not a crash
        asyncio.run(state.run(work))
