"""The CUDA path on a GPU host: onnxruntime-gpu chosen by itself, CPU-equal answers, fp16, batching at one shape,
JPEGs decoded on the GPU. Skipped, with the reason, where there is no usable NVIDIA GPU (CI); run on the lent
H100 (README: GPU serving)."""

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from app.serving import gpu_decode
from app.serving.pipeline import segment_image
from app.engines import OrtOptions
from app.engines import load_model

from .models import BUNDLED, ROOT, SAMPLE, decode_png, make_client, png_bytes, quadrants, raw_rgb_model


def _cuda_usable() -> bool:
    """onnxruntime-gpu is installed and really runs a session on a GPU (it falls back to the CPU without one)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    except Exception:
        return False
    return sess.get_providers()[0] == "CUDAExecutionProvider"


pytestmark = pytest.mark.skipif(not _cuda_usable(), reason="needs an NVIDIA GPU and onnxruntime-gpu "
                                                           "(pip install -e '.[gpu]' on a GPU host)")
DEFAULT = BUNDLED / "camvid_bisenetv2.onnx"
TOKEN = {"Authorization": "Bearer t"}


def _default_model_in(engines):
    for suffix in (".onnx", ".json"):
        shutil.copy(DEFAULT.with_suffix(suffix), engines / DEFAULT.with_suffix(suffix).name)


def test_cuda_is_chosen_by_itself_and_reported(engines):
    """No setting needed: /models/active, /bench and each answer say cuda, and the mask is the CPU's."""
    _default_model_in(engines)
    photo = cv2.imread(str(SAMPLE))
    cpu = load_model(DEFAULT, ort=OrtOptions(providers="cpu"))
    try:
        assert cpu.device.startswith("cpu")
        truth = segment_image(cpu, photo).labels
    finally:
        cpu.close()
    with make_client(engines, DEFAULT.stem, admin_token="t") as c:
        active = c.get("/models/active").json()
        assert active["backend"] == "onnxruntime" and active["device"] == "cuda"
        bench = c.get("/bench", headers=TOKEN, params={"iterations": 5, "warmup": 1})
        assert bench.status_code == 200 and bench.json()["device"] == "cuda"
        r = c.post("/segment", params={"view": "labels"}, files={"image": ("s.png", SAMPLE.read_bytes(), "image/png")})
        assert r.status_code == 200
        labels = decode_png(r.content)
        assert labels.shape == truth.shape and (labels == truth).mean() >= 0.995


def test_models_show_the_gpu_memory_a_load_took(engines):
    """GET /models: the ONNX Runtime session's GPU memory, read through NVML around the load (the worker's first
    model also carries its CUDA context)."""
    pytest.importorskip("pynvml", reason="nvidia-ml-py (the gpu extra) reads GPU memory")
    _default_model_in(engines)
    with make_client(engines, DEFAULT.stem) as c:
        (model,) = c.get("/models").json()["models"]
        (worker,) = model["workers"].values()
        assert model["memory"]["device_bytes"] > 0 and worker["memory"] == model["memory"]


def test_default_model_on_cuda_in_fp32_and_fp16_agrees_with_the_cpu(tmp_path):
    from app.builds.compiler import compile_model
    from app.builds.options import BuildOptions

    photo = cv2.imread(str(SAMPLE))
    fp16_path = tmp_path / "camvid_fp16.onnx"
    shutil.copy(DEFAULT.with_suffix(".json"), tmp_path / "camvid.json")
    shutil.copy(DEFAULT, tmp_path / "camvid.onnx")
    compile_model(tmp_path / "camvid.onnx", fp16_path, BuildOptions(target="onnxruntime", precision="fp16"))
    models = [load_model(p, ort=o) for p, o in ((DEFAULT, OrtOptions(providers="cpu")), (DEFAULT, OrtOptions()),
                                                 (fp16_path, OrtOptions()))]
    try:
        cpu, fp32, fp16 = models
        assert fp32.device == "cuda" and fp16.device == "cuda"
        truth = segment_image(cpu, photo).labels
        assert (segment_image(fp32, photo).labels == truth).mean() >= 0.995
        assert (segment_image(fp16, photo).labels == truth).mean() >= 0.99
    finally:
        for m in models:
            m.close()


def test_batching_on_cuda_runs_one_shape_and_answers_each_request(engines):
    """ONNX Runtime re-plans cuDNN at every new batch size, so on CUDA batches are padded to one warmed shape;
    every caller still gets its own photo's labels."""
    from app.serving.served import ServedModel

    model = ServedModel.serve(load_model(raw_rgb_model(engines / "raw.onnx")), batch_max=4, batch_wait_ms=20)
    try:
        assert model.device == "cuda" and model.uint8_input
        assert model.batcher is not None and model.batcher.fixed_batch
        photo, truth = quadrants(64, 64)
        cases = [(np.ascontiguousarray(np.rot90(photo, k)), np.rot90(truth, k)) for k in range(4)]
        cases += [(np.ascontiguousarray(p[:, ::-1]), t[:, ::-1]) for p, t in cases]
        barrier = threading.Barrier(8)

        def run(i):
            barrier.wait()
            return [np.array_equal(segment_image(model, cases[(i + j) % 8][0]).labels, cases[(i + j) % 8][1])
                    for j in range(10)]

        with ThreadPoolExecutor(8) as pool:
            results = [ok for oks in pool.map(run, range(8)) for ok in oks]
        stats = model.batcher.stats()
        assert len(results) == 80 and all(results)
        assert stats["images"] == 80 and 1 < stats["largest_batch"] <= 4
    finally:
        model.close()


@pytest.mark.skipif(not gpu_decode.available(), reason="nvImageCodec is not installed (the gpu extra)")
@pytest.mark.parametrize("batch_max", [1, 4])
def test_jpegs_decoded_on_the_gpu_give_the_cpu_answer(engines, batch_max):
    """One at a time, and (batch_max 4) decoded as one batch and copied into the one warmed batch shape."""
    photo, truth = quadrants(64, 64)
    raw_rgb_model(engines / "raw.onnx")
    jpeg = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    with make_client(engines, "raw", gpu_decode=True, batch_max=batch_max, batch_wait_ms=20) as c:
        assert c.app.state.service.model.decodes_on_gpu

        def post(data, **params):
            return c.post("/segment", params={"view": "labels", **params}, files={"image": ("p.jpg", data, "image/jpeg")})

        # four different photos, so that a row given to the wrong request shows
        cases = [(cv2.imencode(".jpg", np.ascontiguousarray(np.rot90(photo, k)), [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
                  .tobytes(), np.rot90(truth, k)) for k in range(4)]
        with ThreadPoolExecutor(8) as pool:  # requests at once share the process's decoders
            results = list(pool.map(lambda i: post(cases[i % 4][0]), range(40)))
        for i, r in enumerate(results):
            assert r.status_code == 200 and "preprocess" not in r.headers["Server-Timing"]
            assert np.array_equal(decode_png(r.content), cases[i % 4][1])
        batching = c.get("/models/active").json().get("gpu_decode_batching")
        if batch_max > 1:
            assert batching["images"] == 40 and batching["largest_batch"] > 1
        else:
            assert batching is None
        r = post(png_bytes(photo))  # no GPU PNG decoder: the CPU path, same answer
        assert r.status_code == 200 and "preprocess" in r.headers["Server-Timing"]
        assert np.array_equal(decode_png(r.content), truth)
        assert post(jpeg[: len(jpeg) // 2]).status_code == 400  # cut short: refused, not half-decoded
