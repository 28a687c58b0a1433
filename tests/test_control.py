"""The control plane (docs/control-plane.md): the SQLite store, per-request models, model control, build jobs in the
store, crash consistency, and the real `segment serve --workers 3`."""

import fcntl
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from app.builds.jobs import MACHINE_LOCK, JobQueue
from app.core.errors import Conflict
from app.engines import OrtOptions, load_model
from app.engines.memory import gpu_growth, load_device_bytes, process_gpu_bytes
from app.engines.tensorrt import engine_device_bytes
from app.repository import ControlStore, pid_alive

from .models import RGB_META, ROOT, argmin_model, decode_png, make_client, png_bytes, quadrants, rgb_model
from .server import TOKEN as SERVER_TOKEN
from .server import Server

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PHOTO, TRUTH = quadrants(64, 64)
WEAKEST = np.argmin(np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230]])[TRUTH], axis=-1)  # argmin's answer


def wait(predicate, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def segment(client, **params):
    return client.post("/segment", params={"view": "labels", **params},
                       files={"image": ("p.png", png_bytes(PHOTO), "image/png")})


# ---- the store on its own -----------------------------------------------------------------------------------

def test_store_default_wanted_and_generation(tmp_path):
    store = ControlStore(tmp_path / "c.db")
    assert store.choose_default("a", ["a", "b"])[0] == "a"
    g = store.generation()
    store.load("b")
    desired = store.desired()
    assert desired.default == "a" and desired.loaded == {"a", "b"} and desired.generation == g + 1
    store.load("b")
    assert store.generation() == g + 1  # nothing changed, no bump (workers do not reconcile for nothing)
    with pytest.raises(Conflict, match="default"):
        store.unload("a")
    store.set_default("b")  # the old default was never loaded on its own: it goes
    assert store.desired().loaded == {"b"} and store.generation() == g + 2
    store.load("a")
    store.set_default("a")
    store.unload("b")
    assert store.desired().loaded == {"a"} and store.generation() == g + 5
    store.set_default("b")
    # After a restart: the default set through the API persists while SEGMENT_MODEL is unchanged, also when the
    # configured model is gone; a changed SEGMENT_MODEL that exists wins.
    again = ControlStore(tmp_path / "c.db")
    assert again.choose_default("a", ["a", "b"])[0] == "b"
    assert again.choose_default("gone", ["a", "b"])[0] == "b"
    assert again.choose_default("a", ["a", "b"])[0] == "a"
    assert again.choose_default("a", ["c"])[0] is None  # a misconfiguration is said, not guessed around
    assert again.choose_default("a", []) == (None, "")


def test_store_survives_kill_9_mid_transaction(tmp_path):
    """A process killed inside a write transaction: the last committed state is intact, the lock is free."""
    path = tmp_path / "c.db"
    store = ControlStore(path)
    store.set_default("a")
    code = (f"import time\nfrom app.repository import ControlStore\nstore = ControlStore({str(path)!r})\n"
            "with store.transaction() as db:\n"
            "    for i in range(5000):\n"
            "        db.execute(\"INSERT INTO wanted (name, since) VALUES (?, 0)\", (f'm{i}',))\n"
            "    db.execute(\"UPDATE settings SET value = 'x' WHERE key = 'default'\")\n"
            "    print('inside', flush=True)\n"
            "    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "inside"
        assert store.desired().default == "a"  # readers read while the writer holds its lock (WAL)
    finally:
        proc.kill()
        proc.wait()
    desired = store.desired()
    assert desired.default == "a" and desired.loaded == {"a"}
    store.load("b")  # the write lock went with the process
    assert store.desired().loaded == {"a", "b"}
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_store_from_before_gpu_figures_takes_them(tmp_path):
    """A control store written by a version without the GPU column opens, and reports carry both figures."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE workers (host TEXT NOT NULL, pid INTEGER NOT NULL, model TEXT NOT NULL, state TEXT "
                   "NOT NULL, error TEXT, memory_bytes INTEGER, generation INTEGER, serving TEXT, updated REAL NOT "
                   "NULL, PRIMARY KEY (host, pid, model))")
    store = ControlStore(path)
    store.report(os.getpid(), {"a": {"state": "loaded", "memory_bytes": 5, "device_bytes": 7}}, 1, "a")
    (row,) = store.workers()
    assert (row["model"], row["memory_bytes"], row["device_bytes"]) == ("a", 5, 7)
    ControlStore(path)  # opening it again adds nothing twice


# ---- memory a load takes ------------------------------------------------------------------------------------


def nvml_like(listing: dict[int, list[tuple[int, int | None]]], asked: list):
    """A process lister as NVML answers: per device index, (pid, used bytes) of each compute process; None for a
    device it does not have. Records the devices asked for."""
    def processes(device: int):
        asked.append(device)
        if device not in listing:
            return None
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in listing[device]]
    return processes


def test_process_gpu_bytes_reads_one_process_of_one_device():
    asked = []
    lister = nvml_like({0: [(10, 300), (11, 999), (10, 200)], 1: [(10, None)]}, asked)
    assert process_gpu_bytes(10, 0, lister) == 500  # a process listed twice (MIG instances) counts twice
    assert process_gpu_bytes(12, 0, lister) == 0  # no CUDA context on that GPU yet
    assert process_gpu_bytes(10, 1, lister) is None  # NVML has no figure for it
    assert process_gpu_bytes(10, 2, lister) is None  # no such GPU
    assert asked == [0, 0, 1, 2]
    assert gpu_growth(100, 350) == 250 and gpu_growth(300, 200) == 0
    assert gpu_growth(None, 350) is None and gpu_growth(100, None) is None
    assert gpu_growth(0, 0) is None  # not listed after a load onto the GPU: another pid namespace
    assert process_gpu_bytes(os.getpid(), 99) is None  # the real NVML (or its absence): no GPU 99, no error


class LoadedOn:
    """A loaded model as ``load_device_bytes`` reads it: its device and its backend's own figure and device."""

    def __init__(self, device: str, held: int | None, device_index: int = 0):
        self.device = device
        self.runtime = SimpleNamespace(device_bytes=lambda: held, device_index=device_index)


def test_load_device_bytes_per_backend(engines):
    pid, asked = os.getpid(), []
    lister = nvml_like({1: [(pid, 1_500)]}, asked)
    assert load_device_bytes(LoadedOn("cuda", None, device_index=1), pid, 1_000, lister) == 500  # ONNX Runtime
    assert load_device_bytes(LoadedOn("cuda", 4_096), pid, 1_000, lister) == 4_096  # TensorRT knows its own
    assert load_device_bytes(LoadedOn("cuda", None, device_index=1), pid, None, lister) is None  # no reading before
    assert asked == [1, 1]
    cpu = load_model(rgb_model(engines / "m.onnx"), ort=OrtOptions(providers="cpu"))
    try:
        assert load_device_bytes(cpu, pid, 0, lister) is None and asked == [1, 1]  # the CPU: nothing to ask
    finally:
        cpu.close()


def test_engine_device_bytes_across_tensorrt_versions():
    """The context's memory plus the weights: TensorRT 10's names, and the older ones (the plan's size stands in for
    weights where the engine has no statistics)."""
    stat = SimpleNamespace(TOTAL_WEIGHTS_SIZE="total weights")

    class Engine10:
        device_memory_size_v2 = 1_000

        def get_engine_stat(self, which):
            return {"total weights": 20_000}[which]

    class Engine8:
        device_memory_size = 700

    assert engine_device_bytes(Engine10(), SimpleNamespace(EngineStat=stat), plan_bytes=25_000) == 21_000
    assert engine_device_bytes(Engine8(), SimpleNamespace(), plan_bytes=25_000) == 25_700


# ---- build jobs in the store --------------------------------------------------------------------------------

def python_job(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_jobs_one_per_machine_in_order_and_a_killed_builder_fails_with_the_reason(tmp_path):
    """Two queues on one store (two workers): one build at a time, oldest first; killing the build's process
    fails its job with the reason, and the next one runs."""
    store = ControlStore(tmp_path / "c.db")
    first, second = JobQueue(store), JobQueue(store)
    try:
        slow = first.run("slow", python_job("import time; print('started', flush=True); time.sleep(120)"))
        quick = second.run("quick", python_job("print('done')"))
        wait(lambda: "started" in slow.progress, "the first build to start")
        assert slow.state == "running" and quick.state == "queued"  # the machine's one build slot is taken
        with pytest.raises(Conflict, match="already running"):
            second.run("slow", python_job("print('again')"))
        os.kill(slow.child_pid, signal.SIGKILL)
        wait(lambda: slow.state == "failed", "the killed build to be marked failed")
        assert "killed (signal 9)" in slow.error
        wait(lambda: quick.state == "succeeded", "the queued build to run next")
        assert quick.progress == ["done"] and quick.started >= slow.finished
    finally:
        first.stop()
        second.stop()


def test_a_job_whose_worker_died_is_failed_by_another(tmp_path):
    """The worker running a build is killed with kill -9: its build process dies with it, and another worker
    marks the job failed with the reason instead of leaving it running."""
    path = tmp_path / "c.db"
    code = (f"import time\nfrom app.builds.jobs import JobQueue\nfrom app.repository import ControlStore\n"
            f"q = JobQueue(ControlStore({str(path)!r}))\n"
            "q.run('b', ['sleep', '120'])\n"
            "time.sleep(120)\n")
    worker = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    store = ControlStore(path)
    try:
        job = wait(lambda: next(iter(store_jobs(store)), None), "the job to be queued")
        wait(lambda: store.job(job)["child_pid"], "the build to start")
        child = store.job(job)["child_pid"]
    finally:
        worker.kill()
        worker.wait()
    other = JobQueue(store)
    try:
        wait(lambda: store.job(job)["state"] == "failed", "the orphaned job to be failed")
        assert "builder died" in store.job(job)["error"]
        wait(lambda: not pid_alive(child), "the build process to die with its worker")
    finally:
        other.stop()


def store_jobs(store: ControlStore) -> list[str]:
    with sqlite3.connect(store.path) as db:
        return [r[0] for r in db.execute("SELECT id FROM jobs ORDER BY seq")]


# ---- per-request models and model control, in one process -------------------------------------------------

@pytest.fixture
def two_models(engines):
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    argmin_model(engines / "weakest.onnx")
    return engines


def test_model_per_request_and_model_control(two_models):
    with make_client(two_models, "rgb", admin_token=TOKEN) as c:
        r = segment(c, model="nope")
        assert r.status_code == 404 and "rgb, weakest" in r.json()["detail"]
        r = segment(c, model="weakest")
        assert r.status_code == 409 and "POST /models/weakest/load" in r.json()["detail"]
        assert c.post("/models/weakest/load").status_code == 401
        assert c.post("/models/weakest/load", headers=AUTH).status_code == 200
        r = segment(c, model="weakest")
        assert r.status_code == 200 and r.headers["x-model"] == "weakest"
        assert np.array_equal(decode_png(r.content), WEAKEST)
        r = segment(c)  # no model: the default
        assert r.headers["x-model"] == "rgb" and np.array_equal(decode_png(r.content), TRUTH)
        assert int(r.headers["x-worker"]) == os.getpid()
        body = c.post("/segment/json", params={"model": "weakest"},
                      files={"image": ("p.png", png_bytes(PHOTO), "image/png")}).json()
        assert body["model"]["name"] == "weakest"
        listing = {m["name"]: m for m in c.get("/models").json()["models"]}
        assert listing["rgb"]["default"] and listing["rgb"]["state"] == "loaded"
        assert listing["weakest"]["workers_loaded"] == 1 and listing["weakest"]["kind"] == "onnx"
        assert listing["weakest"]["classes"] == RGB_META["class_names"]
        assert c.get("/bench", headers=AUTH, params={"model": "weakest", "iterations": 1}).status_code == 200
        text = c.get("/metrics").text
        assert 'segment_model_requests_total{model="weakest",route="/segment",status="200"} 1.0' in text
        assert 'segment_loaded_models{model="weakest"} 1.0' in text
        r = c.post("/models/rgb/unload", headers=AUTH)
        assert r.status_code == 409 and "default" in r.json()["detail"]
        assert c.post("/models/weakest/default", headers=AUTH).status_code == 200
        assert segment(c).headers["x-model"] == "weakest"
        assert c.post("/models/rgb/unload", headers=AUTH).status_code == 200
        assert segment(c, model="rgb").status_code == 409
        assert {m["name"]: m["state"] for m in c.get("/models").json()["models"]} == \
            {"rgb": "unloaded", "weakest": "loaded"}


def test_models_show_the_memory_each_load_took(two_models):
    """On the CPU: host RSS growth per worker and summed, GPU memory null; nothing for a model not loaded."""
    with make_client(two_models, "rgb", admin_token=TOKEN) as c:
        assert c.post("/models/weakest/load", headers=AUTH).status_code == 200
        listing = {m["name"]: m for m in c.get("/models").json()["models"]}
        for name in ("rgb", "weakest"):
            memory, (worker,) = listing[name]["memory"], listing[name]["workers"].values()
            assert set(memory) == {"host_rss_bytes", "device_bytes"} and memory["device_bytes"] is None
            assert isinstance(memory["host_rss_bytes"], int) and memory["host_rss_bytes"] >= 0
            assert worker == {"state": "loaded", "error": None, "memory": memory}
        assert c.post("/models/weakest/unload", headers=AUTH).status_code == 200
        weakest = next(m for m in c.get("/models").json()["models"] if m["name"] == "weakest")
        assert weakest["memory"] is None and weakest["workers"] == {}


def test_autoload_keeps_at_most_max_loaded_models_never_the_default(two_models):
    for name in ("m1", "m2"):
        rgb_model(two_models / f"{name}.onnx", height="H", width="W")
    with make_client(two_models, "rgb", admin_token=TOKEN, autoload=True, max_loaded_models=2) as c:
        for name in ("weakest", "m1", "m2"):
            r = segment(c, model=name)
            assert r.status_code == 200 and r.headers["x-model"] == name
        loaded = {m["name"] for m in c.get("/models").json()["models"] if m["state"] == "loaded"}
        assert loaded == {"rgb", "m2"}  # weakest, then m1 made room; the default stayed
        assert segment(c, model="nope").status_code == 404


def test_a_model_that_cannot_load_is_refused_with_its_reason(two_models):
    (two_models / "broken.onnx").write_bytes(b"garbage")
    with make_client(two_models, "rgb", admin_token=TOKEN) as c:
        r = c.post("/models/broken/load", headers=AUTH)
        assert r.status_code == 400 and r.json()["detail"]
        assert "broken" not in c.app.state.service.store.desired().loaded  # nothing asked of the other workers
        assert segment(c).headers["x-model"] == "rgb"


def test_deleting_a_loaded_model_unloads_it_first(two_models):
    with make_client(two_models, "rgb", admin_token=TOKEN) as c:
        assert c.post("/models/weakest/load", headers=AUTH).status_code == 200
        assert c.delete("/engines/weakest", headers=AUTH).status_code == 200
        assert "weakest" not in c.app.state.service.models.loaded()
        assert not (two_models / "weakest.onnx").exists()
        assert segment(c, model="weakest").status_code == 404


# ---- issue 23: items 7, 8, 10 ---------------------------------------------------------------------------------

def test_restart_after_kill_9_serves_the_persisted_default_when_the_configured_model_is_gone(two_models):
    """Activate another model, delete the one the server started with, kill -9, restart with the same settings:
    the server is ready, serving the persisted default."""
    auth = {"Authorization": f"Bearer {SERVER_TOKEN}"}
    server = Server(two_models, model="rgb")
    try:
        assert httpx.post(f"{server.url}/engines/weakest/activate", headers=auth, timeout=30).status_code == 200
        assert httpx.delete(f"{server.url}/engines/rgb", headers=auth, timeout=30).status_code == 200
    finally:
        server.proc.kill()
        server.proc.wait()
    again = Server(two_models, model="rgb")  # raises unless /readyz answers 200
    try:
        assert httpx.get(f"{again.url}/readyz").json()["model"] == "weakest"
        assert "persisted default 'weakest'" in again.log.read_text()
    finally:
        again.stop()


CRASHING_REGISTRATION = """
import json, os, signal, sys
from pathlib import Path
from app.core.metadata import ModelMeta
from app.repository import ModelRepository

when, root, source, meta = sys.argv[1:]
def crashing(real):
    def move(src, dst, *args, **kwargs):
        if str(dst).endswith("new.onnx"):  # the model being published: die just before, or just after
            if when == "after":
                real(src, dst, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst, *args, **kwargs)
    return move
os.replace, os.rename = crashing(os.replace), crashing(os.rename)
repository = ModelRepository(Path(root))
staged = repository.temp_upload()
staged.write_bytes(Path(source).read_bytes())
repository.register_onnx("new", staged, ModelMeta.model_validate(json.loads(meta)))
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_registration_killed_at_publication_is_all_or_nothing(two_models, tmp_path, when):
    """kill -9 just before or just after the model file is renamed into place: after a restart the model is
    either absent or listed with its own metadata, and no staged file is left."""
    source = rgb_model(tmp_path / "upload.onnx", height="H", width="W", meta=None)
    meta = {**RGB_META, "class_names": ["rouge", "vert", "bleu"]}
    proc = subprocess.run([sys.executable, "-c", CRASHING_REGISTRATION, when, str(two_models), str(source),
                           json.dumps(meta)], cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    with make_client(two_models, "rgb") as c:
        entries = {e["name"]: e for e in c.get("/engines").json()["engines"]}
    if when == "before":
        assert "new" not in entries
    else:
        assert entries["new"]["metadata"]["class_names"] == ["rouge", "vert", "bleu"]
    assert [p.name for p in two_models.iterdir() if p.name.startswith(".upload")] == []


def test_a_second_build_of_a_name_queued_or_running_is_refused(two_models):
    rgb_model(two_models / "conv.onnx", height=64, width=64, conv=True)
    form = {"name": "conv16", "source": "conv", "target": "onnxruntime", "precision": "fp16"}
    with make_client(two_models, "rgb", admin_token=TOKEN) as c:
        with open(MACHINE_LOCK, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another build holds this machine: ours stays queued
            first = c.post("/engines", headers=AUTH, data=form)
            assert first.status_code == 202 and first.json()["state"] == "queued"
            second = c.post("/engines", headers=AUTH, data=form)
            assert second.status_code == 409 and "already queued" in second.json()["detail"]
        job = wait(lambda: (j := c.get(first.json()["status_url"]).json())["state"] in ("succeeded", "failed") and j,
                   "the build to finish", timeout=120)
        assert job["state"] == "succeeded", job


# ---- the real thing: `segment serve --workers 3` --------------------------------------------------------------

WORKERS = 3
ADMIN = {"Authorization": f"Bearer {SERVER_TOKEN}"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    engines = tmp_path_factory.mktemp("cluster") / "engines"
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    argmin_model(engines / "weakest.onnx")
    rgb_model(engines / "conv.onnx", height=64, width=64, conv=True)
    server = Server(engines, model="rgb", workers=WORKERS)
    try:
        yield server
    finally:
        assert server.stop()


def post_segment(server, **params):
    return httpx.post(f"{server.url}/segment", params={"view": "labels", **params}, timeout=30,
                      files={"image": ("p.png", png_bytes(PHOTO), "image/png")})


def test_changes_through_one_worker_reach_every_worker(cluster):
    loaded = httpx.post(f"{cluster.url}/models/weakest/load", headers=ADMIN, timeout=30)
    assert loaded.status_code == 200
    answers = cluster.until_every_worker(lambda: post_segment(cluster, model="weakest"),
                                         lambda r: r.status_code == 200, WORKERS)
    assert all(np.array_equal(decode_png(r.content), WEAKEST) for r in answers.values())
    for default, truth in (("weakest", WEAKEST), ("rgb", TRUTH)):
        r = httpx.post(f"{cluster.url}/models/{default}/default", headers=ADMIN, timeout=30)
        assert r.status_code == 200
        answers = cluster.until_every_worker(lambda: post_segment(cluster),
                                             lambda r: r.headers.get("x-model") == default, WORKERS)
        assert all(np.array_equal(decode_png(r.content), truth) for r in answers.values())
    listing = cluster.until_every_worker(
        lambda: httpx.get(f"{cluster.url}/models", timeout=10),
        lambda r: {m["name"]: m["workers_loaded"] for m in r.json()["models"]}.get("weakest") == WORKERS, WORKERS)
    assert all(r.json()["default"] == "rgb" for r in listing.values())
    assert httpx.post(f"{cluster.url}/models/weakest/unload", headers=ADMIN, timeout=30).status_code == 200
    cluster.until_every_worker(lambda: post_segment(cluster, model="weakest"), lambda r: r.status_code == 409,
                               WORKERS)


def test_a_build_queued_through_one_worker_is_seen_and_served_by_all(cluster):
    r = httpx.post(f"{cluster.url}/engines", headers=ADMIN, timeout=30,
                   data={"name": "conv16", "source": "conv", "target": "onnxruntime", "precision": "fp16"})
    assert r.status_code == 202, r.text
    status = f"{cluster.url}{r.json()['status_url']}"
    answers = cluster.until_every_worker(lambda: httpx.get(status, timeout=10),
                                         lambda r: r.json()["state"] == "succeeded", WORKERS)
    assert all(any("parity" in line for line in a.json()["progress"]) for a in answers.values())
    assert httpx.post(f"{cluster.url}/models/conv16/load", headers=ADMIN, timeout=30).status_code == 200
    cluster.until_every_worker(lambda: post_segment(cluster, model="conv16"),
                               lambda r: r.status_code == 200 and r.headers["x-model"] == "conv16", WORKERS)
    assert httpx.delete(f"{cluster.url}/engines/conv16", headers=ADMIN, timeout=30).status_code == 200
    cluster.until_every_worker(lambda: post_segment(cluster, model="conv16"), lambda r: r.status_code == 404,
                               WORKERS)


def test_a_worker_killed_while_models_change_comes_back_in_step(cluster):
    """kill -9 one worker, change the default through the others: the restarted worker serves the new default."""
    before = set(cluster.until_every_worker(lambda: httpx.get(f"{cluster.url}/healthz", timeout=10),
                                            lambda r: r.status_code == 200, WORKERS))
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    try:
        r = httpx.post(f"{cluster.url}/models/weakest/default", headers=ADMIN, timeout=30)
        assert r.status_code == 200 and int(r.headers["x-worker"]) != victim
        answers = cluster.until_every_worker(lambda: post_segment(cluster),
                                             lambda r: r.headers.get("x-model") == "weakest", WORKERS, timeout=120)
        assert victim not in answers and len(set(answers) - before) == 1  # uvicorn started a new worker
        listing = httpx.get(f"{cluster.url}/models", timeout=10).json()
        assert str(victim) not in {pid for m in listing["models"] for pid in m["workers"]}
    finally:
        assert httpx.post(f"{cluster.url}/models/rgb/default", headers=ADMIN, timeout=30).status_code == 200
