"""The service end to end, through the real TestClient and real ONNX Runtime."""

import numpy as np
import pytest

from app.engines import OrtOptions
from app.engines import load_model

from .models import (RGB_META, decode_png, fake_gpu_decode, make_client, png_bytes, quadrants, raw_rgb_model,
                     rgb_model)


def post(client, data: bytes, **params):
    return client.post("/segment", files={"image": ("photo.png", data, "image/png")}, params=params)


def test_labels_view_is_exact_and_full_size(client):
    photo, truth = quadrants(96, 160)
    r = post(client, png_bytes(photo), view="labels")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    labels = decode_png(r.content)
    assert labels.shape == truth.shape
    assert np.array_equal(labels, truth)


def test_mask_view_applies_palette(client):
    photo, truth = quadrants(64, 64)
    mask = decode_png(post(client, png_bytes(photo)).content)  # default view=mask
    palette_bgr = np.array(RGB_META["palette"], np.uint8)[:, ::-1]
    assert np.array_equal(mask, palette_bgr[truth])


def test_overlay_blends_photo_and_mask(client):
    photo, truth = quadrants(64, 64)
    palette_bgr = np.array(RGB_META["palette"], np.uint8)[:, ::-1]
    full = decode_png(post(client, png_bytes(photo), view="overlay", alpha=1.0).content)
    none = decode_png(post(client, png_bytes(photo), view="overlay", alpha=0.0).content)
    half = decode_png(post(client, png_bytes(photo), view="overlay", alpha=0.5).content).astype(int)
    assert np.array_equal(full, palette_bgr[truth])
    assert np.array_equal(none, photo)
    expected = (photo.astype(int) + palette_bgr[truth].astype(int)) / 2
    assert np.abs(half - expected).max() <= 1


def test_timing_and_model_headers(client):
    r = post(client, png_bytes(quadrants(32, 32)[0]))
    assert r.headers["x-model"] == "rgb"
    for stage in ("decode", "preprocess", "inference", "postprocess", "encode"):
        assert float(r.headers[f"x-timing-{stage}-ms"]) >= 0
        assert f"{stage};dur=" in r.headers["server-timing"]


@pytest.mark.parametrize("output", ["labels", "logits"])
def test_fixed_size_model_output_resized_to_input(engines, output):
    rgb_model(engines / "fixed.onnx", output=output, height=64, width=64)
    photo, truth = quadrants(120, 200)  # not the model's size, not a multiple of 32
    with make_client(engines, "fixed") as c:
        labels = decode_png(post(c, png_bytes(photo), view="labels").content)
        info = c.get("/models/active").json()
    assert labels.shape == truth.shape
    assert (labels == truth).mean() > 0.97  # only pixels at block edges may move in the 64x64 round trip
    assert info["output_kind"] == output
    assert (info["input"]["height"], info["input"]["width"]) == (64, 64)


def test_raw_pixel_model_is_fed_raw_pixels(engines):
    """A uint8 [N,H,W,3] model (`segment export --input uint8`) gets the resized RGB pixels, no float work, and
    answers as the float model does; the contract says which kind it is."""
    raw_rgb_model(engines / "raw.onnx", height=64, width=64)
    photo, truth = quadrants(120, 200)
    with make_client(engines, "raw") as c:
        labels = decode_png(post(c, png_bytes(photo), view="labels").content)
        info = c.get("/models/active").json()
    assert info["input"]["dtype"] == "uint8" and info["metadata"]["input_format"] == "uint8_nhwc"
    assert labels.shape == truth.shape and (labels == truth).mean() > 0.97


def test_contract_read_from_model(engines):
    rgb_model(engines / "m.onnx", height="H", width="W", label_dtype=6)  # int32 labels
    model = load_model(engines / "m.onnx")
    try:
        assert model.input_name == "input_image"
        assert model.input_hw == (None, None) and model.dynamic_hw and model.batch_dynamic
        assert model.output_kind == "labels" and model.num_classes == 3
        assert model.meta.class_names == ["red", "green", "blue"] and model.meta.trained is False
    finally:
        model.close()


def test_dynamic_hw_rounds_to_multiple_of_32(client):
    photo, truth = quadrants(100, 150)
    labels = decode_png(post(client, png_bytes(photo), view="labels").content)
    assert labels.shape == (100, 150)
    assert (labels == truth).mean() > 0.97


def test_metadata_defaults_to_cityscapes(engines):
    rgb_model(engines / "bare.onnx", output="logits", meta=None)
    model = load_model(engines / "bare.onnx")
    try:
        assert model.meta.dataset == "cityscapes"
        assert model.meta.mean == (0.3257, 0.3690, 0.3223)
        assert model.meta.class_names[0] == "road"
        assert len(model.palette) >= model.num_classes == 3
    finally:
        model.close()


def test_not_an_image_is_415_and_server_stays_healthy(client):
    r = client.post("/segment", files={"image": ("notes.jpg", b"this is text, not a photo", "image/jpeg")})
    assert r.status_code == 415 and "image" in r.json()["detail"]
    r = client.post("/segment", files={"image": ("empty.png", b"", "image/png")})
    assert r.status_code == 400 and r.json()["detail"]
    truncated = png_bytes(quadrants(64, 64)[0])[:60]
    assert client.post("/segment", files={"image": ("t.png", truncated, "image/png")}).status_code == 400
    assert client.get("/healthz").json() == {"status": "ok"}
    assert post(client, png_bytes(quadrants(32, 32)[0])).status_code == 200


def test_missing_field_is_422(client):
    r = client.post("/segment", files={"photo": ("x.png", png_bytes(quadrants(32, 32)[0]), "image/png")})
    assert r.status_code == 422 and r.json()["detail"]


def test_limits_answer_413(engines):
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    with make_client(engines, "rgb", max_upload_bytes=1000, max_pixels=64 * 64) as c:
        big = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
        assert len(big) > 1000
        assert post(c, big).status_code == 413
    with make_client(engines, "rgb", max_pixels=32 * 32) as c:
        r = post(c, png_bytes(quadrants(40, 40)[0]))
        assert r.status_code == 413 and "pixels" in r.json()["detail"]


def test_readiness_health_metrics_and_docs(client):
    assert client.get("/readyz").json() == {"status": "ready", "model": "rgb"}
    post(client, png_bytes(quadrants(32, 32)[0]))
    metrics = client.get("/metrics").text
    assert 'segment_http_requests_total{method="POST",route="/segment",status="200"}' in metrics
    assert 'segment_stage_duration_ms_count{stage="inference"}' in metrics
    assert 'segment_active_model_info{backend="onnxruntime"' in metrics
    spec = client.get("/openapi.json").json()
    assert {"/segment", "/healthz", "/readyz", "/metrics", "/models/active"} <= set(spec["paths"])
    assert "curl -F image=@" in spec["paths"]["/segment"]["post"]["description"]
    page = client.get("/")
    assert page.status_code == 200 and 'name="image"' in page.text and "untrained weights" in page.text


def test_no_model_present_is_not_ready(engines):
    with make_client(engines, "nothing_here") as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "segment export" in r.json()["detail"]
        r = c.post("/segment", files={"image": ("x.png", png_bytes(quadrants(32, 32)[0]), "image/png")})
        assert r.status_code == 503 and "no model" in r.json()["detail"]
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200


def test_tensorrt_engine_without_tensorrt_is_explained(engines):
    pytest.importorskip("polygraphy")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here: the missing-TensorRT path cannot be exercised")
    except ImportError:
        pass
    (engines / "m.engine").write_bytes(b"\x00" * 64)
    with make_client(engines, "m") as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        assert "pip install '.[tensorrt]'" in r.json()["detail"]
        assert c.get("/healthz").status_code == 200


def test_concurrent_requests_get_their_own_answers(client):
    from concurrent.futures import ThreadPoolExecutor

    cases = []
    for i in range(12):
        h, w = 32 + 8 * i, 200 - 8 * i
        photo, truth = quadrants(h, w)
        if i % 2:
            photo, truth = np.ascontiguousarray(photo[:, ::-1]), np.ascontiguousarray(truth[:, ::-1])
        cases.append((photo, truth))

    def run(case):
        return decode_png(post(client, png_bytes(case[0]), view="labels").content)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(run, cases))
    for (_, truth), labels in zip(cases, results):
        assert labels.shape == truth.shape
        assert (labels == truth).mean() > 0.97


def test_path_traversal_model_name_refused(engines):
    rgb_model(engines.parent / "outside.onnx")
    with make_client(engines, "../outside") as c:
        assert c.get("/readyz").status_code == 503
        assert "invalid model name" in c.get("/readyz").json()["detail"]


def test_json_view_for_the_page(client):
    import base64

    photo, truth = quadrants(64, 96)
    r = client.post("/segment/json", files={"image": ("p.png", png_bytes(photo), "image/png")})
    assert r.status_code == 200
    body = r.json()
    assert (body["width"], body["height"]) == (96, 64)
    assert body["model"] == {"name": "rgb", "backend": "onnxruntime", "device": body["model"]["device"],
                             "precision": "fp32", "dataset": "custom", "trained": False}
    labels = decode_png(base64.b64decode(body["labels_png"]))
    assert np.array_equal(labels, truth)
    mask = decode_png(base64.b64decode(body["mask_png"]))
    assert np.array_equal(mask, np.array(RGB_META["palette"], np.uint8)[:, ::-1][truth])
    shares = {c["name"]: c for c in body["classes"]}
    for i, name in enumerate(["red", "green", "blue"]):
        assert shares[name]["pixels"] == int((truth == i).sum())
        assert shares[name]["color"] == "#{:02x}{:02x}{:02x}".format(*RGB_META["palette"][i])
    assert abs(sum(c["percent"] for c in body["classes"]) - 100) < 1e-9
    assert set(body["timings_ms"]) == {"decode", "preprocess", "inference", "postprocess", "encode"}


def test_serving_never_imports_torch_or_ray(engines):
    """PyTorch is for export and training only, Ray for `segment serve --ray`: building and running the embedded
    service (and its command line) must load neither, installed or not."""
    import subprocess
    import sys

    from .models import ROOT

    rgb_model(engines / "rgb.onnx", height="H", width="W")
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from app.core.config import Settings\n"
        "from app.main import create_app\n"
        "from app.cli import build_parser\n"
        f"app = create_app(Settings(engines_dir={str(engines)!r}, model='rgb'))\n"
        "build_parser()\n"
        "with TestClient(app) as c:\n"
        "    assert c.get('/readyz').status_code == 200\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("fails_at", ["creation", "first run"])
def test_cuda_provider_gets_the_options_and_falls_back_to_its_defaults(engines, monkeypatch, caplog, fails_at):
    """On a GPU host the CUDA provider is asked for SEGMENT_ORT_CUDA_OPTIONS; when ONNX Runtime rejects them
    and falls back to the CPU, the model is loaded again on the GPU with the provider's defaults.

    No GPU here: ONNX Runtime's session is wrapped to record what it is asked for and to answer as
    onnxruntime-gpu does when fused convolutions find no cuDNN engine: a CPU-only session from the start, or
    (seen on the H100 with other options) a CUDA session that moves itself to the CPU at its first run."""
    import onnxruntime as ort

    from app.core.config import Settings

    asked = []
    real_session = ort.InferenceSession

    class GpuSession:
        def __init__(self, path, sess_options=None, providers=()):
            asked.append(providers)
            self.inner = real_session(path, sess_options=sess_options, providers=["CPUExecutionProvider"])
            cuda = providers[0][1] if isinstance(providers[0], tuple) else {}
            self.fails = cuda.get("fuse_conv_bias") == "1"
            self.providers = ["CPUExecutionProvider"] if self.fails and fails_at == "creation" else \
                ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def get_providers(self):
            return self.providers

        def run(self, *args, **kwargs):
            if self.fails:  # ONNX Runtime's answer to an EP failure: print, move to the CPU, run again
                self.providers = ["CPUExecutionProvider"]
            return self.inner.run(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(ort, "InferenceSession", GpuSession)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: None, raising=False)
    options = Settings().ort_cuda_options
    assert options == {"prefer_nhwc": 1, "fuse_conv_bias": 1}
    assert OrtOptions.from_settings(Settings(cuda_blocking_sync=True, ort_threads=2)) == \
        OrtOptions("auto", 2, options, True)
    with caplog.at_level("WARNING", logger="segment.onnxrt"):
        model = load_model(rgb_model(engines / "rgb.onnx"), ort=OrtOptions(cuda_options=options))
    try:
        assert asked[0][0] == ("CUDAExecutionProvider", {"prefer_nhwc": "1", "fuse_conv_bias": "1"})
        assert asked[1][0] == ("CUDAExecutionProvider", {}) and len(asked) == 2
        assert "failed with options" in caplog.text and model.device == "cuda"
        photo, truth = quadrants(64, 64)
        assert np.array_equal(model.infer(photo[None, :, :, ::-1].transpose(0, 3, 1, 2).astype(np.float32) / 255)[0],
                              truth)
    finally:
        model.close()
    asked.clear()
    load_model(rgb_model(engines / "rgb.onnx"), ort=OrtOptions(cuda_options={"prefer_nhwc": 1})).close()
    assert asked == [[("CUDAExecutionProvider", {"prefer_nhwc": "1"}), "CPUExecutionProvider"]]


def test_jpeg_at_the_model_size_takes_the_gpu_decode_path_and_everything_else_the_cpu(engines, monkeypatch):
    """Which uploads go from nvImageCodec straight into the model, and that the rest falls back to the CPU.

    No GPU here: the model is told it can take GPU images, nvImageCodec's decode is stood in for by OpenCV
    (RGB, as nvImageCodec returns), and the model's GPU inference by its CPU inference on that image."""
    import cv2

    from app.serving import gpu_decode
    from app.serving.pipeline import preprocess

    rgb_model(engines / "rgb.onnx", height=64, width=64)
    decoded, decline = [], []

    def fake_decode(datas):
        decoded.extend(len(data) for data in datas)
        return [None if decline else fake_gpu_decode(data) for data in datas]

    monkeypatch.setattr(gpu_decode, "decode", fake_decode)
    photo, truth = quadrants(64, 64)
    jpeg = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    with make_client(engines, "rgb", gpu_decode=True) as c:
        model = c.app.state.service.model
        model.can_decode_on_gpu = True
        monkeypatch.setattr(model.model, "infer_on_gpu", lambda images, rows=1: np.concatenate(
            [model.infer(preprocess(im.array[..., ::-1], model, (64, 64))) for im in images]), raising=False)

        def segment(data, name, **params):
            r = c.post("/segment", params={"view": "labels", **params}, files={"image": (name, data, "image/jpeg")})
            assert r.status_code == 200, r.text
            return r

        r = segment(jpeg, "p.jpg")  # a JPEG at the model's size: decoded "on the GPU", no pre-processing stage
        assert decoded == [len(jpeg)] and np.array_equal(decode_png(r.content), truth)
        assert "preprocess" not in r.headers["Server-Timing"] and "inference" in r.headers["Server-Timing"]
        for data, name, params in ((png_bytes(photo), "p.png", {}),  # PNG: no GPU decoder for it
                                   (cv2.imencode(".jpg", cv2.resize(photo, (96, 64)))[1].tobytes(), "w.jpg", {}),
                                   (jpeg, "p.jpg", {"view": "overlay"}),  # the overlay needs the photo on the host
                                   (jpeg + b"\0" * 16, "p.jpg", {})):  # bytes after the end: the CPU decodes it
            decoded.clear()
            r = segment(data, name, **params)
            assert decoded == [] and "preprocess" in r.headers["Server-Timing"]
        for cut in (len(jpeg) - 2, len(jpeg) // 2):  # cut short: never given to the GPU decoder, 400 from the CPU's
            r = c.post("/segment", files={"image": ("t.jpg", jpeg[:cut], "image/jpeg")})
            assert decoded == [] and r.status_code == 400 and r.json()["detail"], r.text
        decline.append(True)  # nvImageCodec says no: decoded on the CPU instead, same answer
        decoded.clear()
        r = segment(jpeg, "p.jpg")
        assert decoded == [len(jpeg)] and "preprocess" in r.headers["Server-Timing"]
        assert np.array_equal(decode_png(r.content), truth)
        decline.clear()
    with make_client(engines, "rgb") as c:  # off unless asked for (SEGMENT_GPU_DECODE)
        c.app.state.service.model.can_decode_on_gpu = True
        decoded.clear()
        assert c.post("/segment", files={"image": ("p.jpg", jpeg, "image/jpeg")}).status_code == 200
        assert decoded == []
