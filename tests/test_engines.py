"""The model repository API: listing, registration, activation under load, deletion, auth, build wiring."""

import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from app.builds.compiler import build_loaders, shape_profile

from app.builds.options import BuildOptions, BuildRequest
from app.core.metadata import ModelMeta
from app.engines import tensorrt_available

from .models import RGB_META, argmin_model, decode_png, make_client, png_bytes, quadrants, raw_rgb_model, rgb_model

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
needs_no_trt = pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed: the 503 path does not apply")
needs_trt = pytest.mark.skipif(not tensorrt_available(), reason="TensorRT is not installed (needs an NVIDIA GPU host "
                                                                  "with `pip install '.[tensorrt]'`)")


@pytest.fixture
def admin(engines):
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    with make_client(engines, "rgb", admin_token=TOKEN) as c:
        yield c


def onnx_upload(path: Path) -> dict:
    return {"onnx": (path.name, path.read_bytes(), "application/octet-stream")}


def test_list_and_show(admin):
    body = admin.get("/engines").json()
    assert body["active"] == "rgb.onnx"
    [entry] = body["engines"]
    assert entry["name"] == "rgb" and entry["kind"] == "onnx" and entry["active"] and entry["bytes"] > 0
    assert entry["metadata"]["class_names"] == ["red", "green", "blue"]
    assert admin.get("/engines/rgb").json()["file"] == "rgb.onnx"
    assert admin.get("/engines/nope").status_code == 404


def test_admin_auth(engines):
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    with make_client(engines, "rgb") as c:  # no token configured
        r = c.post("/engines/rgb/activate")
        assert r.status_code == 403 and "SEGMENT_ADMIN_TOKEN" in r.json()["detail"]
    with make_client(engines, "rgb", admin_token=TOKEN) as c:
        assert c.post("/engines/rgb/activate").status_code == 401
        assert c.post("/engines/rgb/activate", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/engines/rgb/activate", headers=AUTH).status_code == 200
        assert c.get("/bench", params={"iterations": 1}).status_code == 401
    with make_client(engines, "rgb", allow_unauthenticated_admin=True) as c:
        assert c.post("/engines/rgb/activate").status_code == 200


def test_register_onnx_for_onnxruntime(admin, tmp_path):
    src = argmin_model(tmp_path / "upload.onnx")
    meta = ModelMeta.model_validate(RGB_META).model_dump_json()
    r = admin.post("/engines", headers=AUTH, files=onnx_upload(src),
                   data={"name": "weakest", "target": "onnxruntime", "metadata": meta})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "weakest" and r.json()["metadata"]["class_names"] == ["red", "green", "blue"]
    names = [e["name"] for e in admin.get("/engines").json()["engines"]]
    assert names == ["rgb", "weakest"]
    again = admin.post("/engines", headers=AUTH, files=onnx_upload(src), data={"name": "weakest", "target": "onnxruntime"})
    assert again.status_code == 409


@pytest.mark.parametrize("payload,status,words", [
    (b"definitely not protobuf", 400, "not a valid ONNX"),
    (b"", 400, "not a valid ONNX"),
])
def test_bad_onnx_upload_refused_and_nothing_left(admin, engines, payload, status, words):
    r = admin.post("/engines", headers=AUTH, files={"onnx": ("m.onnx", payload, "application/octet-stream")},
                   data={"name": "bad", "target": "onnxruntime"})
    assert r.status_code == status and words in r.json()["detail"]
    assert sorted(p.name for p in engines.iterdir() if not p.name.startswith(".control.db")) == ["rgb.json", "rgb.onnx"]


def test_custom_argmax_upload_refused(admin, tmp_path, engines):
    x = helper.make_tensor_value_info("input_image", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("preds", TensorProto.INT32, ["N", 8, 8])
    graph = helper.make_graph([helper.make_node("CustomArgMax", ["input_image"], ["preds"], dim=1)], "g", [x], [y])
    model = helper.make_model(graph)
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "pred.onnx"))
    r = admin.post("/engines", headers=AUTH, files=onnx_upload(tmp_path / "pred.onnx"),
                   data={"name": "pred", "target": "onnxruntime"})
    assert r.status_code == 400 and "CustomArgMax" in r.json()["detail"]
    assert not (engines / "pred.onnx").exists()


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "x.onnx", "/abs", "a" * 65, ""])
def test_unsafe_names_refused(admin, tmp_path, name):
    src = argmin_model(tmp_path / "u.onnx")
    r = admin.post("/engines", headers=AUTH, files=onnx_upload(src), data={"name": name, "target": "onnxruntime"})
    assert r.status_code in (400, 422)


def test_onnx_upload_size_limit(engines, tmp_path):
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    src = argmin_model(tmp_path / "u.onnx")
    with make_client(engines, "rgb", admin_token=TOKEN, max_onnx_bytes=50) as c:
        r = c.post("/engines", headers=AUTH, files=onnx_upload(src), data={"name": "big", "target": "onnxruntime"})
        assert r.status_code == 413
    assert not any(p.name.startswith(".upload") for p in engines.iterdir())


@needs_no_trt
def test_tensorrt_target_without_tensorrt_is_503(admin, tmp_path):
    r = admin.post("/engines", headers=AUTH, data={"name": "trt", "source": "rgb"})  # target defaults to tensorrt
    assert r.status_code == 503 and "pip install '.[tensorrt]'" in r.json()["detail"]
    assert admin.get("/readyz").status_code == 200


def test_activation_switch_under_concurrent_requests(admin, engines):
    argmin_model(engines / "weakest.onnx")
    photo, strongest = quadrants(64, 96)
    weakest = photo[..., ::-1].argmin(axis=2).astype(np.uint8)  # first weakest channel, as ONNX ArgMin
    expected = {"rgb": strongest, "weakest": weakest}
    failures, served = [], {"rgb": 0, "weakest": 0}
    stop = threading.Event()

    def client_loop():
        while not stop.is_set():
            r = admin.post("/segment", params={"view": "labels"}, files={"image": ("p.png", png_bytes(photo), "image/png")})
            if r.status_code != 200:
                failures.append(r.status_code)
                continue
            name = r.headers["x-model"]
            served[name] += 1
            if not np.array_equal(decode_png(r.content), expected[name]):
                failures.append(f"wrong labels from {name}")

    with ThreadPoolExecutor(4) as pool:
        loops = [pool.submit(client_loop) for _ in range(4)]
        for i in range(8):
            target = "weakest" if i % 2 == 0 else "rgb"
            assert admin.post(f"/engines/{target}/activate", headers=AUTH).status_code == 200
        stop.set()
        for f in loops:
            f.result()
    assert failures == []
    assert served["rgb"] > 0 and served["weakest"] > 0
    assert admin.get("/models/active").json()["name"] == "rgb"


def test_delete_refuses_active_and_removes_others(admin, engines):
    argmin_model(engines / "weakest.onnx")
    r = admin.delete("/engines/rgb", headers=AUTH)
    assert r.status_code == 409 and "served" in r.json()["detail"]
    assert admin.delete("/engines/weakest", headers=AUTH).status_code == 200
    assert not (engines / "weakest.onnx").exists() and not (engines / "weakest.json").exists()
    assert admin.delete("/engines/weakest", headers=AUTH).status_code == 404
    assert admin.post("/engines/missing/activate", headers=AUTH).status_code == 404


def test_activating_a_broken_model_keeps_the_old_one(admin, engines):
    (engines / "broken.onnx").write_bytes(b"garbage")
    r = admin.post("/engines/broken/activate", headers=AUTH)
    assert r.status_code == 400
    assert admin.get("/models/active").json()["name"] == "rgb"
    assert admin.post("/segment", files={"image": ("p.png", png_bytes(quadrants(32, 32)[0]), "image/png")}).status_code == 200


def test_incomplete_engine_marked_and_jobs_404(admin, engines):
    (engines / "half.engine").write_bytes(b"\0" * 16)  # an engine with no build metadata
    entries = {e["name"]: e for e in admin.get("/engines").json()["engines"]}
    assert entries["half"]["kind"] == "tensorrt" and entries["half"]["complete"] is False
    assert admin.get("/engines/jobs/job-999").status_code == 404


def test_polygraphy_loader_wiring(tmp_path):
    """The loader chain we compose, inspected without running it (TensorRT not needed)."""
    onnx_path = rgb_model(tmp_path / "m.onnx", height="H", width="W")
    inp, shapes = shape_profile(onnx_path, ModelMeta.model_validate({**RGB_META, "input_size": (256, 512)}),
                                BuildOptions(precision="fp16"))
    assert inp.name == "input_image" and not inp.uint8
    assert shapes == {"min": (1, 256, 512), "opt": (1, 256, 512), "max": (8, 256, 512)}
    save = build_loaders(onnx_path, tmp_path / "m.engine", inp, shapes, BuildOptions(precision="fp16"),
                         tmp_path / "timing.cache")
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, SaveEngine

    assert isinstance(save, SaveEngine) and save.path == str(tmp_path / "m.engine")
    engine = save._engine
    assert isinstance(engine, EngineFromNetwork) and engine.timing_cache_path == str(tmp_path / "timing.cache")
    assert isinstance(engine._network, NetworkFromOnnxPath) and engine._network.path == str(onnx_path)
    config = engine._config
    assert isinstance(config, CreateConfig)
    assert config.fp16 and not config.bf16 and not config.int8
    assert config.timing_cache_path == str(tmp_path / "timing.cache")
    [profile] = config.profiles
    assert tuple(profile["input_image"].max) == (8, 3, 256, 512)


def test_blocking_cuda_sync_says_why_it_is_not_in_effect(monkeypatch):
    """SEGMENT_CUDA_BLOCKING_SYNC is only worth its name when the CUDA runtime takes the flag: a refusal, or no
    runtime at all, comes back as a reason (logged as a warning when a session is made) instead of passing
    silently."""
    from app.engines import onnxrt

    class Runtime:
        def __init__(self, status):
            self.status, self.flags = status, []

        def cudaSetDeviceFlags(self, flags):  # noqa: N802 (the CUDA runtime's name)
            self.flags.append(flags)
            return self.status

    accepting, refusing = Runtime(0), Runtime(708)
    monkeypatch.setattr(onnxrt, "cuda_runtime", lambda: accepting)
    assert onnxrt.cuda_blocking_sync() is None and accepting.flags == [0x04]  # cudaDeviceScheduleBlockingSync
    monkeypatch.setattr(onnxrt, "cuda_runtime", lambda: refusing)
    assert onnxrt.cuda_blocking_sync() == "cudaSetDeviceFlags failed with CUDA error 708"
    monkeypatch.setattr(onnxrt, "cuda_runtime", lambda: None)
    assert "no CUDA runtime" in onnxrt.cuda_blocking_sync()


def test_the_bound_gpu_batch_is_kept_between_calls_and_dropped_at_close(tmp_path, monkeypatch):
    """``run_bound``'s batch buffer and binding are made once per batch shape and reused; ``close`` drops them,
    since the binding holds the session (and its GPU memory) until a garbage collection that may never come. The
    buffer is made on the CPU here (no GPU); the binding is ONNX Runtime's own."""
    import onnxruntime as ort

    from app.engines import OrtOptions, load_model

    made = ort.OrtValue.ortvalue_from_shape_and_type
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_shape_and_type",
                        lambda shape, dtype, device, index: made(shape, dtype, "cpu", 0))
    model = load_model(raw_rgb_model(tmp_path / "raw.onnx", 64, 96), ort=OrtOptions(providers="cpu"))
    runtime = model.runtime
    first = runtime._binding(model.input_name, 4, 64, 96)
    assert runtime._binding(model.input_name, 4, 64, 96) == first  # the same buffer and binding again
    assert first[0].shape() == [4, 64, 96, 3]
    other = runtime._binding(model.input_name, 8, 64, 96)
    assert other[0] is not first[0] and other[0].shape() == [8, 64, 96, 3]
    with pytest.raises(ValueError, match="9 images for a batch of 8"):
        runtime.run_bound(model.input_name, [None] * 9, rows=8)
    model.close()
    assert runtime._bound == (None, None, None)


def test_profile_contradicting_fixed_input_is_refused(tmp_path):
    onnx_path = rgb_model(tmp_path / "m.onnx", height=64, width=64)
    with pytest.raises(ValueError, match="contradicts"):
        shape_profile(onnx_path, ModelMeta(), BuildOptions(max_shape=(4, 128, 128)))


def test_profile_out_of_order_is_refused(tmp_path):
    onnx_path = rgb_model(tmp_path / "m.onnx", height="H", width="W")
    meta = ModelMeta.model_validate({**RGB_META, "input_size": (128, 256)})
    with pytest.raises(ValueError, match="min <= opt <= max"):  # opt above the default max (the metadata size)
        shape_profile(onnx_path, meta, BuildOptions(opt_shape=(1, 256, 512)))
    _, shapes = shape_profile(onnx_path, meta, BuildOptions(opt_shape=(1, 256, 512), max_shape=(4, 512, 1024)))
    assert shapes == {"min": (1, 128, 256), "opt": (1, 256, 512), "max": (4, 512, 1024)}


def test_int8_qdq_quantization_and_its_cache(tmp_path):
    """The int8 path's quantization step (explicit Q/DQ) for both targets, executed for real on CPU."""
    import cv2
    import onnxruntime as ort

    from app.builds.quantize import cached_qdq

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    x = helper.make_tensor_value_info("input_image", TensorProto.FLOAT, ["N", 3, 32, 32])
    y = helper.make_tensor_value_info("preds", TensorProto.FLOAT, ["N", 4, 32, 32])
    graph = helper.make_graph([helper.make_node("Conv", ["input_image", "w"], ["preds"], pads=[1, 1, 1, 1])], "conv",
                              [x], [y], initializer=[onnx.numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "conv.onnx"))
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(8):
        cv2.imwrite(str(calib / f"{i}.png"), rng.integers(0, 255, (40, 50, 3), np.uint8))
    messages = []
    qdq = lambda limit, target="tensorrt": cached_qdq(tmp_path / "conv.onnx", tmp_path / "cache", (32, 32),  # noqa: E731
                                                      calib, limit, target, messages.append)
    out = qdq(8)
    assert qdq(8) == out and "cache miss" in messages[0] and "cache hit" in messages[1]  # calibration cache
    cv2.imwrite(str(calib / "extra.png"), rng.integers(0, 255, (40, 50, 3), np.uint8))
    assert qdq(9) != out  # other images: calibrated again
    cpu = qdq(8, "onnxruntime")
    assert cpu != out  # another target, other quantization
    probe = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    ref = ort.InferenceSession(str(tmp_path / "conv.onnx")).run(None, {"input_image": probe})[0]
    for path, activation in ((out, TensorProto.INT8), (cpu, TensorProto.UINT8)):
        graph = onnx.load(str(path)).graph
        assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
        zero_points = [i for i in graph.initializer if i.name.endswith("zero_point") and "input_image" in i.name]
        assert zero_points and all(z.data_type == activation for z in zero_points)
        q = ort.InferenceSession(str(path)).run(None, {"input_image": probe})[0]
        assert (ref.argmax(1) == q.argmax(1)).mean() > 0.9


def wait_for(client, url: str) -> dict:
    import time

    for _ in range(1200):
        job = client.get(url).json()
        if job["state"] in ("succeeded", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job did not finish: {job}")


def build_and_serve_onnxruntime(admin, engines, name: str, precision: str, files=None) -> dict:
    """Build ``name`` from a 1x1-conv model through the API as a 202 job, activate it, check it labels a photo
    exactly, and return its registry entry."""
    rgb_model(engines / "conv.onnx", height=64, width=64, conv=True)
    r = admin.post("/engines", headers=AUTH, data={"name": name, "source": "conv", "target": "onnxruntime",
                                                   "precision": precision}, files=files)
    assert r.status_code == 202, r.text
    job = wait_for(admin, r.json()["status_url"])
    assert job["state"] == "succeeded", job
    assert any("parity: label agreement 100.0000%" in line for line in job["progress"]), job["progress"]
    entry = admin.get(f"/engines/{name}").json()
    assert entry["kind"] == "onnx" and entry["precision"] == precision and entry["complete"]
    assert admin.post(f"/engines/{name}/activate", headers=AUTH).status_code == 200
    photo, truth = quadrants(64, 64)
    r = admin.post("/segment", params={"view": "labels"}, files={"image": ("p.png", png_bytes(photo), "image/png")})
    assert r.status_code == 200 and np.array_equal(decode_png(r.content), truth)
    assert admin.get("/models/active").json()["precision"] == precision
    return entry


def test_int8_for_onnxruntime_built_through_the_api_and_served(admin, engines):
    """No GPU needed: a 202 job calibrates on uploaded photos, checks parity, and the result serves correctly."""
    photos = [("calib_images", (f"{i}.png", png_bytes(quadrants(64 + 8 * i, 64)[0]), "image/png")) for i in range(3)]
    entry = build_and_serve_onnxruntime(admin, engines, "conv_int8", "int8", files=photos)
    assert entry["metadata"]["build"]["options"]["calib_dir"].endswith("calibration/conv_int8")
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(str(engines / "conv_int8.onnx")).graph.node}
    # the same name again is refused before any work is queued
    r = admin.post("/engines", headers=AUTH, data={"name": "conv_int8", "source": "conv", "target": "onnxruntime",
                                                   "precision": "int8", "calib_source": "conv_int8"})
    assert r.status_code == 409


def test_fp16_for_onnxruntime_built_through_the_api_and_served(admin, engines):
    """precision=fp16 for ONNX Runtime: weights in fp16, input and output types kept, and the copy serves the
    same labels (on CPU too, where it is correct but not faster)."""
    entry = build_and_serve_onnxruntime(admin, engines, "conv_fp16", "fp16")
    assert "cpu_vnni" not in entry["metadata"]["build"]
    graph = onnx.load(str(engines / "conv_fp16.onnx")).graph
    assert {t.name: t.data_type for t in graph.initializer} == {"eye": TensorProto.FLOAT16}
    assert [graph.input[0].type.tensor_type.elem_type, graph.output[0].type.tensor_type.elem_type] == \
        [TensorProto.FLOAT, TensorProto.UINT8]


@pytest.mark.parametrize("form, status, words", [
    ({"target": "onnxruntime", "precision": "bf16"}, 422, "fp32, fp16 (CUDA) or int8"),
    ({"target": "onnxruntime", "precision": "int8", "max_shape": "8,1024"}, 422, "batch,height,width"),
    ({"target": "onnxruntime", "precision": "int8", "opt_shape": "1,a,b"}, 422, "invalid shape"),
    ({"target": "onnxruntime", "precision": "int8", "min_shape": "0,64,64"}, 422, "at least 1"),
    ({"target": "onnxruntime", "precision": "int8"}, 422, "calibration photos"),
    ({"target": "onnxruntime", "precision": "int8", "calib_source": "nope"}, 404, "no calibration folder"),
    ({"target": "onnxruntime"}, 409, "already registered"),
])
def test_build_requests_refused_up_front(admin, engines, form, status, words):
    r = admin.post("/engines", headers=AUTH, data={"name": "x", "source": "rgb", **form})
    assert r.status_code == status and words in r.json()["detail"], r.text
    assert not (engines / "x.onnx").exists() and not admin.get("/engines/jobs/job-1").status_code == 200


@needs_trt
def test_tensorrt_build_run_and_parity(admin, engines):
    """On a GPU host: build through the API, wait for the job, serve the engine, compare with ONNX Runtime."""
    rgb_model(engines / "fixed.onnx", height=64, width=64)
    r = admin.post("/engines", headers=AUTH, data={"name": "fixed_fp32", "source": "fixed", "precision": "fp32"})
    assert r.status_code == 202
    job = wait_for(admin, r.json()["status_url"])
    assert job["state"] == "succeeded", job
    entry = admin.get("/engines/fixed_fp32").json()
    build = entry["metadata"]["build"]
    assert build["parity"]["label_agreement"] >= 0.99 and build["tensorrt_version"] and build["target"] == "tensorrt"
    assert admin.post("/engines/fixed_fp32/activate", headers=AUTH).status_code == 200
    photo, truth = quadrants(64, 64)
    r = admin.post("/segment", params={"view": "labels"}, files={"image": ("p.png", png_bytes(photo), "image/png")})
    assert np.array_equal(decode_png(r.content), truth)


def segment_command(*args) -> list[str]:
    """A long-running stand-in for a build: `segment test` in a child process."""
    return [sys.executable, "-m", "app.cli", *map(str, args)]


def test_job_queue_runs_in_order_and_kill_leaves_nothing(engines, tmp_path):
    """Jobs run one at a time in a child process; stopping kills the running one, and it is marked failed."""
    import time

    from app.builds.jobs import JobQueue

    rgb_model(engines / "rgb.onnx", height="H", width="W")
    queue = JobQueue()
    failing = queue.submit(BuildRequest(name="c", source=engines / "rgb.onnx", output=engines / "c.engine",
                                        options=BuildOptions(target="tensorrt", precision="fp16")))
    slow = queue.run("t", segment_command("test", engines / "rgb.onnx", "--iterations", "100000"))
    queued = queue.run("t2", segment_command("test", engines / "rgb.onnx", "--iterations", "1"))
    for _ in range(200):
        if slow.state == "running":
            break
        time.sleep(0.1)
    assert failing.state in ("failed", "succeeded") and slow.state == "running"  # strictly one after the other
    if not tensorrt_available():
        assert failing.state == "failed" and "TensorRT is not installed" in failing.error
    queue.stop()
    for _ in range(100):
        if slow.state != "running":
            break
        time.sleep(0.1)
    assert slow.state == "failed" and slow.finished is not None
    for _ in range(50):
        if queued.state != "queued":
            break
        time.sleep(0.1)
    assert queued.state == "failed" and queued.started is None and "stopped" in queued.error
    assert not (engines / "c.engine").exists() or tensorrt_available()
    assert not any(p.name.startswith(".") and p.name.endswith(".build") for p in engines.iterdir())


def test_stop_right_after_submit_never_leaves_a_build_running(engines):
    """stop() can land while the worker is starting the child; the child must still be killed."""
    import time

    from app.builds.jobs import JobQueue

    rgb_model(engines / "rgb.onnx", height="H", width="W")
    for delay in (0, 0.001, 0.005, 0.02, 0.05):
        queue = JobQueue()
        job = queue.run("t", segment_command("test", engines / "rgb.onnx", "--iterations", "100000"))
        time.sleep(delay)
        queue.stop()
        queue._worker.join(timeout=30)
        assert not queue._worker.is_alive() and job.state == "failed", (delay, job.state)


def test_engine_from_another_gpu_or_tensorrt_is_explained():
    from app.engines.tensorrt import engine_mismatch

    build = {"tensorrt_version": "10.3.0", "gpu": "NVIDIA A40", "compute_capability": "8.6"}
    assert engine_mismatch(build, "10.3.1", {"gpu": "NVIDIA A40", "compute_capability": "8.6"}) is None
    why = engine_mismatch(build, "10.13.0", {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"})
    assert "TensorRT 10.3.0" in why and "10.13.0" in why and "8.6" in why and "H100" in why


@needs_no_trt
def test_uploaded_calibration_set_is_checked_before_tensorrt(admin, engines):
    """Without TensorRT the 503 comes first; the upload path itself is checked with TensorRT present."""
    r = admin.post("/engines", headers=AUTH, data={"name": "q", "source": "rgb", "precision": "int8"},
                   files=[("calib_images", ("a.png", png_bytes(quadrants(32, 32)[0]), "image/png"))])
    assert r.status_code == 503
    assert not (engines / "calibration").exists()


def test_calibration_set_saved_and_validated(engines):
    import asyncio
    import io

    from starlette.datastructures import UploadFile as Upload

    from app.api.uploads import save_calibration_set
    from app.core.errors import ImageError
    from app.repository import ModelRepository

    repository, limits = ModelRepository(engines), (25 * 2**20, 50_000_000, 1)
    good = lambda: Upload(io.BytesIO(png_bytes(quadrants(40, 40)[0])), filename="a.png")  # noqa: E731
    asyncio.run(save_calibration_set(repository, "set1", [good(), good()], *limits))
    assert sorted(p.name for p in (engines / "calibration" / "set1").iterdir()) == ["0000.img", "0001.img"]
    with pytest.raises(ImageError) as refused:
        asyncio.run(save_calibration_set(repository, "set2", [good(), Upload(io.BytesIO(b"text"), filename="b.jpg")],
                                         *limits))
    assert refused.value.status_code == 415 and "calibration image 1" in refused.value.detail
    assert not (engines / "calibration" / "set2").exists()  # nothing stored from a bad set
