"""Ray Serve mode on a real two-node Ray cluster on loopback (``ray.cluster_utils.Cluster``: a head and one worker
node, separate raylets, one machine): every route, placement on both nodes, a model switch and a node lost under
load, a model that cannot load, a clean shutdown.

One session-scoped cluster (starting and stopping Ray takes seconds); Ray's ports come from a private range; a
watchdog ends the run if Ray ever hangs. Skipped, saying why, where the ``cluster`` extra is not installed.
"""

import fcntl
import faulthandler
import functools
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from app.builds.jobs import MACHINE_LOCK, JobQueue
from app.client import Client, ConnectionFailed
from app.repository import ControlStore

from .models import ROOT, decode_png, make_client, png_bytes, quadrants, raw_rgb_model, rgb_model, slow_rgb_model
from .server import free_port

# Set before Ray is imported: loopback only (without it ray.init rewrites 127.0.0.1 to the host address and
# can wait forever), no token file written to ~/.ray, no usage reporting.
# The proxy routes to replicas on any node, not first its own (so the fused layout's requests reach both nodes).
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}
os.environ.update(RAY_ENV)
ray = pytest.importorskip("ray", reason="Ray Serve is the `cluster` extra: pip install -e '.[cluster]'")
serve = pytest.importorskip("ray.serve")
from app.cluster.builds import RayRunner  # noqa: E402  (after the skip: it imports Ray)

PORTS = range(18600, 18800)  # Ray's listeners in tests: one private range on 127.0.0.1
WATCHDOG_S = 420  # a hang guard for the module (it takes 1.5 to 3 minutes on the 2-core CI box)


def private_ports(n: int, taken: set[int]) -> list[int]:
    found = []
    for port in PORTS:
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        taken.add(port)
        if len(found) == n:
            return found
    raise RuntimeError(f"no {n} free ports in {PORTS}")


def node_args(taken: set[int], cpus: float, **extra) -> dict:
    gcs, agent, metrics, env_agent, manager, objects = private_ports(6, taken)
    workers = private_ports(16, taken)
    return {"num_cpus": cpus, "node_ip_address": "127.0.0.1", "object_store_memory": 128 * 2**20,
            "node_manager_port": manager, "object_manager_port": objects, "dashboard_agent_listen_port": agent,
            "metrics_export_port": metrics, "runtime_env_agent_port": env_agent,
            "worker_port_list": ",".join(map(str, workers)),
            **({"gcs_server_port": gcs} if extra.pop("head", False) else {}), **extra}


class RayCluster:
    """A head and a worker node, Serve on the head's HTTP port, and the service deployed as ``segment``."""

    def __init__(self, tmp: Path, ray_dir: Path):
        from ray.cluster_utils import Cluster

        self.tmp, self.ray_dir, self.taken = tmp, ray_dir, set()
        self.http_port = private_ports(1, self.taken)[0]
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.cluster = Cluster(initialize_head=True, head_node_args=node_args(
            self.taken, 2, head=True, include_dashboard=False, temp_dir=str(ray_dir / "ray"), resources={"head": 1}))
        self.head_id = self.cluster.head_node.node_id
        self.worker = self.cluster.add_node(**node_args(self.taken, 1))
        self.worker_id = self.worker.node_id
        ray.init(address=self.cluster.address, log_to_driver=False)
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": self.http_port},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
        self.down = False

    def deploy(self, name: str, route: str, **settings):
        from app.cluster.deployments import application
        from app.core.config import Settings

        s = Settings(**{"engines_dir": self.tmp / "engines", "ray_ingress_cpus": 0.1, "ray_model_cpus": 0.5,
                        "allow_unauthenticated_admin": True, **settings})
        serve.run(application(s, ingress_resources={"head": 0.01}), name=name, route_prefix=route)

    def wait_ready(self, prefix: str = "", timeout: float = 60) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while True:
            r = httpx.get(f"{self.url}{prefix}/readyz", timeout=10)
            if r.status_code == 200 or time.monotonic() > deadline:
                return r
            time.sleep(0.3)

    def processes(self) -> list[str]:
        """Command lines of live processes started for this cluster (they all name its temp folder or ports)."""
        marker = str(self.ray_dir)
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if marker in cmd and int(proc.name) != os.getpid():
                    found.append(cmd[:200])
        return found

    def shutdown(self) -> None:
        if self.down:
            return
        self.down = True
        faulthandler.cancel_dump_traceback_later()
        try:
            serve.shutdown()
        finally:
            try:
                ray.shutdown()
            finally:
                self.cluster.shutdown()


@pytest.fixture(scope="module")  # torn down right after this module's tests, the watchdog with it
def cluster(tmp_path_factory):
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)  # a Ray hang ends the run, with tracebacks
    tmp = tmp_path_factory.mktemp("cluster")
    engines = tmp / "engines"
    engines.mkdir()
    rgb_model(engines / "rgb.onnx")  # float32 NCHW input
    raw_rgb_model(engines / "raw.onnx")  # uint8 NHWC input
    (engines / "broken.onnx").write_bytes(b"not an onnx file")
    # Ray's sessions (logs, sockets) in a short path of their own: socket paths have a length limit.
    ray_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    (ray_dir / "ray").mkdir()
    os.environ["RAY_TMPDIR"] = str(ray_dir)  # where Ray also writes the current cluster's address
    c = None
    try:
        c = RayCluster(tmp, ray_dir)
        c.deploy("segment", "/", model="rgb", ray_min_replicas=2, ray_max_replicas=2, batch_max=4)
        yield c
    finally:
        if c is not None:
            c.shutdown()
        del os.environ["RAY_TMPDIR"]
        shutil.rmtree(ray_dir, ignore_errors=True)
        faulthandler.cancel_dump_traceback_later()


def segment(url: str, data: bytes, **params) -> httpx.Response:
    return httpx.post(f"{url}/segment", files={"image": ("photo.png", data, "image/png")}, params=params,
                      timeout=30)


def test_settings_reach_the_replicas_as_variables_that_parse_back(monkeypatch):
    """``env_of``: the settings a replica is deployed with come back the same from its ``SEGMENT_*`` variables;
    one explicitly None (unset) gives no variable at all, replacing one in this environment."""
    from app.cluster.deployments import env_of
    from app.core.config import Settings

    monkeypatch.setenv("SEGMENT_RAY_MAX_REPLICAS_PER_NODE", "3")
    s = Settings(model="m", batch_max=4, ray_model_gpus=0.5, ray_max_replicas_per_node=None,
                 ort_cuda_options={"prefer_nhwc": 1})
    env = env_of(s)
    assert "SEGMENT_RAY_MAX_REPLICAS_PER_NODE" not in env
    for key in [k for k in os.environ if k.startswith("SEGMENT_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    back = Settings()
    assert (back.model, back.batch_max, back.ray_model_gpus, back.ray_max_replicas_per_node,
            back.ort_cuda_options) == ("m", 4, 0.5, None, {"prefer_nhwc": 1})


def test_every_route_answers_as_the_embedded_service(cluster, tmp_path):
    """Same PNG bytes, same errors, the page, the repository, metrics; headers name the replicas and nodes."""
    assert cluster.wait_ready().json() == {"status": "ready", "model": "rgb"}
    photo, truth = quadrants(96, 160)
    data = png_bytes(photo)
    engines = cluster.tmp / "engines"
    with make_client(engines, "rgb", control_db=tmp_path / "embedded.db") as embedded:
        for view in ("mask", "labels", "overlay"):
            r, e = segment(cluster.url, data, view=view), embedded.post(
                "/segment", files={"image": ("photo.png", data, "image/png")}, params={"view": view})
            assert r.status_code == e.status_code == 200
            assert r.content == e.content, view
        for bad in (b"not an image", png_bytes(photo)[:200]):
            r, e = segment(cluster.url, bad), embedded.post("/segment", files={"image": ("x.png", bad, "image/png")})
            assert (r.status_code, r.json()) == (e.status_code, e.json())
        r = segment(cluster.url, data, view="nope")
        assert r.status_code == 422
        j, ej = (c.post("/segment/json", files={"image": ("p.png", data, "image/png")}) for c in (httpx.Client(
            base_url=cluster.url, timeout=30), embedded))
        assert j.status_code == 200
        assert {k: v for k, v in j.json().items() if k != "timings_ms"} == \
               {k: v for k, v in ej.json().items() if k != "timings_ms"}
    r = segment(cluster.url, data, view="labels")
    assert np.array_equal(decode_png(r.content), truth)
    assert {"x-ingress-replica", "x-ingress-node", "x-model-replica", "x-model-node", "x-model-batch",
            "x-model"} <= set(r.headers)
    assert r.headers["x-ingress-node"] == cluster.head_id
    assert httpx.get(f"{cluster.url}/").text.startswith("<!doctype html>")
    assert httpx.get(f"{cluster.url}/models/active").json()["name"] == "rgb"
    assert {e["name"] for e in httpx.get(f"{cluster.url}/engines").json()["engines"]} >= {"rgb", "raw"}
    assert "segment_http_requests_total" in httpx.get(f"{cluster.url}/metrics").text
    models = httpx.get(f"{cluster.url}/models").json()
    assert models["default"] == "rgb" and "rgb" in models["loaded_here"]
    r = segment(cluster.url, data, model="nope")  # refused by the ingress before anything is routed
    assert r.status_code == 404 and "known models" in r.json()["detail"]
    # A model replica without GPU decoding declines a JPEG sent to it (the ingress then decodes it itself).
    handle = serve.get_deployment_handle("SegmentModel", app_name="segment").options(multiplexed_model_id="rgb")
    labels, where = handle.infer_jpeg.remote(b"\xff\xd8 a JPEG").result(timeout_s=60)
    assert labels is None and {"replica", "node"} <= set(where)


def test_requests_land_on_both_nodes(cluster):
    """Two model replicas, spread by Serve over the head and the worker node; both answer."""
    photo, truth = quadrants(64, 64)
    nodes = Counter()
    for _ in range(40):
        r = segment(cluster.url, png_bytes(photo), view="labels")
        assert r.status_code == 200 and np.array_equal(decode_png(r.content), truth)
        nodes[r.headers["x-model-node"]] += 1
        if len(nodes) == 2:
            break
    assert set(nodes) == {cluster.head_id, cluster.worker_id}, nodes


def test_requests_that_arrive_while_a_batch_runs_share_the_next(cluster):
    """One model replica, batches of up to 4 and no wait at all: what arrives while the model runs (about 50 ms an
    image on one CI core) goes into the next batch, so some responses say they ran with others, and each answer is its own."""
    engines = cluster.tmp / "slow_engines"
    slow_rgb_model(engines / "slow.onnx")
    cluster.deploy("batched", "/batched", engines_dir=engines, model="slow", ray_min_replicas=1, ray_max_replicas=1,
                   batch_max=4, batch_wait_ms=0, control_db=cluster.tmp / "batched.db")
    try:
        assert cluster.wait_ready("/batched").status_code == 200
        photo, truth = quadrants(256, 256)
        sizes, wrong = [], []

        def client(turn: int):
            for i in range(3):
                k = (turn + i) % 4  # four different photos, each with its own answer
                r = segment(f"{cluster.url}/batched", png_bytes(np.rot90(photo, k).copy()), view="labels")
                if r.status_code != 200 or not np.array_equal(decode_png(r.content), np.rot90(truth, k)):
                    wrong.append((r.status_code, r.text[:200]))
                sizes.append(int(r.headers.get("x-model-batch", 0)))

        threads = [threading.Thread(target=client, args=(t,)) for t in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not wrong
        assert len(sizes) == 36 and max(sizes) > 1 and max(sizes) <= 4, sizes
    finally:
        serve.delete("batched")


def test_the_fused_layout_serves_the_whole_app_in_each_replica(cluster):
    """``ray_layout="fused"``: each replica runs the app with models of its own (the embedded worker on Ray), one
    on each node (``ray_max_replicas_per_node``: Serve alone may put both on the head); the headers name the one
    replica as ingress and model; a model loaded through one replica is served by all, chosen per request with
    ``?model=``."""
    cluster.deploy("fused", "/fused", model="raw", ray_layout="fused", ray_min_replicas=2, ray_max_replicas=2,
                   ray_model_cpus=0.1, ray_max_replicas_per_node=1, control_db=cluster.tmp / "fused.db")
    try:
        assert cluster.wait_ready("/fused").json() == {"status": "ready", "model": "raw"}
        r = httpx.post(f"{cluster.url}/fused/models/rgb/load", timeout=120)  # every replica follows the store
        assert r.status_code == 200, r.text
        photo, truth = quadrants(64, 96)
        # The replica that took the load answers once it has the model; the other loads it when it next reads the
        # control store (409 until then, as an embedded worker would answer): wait until both have served it.
        holders, deadline = set(), time.monotonic() + 60
        while len(holders) < 2 and time.monotonic() < deadline:
            r = segment(f"{cluster.url}/fused", png_bytes(photo), view="labels", model="rgb")
            if r.status_code == 200:
                holders.add(r.headers["x-model-replica"])
            else:
                assert r.status_code == 409, r.text
        assert len(holders) == 2, holders
        nodes = Counter()
        for i in range(40):
            name = ("raw", "rgb")[i % 2]
            r = segment(f"{cluster.url}/fused", png_bytes(photo), view="labels", model=name)
            assert r.status_code == 200 and r.headers["x-model"] == name, r.text
            assert np.array_equal(decode_png(r.content), truth)
            assert r.headers["x-model-replica"] == r.headers["x-ingress-replica"]
            nodes[r.headers["x-model-node"]] += 1
            if len(nodes) == 2 and i >= 3:
                break
        assert set(nodes) == {cluster.head_id, cluster.worker_id}, nodes
        assert segment(f"{cluster.url}/fused", b"not an image").status_code == 415
        assert "raw" in httpx.get(f"{cluster.url}/fused/models", timeout=30).json()["loaded_here"]
    finally:
        serve.delete("fused")


def test_a_serve_config_file_reaches_every_replica_with_its_args(cluster):
    """deploy/serve.yaml deployed as ``serve deploy`` does it (the controller applies the file): its ``args`` reach
    the ingress and the model replicas although its ``ray_actor_options`` replace the options the application
    sets, runtime environment included. Before the settings travelled as arguments, both replicas ran on the
    defaults here (another repository, another model) and never became ready."""
    import yaml
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    (app,) = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())["applications"]
    app.update(name="fromfile", route_prefix="/fromfile")
    app["args"] = {**app["args"], "engines_dir": str(cluster.tmp / "engines"), "model": "raw",
                   "control_db": str(cluster.tmp / "fromfile.db")}
    for deployment in app["deployments"]:  # the file's own, sized for this cluster
        assert "ray_actor_options" in deployment
        deployment.pop("autoscaling_config", None)
        deployment.update(num_replicas=1, ray_actor_options={"num_cpus": 0.1, "num_gpus": 0})
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))
    try:
        assert cluster.wait_ready("/fromfile", 90).json() == {"status": "ready", "model": "raw"}
        photo, truth = quadrants(64, 96)
        r = segment(f"{cluster.url}/fromfile", png_bytes(photo), view="labels")
        assert r.status_code == 200 and r.headers["x-model"] == "raw", r.text
        assert np.array_equal(decode_png(r.content), truth)
        names = {m["name"] for m in httpx.get(f"{cluster.url}/fromfile/models", timeout=30).json()["models"]}
        assert {"raw", "rgb"} <= names and "camvid_bisenetv2" not in names, names  # the args' repository
    finally:
        serve.delete("fromfile")


def test_the_ingress_sends_a_jpeg_to_a_gpu_decoding_replica_and_decodes_it_itself_when_declined(tmp_path):
    """The split layout's JPEG path, with a stand-in for the model deployment's handle (no GPU here): a JPEG of the
    model's size goes to ``infer_jpeg`` as its bytes; a replica that declines it (None), or that predates
    ``infer_jpeg`` (a rolling update), gets the image decoded by the ingress through ``infer`` instead."""
    import cv2
    from ray.exceptions import RayTaskError

    from app.cluster.remote import RemoteModel, RemoteServedModel
    from app.core.config import Settings
    from app.engines import load_model
    from app.serving.pipeline import segment_bytes
    from app.serving.served import ServedModel

    local = ServedModel(load_model(raw_rgb_model(tmp_path / "raw.onnx")))
    photo, truth = quadrants(64, 64)
    jpeg = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
    where = {"replica": "r1", "node": "n1", "batch": 1}
    calls, jpeg_answer = [], []

    class Call:
        def __init__(self, method):
            self.method = method

        def remote(self, *args):
            calls.append(self.method)
            if self.method == "infer":
                answer = (local.infer(args[0]), where)
            elif isinstance(jpeg_answer[0], Exception):
                raise jpeg_answer[0]
            else:
                answer = (jpeg_answer[0], where)
            return SimpleNamespace(result=lambda timeout_s: answer, cancel=lambda: None)

    class Handle:
        def options(self, multiplexed_model_id):
            assert multiplexed_model_id == "raw"
            return SimpleNamespace(infer=Call("infer"), infer_jpeg=Call("infer_jpeg"))

    desc = {**local.describe(), "palette": local.palette.tolist(), "gpu_decode": True}
    remote = RemoteServedModel(RemoteModel.from_description(desc, tmp_path / "raw.onnx", Handle(),
                                                            Settings(gpu_decode=True)))
    assert remote.decodes_on_gpu
    off = RemoteServedModel(RemoteModel.from_description(desc, tmp_path / "raw.onnx", Handle(), Settings()))
    assert not off.decodes_on_gpu  # the ingress's own SEGMENT_GPU_DECODE: off unless asked for
    gone = AttributeError("'SegmentModel' object has no attribute 'infer_jpeg'")
    for answer, expected_calls in ((truth[None], ["infer_jpeg"]), (None, ["infer_jpeg", "infer"]),
                                   (RayTaskError("infer_jpeg", "", gone), ["infer_jpeg", "infer"])):
        calls.clear()
        jpeg_answer[:] = [answer]
        seg = segment_bytes(remote, jpeg, 10**8, 4096, gpu_decode=True)
        assert calls == expected_calls
        assert (seg.labels == truth).mean() > 0.99  # the replica's labels, or the model's on the ingress's decode
    calls.clear()
    segment_bytes(remote, png_bytes(photo), 10**8, 4096, gpu_decode=True)  # not a JPEG: decoded on the ingress
    assert calls == ["infer"]
    jpeg_answer[:] = [RayTaskError("infer_jpeg", "", ValueError("boom"))]  # a real failure is not hidden
    with pytest.raises(RayTaskError):
        segment_bytes(remote, jpeg, 10**8, 4096, gpu_decode=True)


def test_an_ingress_whose_start_fails_says_why_in_readyz(tmp_path):
    """A start-up that fails in a way nobody foresaw (here the handle refuses calls from the start-up thread, as
    Serve's throughput-optimized mode made it) is said by /readyz and the log, not lost with the thread: before,
    /readyz answered "not started" for ever. And a handle not yet used gets its router on Serve's own thread,
    which takes calls from any thread."""
    from fastapi.testclient import TestClient

    from app.cluster.remote import ClusterState
    from app.core.config import Settings
    from app.main import create_app

    class Handle:
        is_initialized = True  # initialised elsewhere: ClusterState leaves it as it is

        def options(self, **_):
            raise RuntimeError("No event loop running")

    engines = tmp_path / "engines"
    engines.mkdir()
    rgb_model(engines / "rgb.onnx")
    settings = Settings(engines_dir=engines, model="rgb", results_dir=tmp_path / "results")
    with TestClient(create_app(settings, ClusterState(settings, Handle()))) as client:
        deadline = time.monotonic() + 30
        while "could not start" not in (r := client.get("/readyz")).text and time.monotonic() < deadline:
            time.sleep(0.1)
        assert r.status_code == 503
        assert r.json()["detail"] == "the ingress could not start: RuntimeError: No event loop running"

    class Fresh(Handle):
        is_initialized = False

        def _init(self, **options):
            self.options_given = options

    fresh = Fresh()
    ClusterState(settings, fresh)  # its router on Serve's own thread, whatever the replica's default
    assert fresh.options_given == {"_run_router_in_separate_loop": True}


def test_a_model_that_cannot_load_says_why_in_readyz(cluster):
    cluster.deploy("broken", "/broken", model="broken", ray_min_replicas=1, ray_max_replicas=1,
                   control_db=cluster.tmp / "broken.db")  # its own control store: another default
    try:
        deadline = time.monotonic() + 60
        while True:
            r = httpx.get(f"{cluster.url}/broken/readyz", timeout=10)
            if "broken" in r.text or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert r.status_code == 503
        detail = r.json()["detail"]
        assert "cannot serve 'broken'" in detail and "not a readable ONNX model" in detail and "on node" in detail
        assert segment(f"{cluster.url}/broken", png_bytes(quadrants(32, 32)[0])).status_code == 503
    finally:
        serve.delete("broken")


def test_a_repository_at_a_uri_serves_through_each_replicas_cache(cluster):
    """engines_dir a file:// URI: the replicas fetch the model into their cache, checked by its sha256."""
    from app.repository import ModelRepository

    bucket = cluster.tmp / "bucket"
    rgb_model(bucket / "rgb.onnx")
    ModelRepository(bucket).stamp_sha256()
    cache = cluster.tmp / "cache"
    cluster.deploy("uri", "/uri", engines_dir=bucket.as_uri(), model="rgb", ray_min_replicas=1, ray_max_replicas=1,
                   control_db=cluster.tmp / "uri.db", model_cache_dir=cache)
    try:
        assert cluster.wait_ready("/uri").json() == {"status": "ready", "model": "rgb"}
        photo, truth = quadrants(64, 64)
        r = segment(f"{cluster.url}/uri", png_bytes(photo), view="labels")
        assert r.status_code == 200 and np.array_equal(decode_png(r.content), truth)
        assert [p.read_bytes() for p in cache.glob("*/rgb.onnx")] == [(bucket / "rgb.onnx").read_bytes()]
        r = httpx.delete(f"{cluster.url}/uri/engines/rgb")
        assert r.status_code == 409 and "read-only" in r.json()["detail"]
    finally:
        serve.delete("uri")


def test_a_build_runs_as_a_ray_task_and_is_served(cluster):
    """`POST /engines` (fp16 for ONNX Runtime) through the ingress: the build runs as a Ray task (its progress, in
    the control store, names the Ray node), the job is seen done from the API, and the model is listed and
    served. While an embedded server's build holds the machine (both nodes are this one), the task waits for it.
    A TensorRT build is refused up front: no node of this cluster has a GPU."""
    rgb_model(cluster.tmp / "engines" / "conv.onnx", conv=True)
    form = {"name": "conv_fp16", "source": "conv", "target": "onnxruntime", "precision": "fp16"}
    with open(MACHINE_LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        r = httpx.post(f"{cluster.url}/engines", data=form, timeout=30)
        assert r.status_code == 202, r.text
        status = f"{cluster.url}{r.json()['status_url']}"
        assert wait_until(lambda: any(line.startswith("waiting for the build running on Ray node")
                                      for line in httpx.get(status, timeout=10).json()["progress"]), 60)
        assert httpx.get(status, timeout=10).json()["state"] == "running"
    deadline = time.monotonic() + 120
    while (job := httpx.get(status, timeout=10).json())["state"] in \
            ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.3)
    assert job["state"] == "succeeded", job
    assert job["progress"][0] == "started as a Ray task: waiting for a node with a free CPU"
    nodes = {cluster.head_id, cluster.worker_id}
    assert any(line.startswith("building on Ray node ") and line.split()[-1] in nodes for line in job["progress"])
    assert any("parity: label agreement 100.0000%" in line for line in job["progress"]), job["progress"]
    assert job["child_pid"] is None  # no child process of the ingress replica
    listed = {m["name"]: m for m in httpx.get(f"{cluster.url}/models", timeout=10).json()["models"]}
    assert listed.get("conv_fp16", {}).get("precision") == "fp16", listed.keys()
    r = httpx.post(f"{cluster.url}/models/conv_fp16/load", timeout=120)
    assert r.status_code == 200, r.text
    photo, truth = quadrants(64, 64)
    r = segment(cluster.url, png_bytes(photo), view="labels", model="conv_fp16")
    assert r.status_code == 200 and r.headers["x-model"] == "conv_fp16", r.text
    assert np.array_equal(decode_png(r.content), truth)
    r = httpx.post(f"{cluster.url}/engines", data={**form, "name": "conv_trt", "target": "tensorrt"}, timeout=30)
    assert r.status_code == 503 and "no node of the Ray cluster has a GPU" in r.json()["detail"], r.text


class OnWorkerNode(RayRunner):
    """Builds pinned to one node (the worker node, which the node-loss test kills)."""

    def __init__(self, node_id: str):
        self.node_id = node_id

    def task_options(self, job: dict) -> dict:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(self.node_id, soft=False)}


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


class Recording(httpx.HTTPTransport):
    """Keeps every response's status and content type, the ones a client then retries included."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.seen.append((time.monotonic(), response.status_code, response.headers.get("content-type", ""),
                          response.headers.get("retry-after")))
        return response


class Load:
    """Client threads posting photos until stopped; every answer kept (status, model, headers). With ``retries``
    the shipped client posts them (retrying that often) and ``tries`` keeps every answer it had."""

    def __init__(self, url: str, clients: int = 4, retries: int | None = None):
        self.url, self.answers, self.errors, self.tries, self.retries = url, [], [], [], retries
        self.photo, self.truth = quadrants(64, 64)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self):
        data = png_bytes(self.photo)
        upload = {"files": {"image": ("p.png", data, "image/png")}, "params": {"view": "labels"}}
        # A hang would show as a timeout error here.
        if self.retries is None:
            client = httpx.Client(timeout=30)
            post = functools.partial(client.post, f"{self.url}/segment", **upload)
        else:
            client = Client(self.url, timeout=30, retries=self.retries, backoff=0.2, transport=Recording(self.tries))
            post = functools.partial(client.request, "POST", "/segment", **upload)
        with client:
            while not self.stop.is_set():
                try:
                    r = post()
                except (httpx.HTTPError, ConnectionFailed) as exc:
                    self.errors.append(repr(exc))
                    continue
                ok = r.status_code == 200 and np.array_equal(decode_png(r.content), self.truth)
                self.answers.append((time.monotonic(), r.status_code, ok, r.headers.get("x-model"),
                                     r.headers.get("retry-after"), r.headers.get("x-model-node")))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def wait_for(self, predicate, timeout: float) -> float | None:
        """Seconds until an answer satisfies ``predicate`` (None if none did within ``timeout``)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if any(predicate(a) for a in list(self.answers)):
                return time.monotonic() - start
            time.sleep(0.1)
        return None


def test_models_chosen_per_request(cluster):
    """`POST /models/raw/load` reaches every replica (through the control store); then `?model=` picks either
    model per request, each answered by the model it named, on both nodes."""
    cluster.wait_ready()
    r = httpx.post(f"{cluster.url}/models/raw/load", timeout=120)
    assert r.status_code == 200, r.text
    photo, truth = quadrants(64, 64)
    seen = Counter()
    for i in range(40):
        name = ("rgb", "raw")[i % 2]
        r = segment(cluster.url, png_bytes(photo), view="labels", model=name)
        assert r.status_code == 200 and r.headers["x-model"] == name
        assert np.array_equal(decode_png(r.content), truth)
        seen[(name, r.headers["x-model-node"])] += 1
    assert {n for n, _ in seen} == {"rgb", "raw"}
    assert {node for _, node in seen} == {cluster.head_id, cluster.worker_id}, seen


def test_switching_the_default_under_load_loses_no_request(cluster):
    """`POST /models/raw/default` under load: every request answered, by the old default, then by the new one."""
    cluster.wait_ready()
    with Load(cluster.url) as load:
        assert load.wait_for(lambda a: a[1] == 200, 30) is not None
        r = httpx.post(f"{cluster.url}/models/raw/default", timeout=120)
        assert r.status_code == 200, r.text
        assert load.wait_for(lambda a: a[3] == "raw", 60) is not None
        time.sleep(1)
    assert not load.errors, load.errors[:3]
    assert all(ok for _, _, ok, *_ in load.answers), Counter((a[1], a[3]) for a in load.answers)
    models = [a[3] for a in sorted(load.answers)]
    assert models[0] == "rgb" and models[-1] == "raw"
    assert httpx.get(f"{cluster.url}/models/active").json()["name"] == "raw"


def test_a_worker_node_lost_under_load(cluster, request):
    """The worker node killed (SIGKILL) under load: requests in flight on it are retried on the head or answer
    503 with Retry-After, none hangs; every request succeeds again within 30 s; Serve replaces the lost replica
    on the head (a replica start takes about 5 s on a quiet machine, over 20 s on this CI box when busy). A build
    running there as a Ray task (the Ray runner's, pinned to that node) is failed, saying why.

    The fused layout at the same time, through the shipped client retrying once: no ingress of ours stands in
    front of its replicas, so Serve's proxy answers a request in flight on the lost one (a plain-text 500, which
    the client retries); none is lost."""
    cluster.wait_ready()
    queue = JobQueue(ControlStore(cluster.tmp / "jobs.db"), OnWorkerNode(cluster.worker_id))
    request.addfinalizer(queue.stop)
    job = queue.run("sleeper", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(300)"])
    cluster.deploy("fusedloss", "/fusedloss", model="rgb", ray_layout="fused", ray_min_replicas=2,
                   ray_max_replicas=2, ray_model_cpus=0.1, ray_max_replicas_per_node=1,
                   control_db=cluster.tmp / "fusedloss.db")
    request.addfinalizer(lambda: serve.delete("fusedloss"))
    assert cluster.wait_ready("/fusedloss").status_code == 200
    with Load(cluster.url) as load, Load(f"{cluster.url}/fusedloss", clients=2, retries=1) as fused:
        assert load.wait_for(lambda a: a[5] == cluster.worker_id, 30) is not None, "no request on the worker node"
        assert fused.wait_for(lambda a: a[5] == cluster.worker_id, 30) is not None, "no fused request on the worker"
        assert wait_until(lambda: "started" in job.progress, 60), job.view()
        killed = time.monotonic()
        cluster.cluster.remove_node(cluster.worker, allow_graceful=False)
        deadline, noticed, timeline = killed + 120, None, []
        while time.monotonic() < deadline:  # Serve notices the lost replica, then runs a new one
            states = serve.status().applications["segment"].deployments["SegmentModel"].replica_states
            if not timeline or timeline[-1][1] != states:
                timeline.append((round(time.monotonic() - killed, 1), dict(states)))
            noticed = noticed or (time.monotonic() if states.get("RUNNING") != 2 else None)
            if noticed and states.get("RUNNING") == 2:
                break
            time.sleep(0.2)
        replaced = time.monotonic() - killed
        after = lambda a: a[0] > killed + replaced and a[1] == 200 and a[5] == cluster.head_id  # noqa: E731
        assert load.wait_for(after, 10) is not None, "no request served after the replica was replaced"
    assert noticed and replaced < 120, f"the lost replica was not replaced: {timeline}"
    assert not load.errors, load.errors[:3]  # no client timed out: nothing hung
    failed = [a for a in load.answers if not a[2]]
    assert all(a[1] == 503 and a[4] for a in failed), Counter(a[1] for a in failed)
    last_failure = max((a[0] - killed for a in failed), default=0.0)
    assert last_failure < 30, f"requests still failing {last_failure:.1f} s after the node was lost"
    print(f"node lost: {len(failed)} of {len(load.answers)} requests answered 503 + Retry-After, the last "
          f"{last_failure:.1f} s after; replica states after the loss: {timeline}")
    assert not fused.errors, fused.errors[:3]
    assert fused.answers and all(a[2] for a in fused.answers), Counter(a[1] for a in fused.answers if not a[2])
    retried = [t for t in fused.tries if t[1] != 200]
    assert all((t[1] == 503 and t[3]) or (t[1] == 500 and "json" not in t[2]) for t in retried), retried
    print(f"fused layout: {len(fused.answers)} requests, none lost; {len(retried)} answers retried by the client "
          f"{Counter((t[1], t[2]) for t in retried)}")
    # The build that ran on the lost node is failed, saying why; never "running" forever.
    assert wait_until(lambda: job.state == "failed", 60), job.view()
    assert "the build's Ray task was lost" in job.error and "queue the build again" in job.error, job.error
    assert f"building on Ray node {cluster.worker_id}" in job.progress
    print(f"the build on the lost node: {job.error}")


def test_shutdown_leaves_no_process(cluster):
    assert cluster.processes(), "the check should see the cluster's own processes while it runs"
    cluster.shutdown()
    deadline = time.monotonic() + 20
    while cluster.processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster.processes() == []
    with socket.socket() as s:  # the HTTP port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", cluster.http_port))


@pytest.mark.parametrize("path", ["serve.yaml", "serve-gpu.yaml", "kuberay-rayservice.yaml"])
def test_serve_configs_build_the_application(path):
    """deploy/serve.yaml and the KubeRay RayService's inline config are valid Serve configs whose import path and
    args build the application, with deployments that exist."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from app.cluster.deployments import build

    document = yaml.safe_load((ROOT / "deploy" / path).read_text())
    if document.get("kind") == "RayService":
        document = yaml.safe_load(document["spec"]["serveConfigV2"])
    (app_config,) = ServeDeploySchema.model_validate(document).applications
    assert app_config.import_path == "app.cluster.deployments:build"
    wanted = {"SegmentServer"} if app_config.args.get("ray_layout") == "fused" else {"SegmentIngress", "SegmentModel"}
    assert {d.name for d in app_config.deployments} == wanted
    assert type(build(app_config.args)).__name__ == "Application"
