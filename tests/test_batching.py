"""Dynamic batching: concurrent requests share runner calls, and each gets its own answer."""

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from app.serving.batching import Batcher
from app.engines import load_model
from app.serving.served import ServedModel

from .models import FakeGpuImage, decode_png, fake_gpu_decode, make_client, png_bytes, quadrants, rgb_model


def test_batcher_gathers_and_routes_rows_back():
    calls = []

    def infer(x):
        calls.append(x.shape[0])
        return x * 10

    b = Batcher.of_arrays(infer, max_batch=8, max_wait_ms=50)
    inputs = [np.full((1, 2), i, np.int64) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(b.submit, inputs))
    b.close()
    assert [int(o[0, 0]) for o in outs] == [10 * i for i in range(8)]
    assert sum(calls) == 8 and max(calls) > 1  # fewer runner calls than requests
    assert b.stats()["largest_batch"] == max(calls)


def test_what_queued_while_a_batch_ran_joins_the_next_even_with_no_wait():
    """max_wait 0 adds no latency, yet images that arrived while the model was busy still share its next call."""
    calls, first_running, release = [], threading.Event(), threading.Event()

    def infer(x):
        calls.append(x.shape[0])
        first_running.set()
        release.wait(5)  # the first call holds the model until the others have queued
        return x * 10

    b = Batcher.of_arrays(infer, max_batch=4, max_wait_ms=0)
    with ThreadPoolExecutor(5) as pool:
        first = pool.submit(b.submit, np.full((1, 2), 0, np.int64))
        assert first_running.wait(5)
        rest = [pool.submit(b.submit, np.full((1, 2), i, np.int64)) for i in range(1, 5)]
        while b._queue.qsize() < 4:
            threading.Event().wait(0.01)
        release.set()
        outs = [first.result(5)] + [f.result(5) for f in rest]
    b.close()
    assert [int(o[0, 0]) for o in outs] == [0, 10, 20, 30, 40]
    assert calls == [1, 4]


def test_a_failing_metric_costs_no_answer_and_a_closed_batcher_refuses_work():
    def fail(size):
        raise ValueError("metrics backend down")

    b = Batcher.of_arrays(lambda x: x + 1, max_batch=4, max_wait_ms=0, on_batch=fail)
    assert int(b.submit(np.full((1, 2), 1, np.int64))[0, 0]) == 2
    assert int(b.submit(np.full((1, 2), 2, np.int64))[0, 0]) == 3  # the thread survived the metric's failure
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(np.zeros((1, 2), np.int64))  # at once, not a wait for a thread that is gone
    b.close()  # twice is harmless


def test_fixed_batch_runs_one_shape_and_rows_right():
    shapes = []

    def infer(x):
        shapes.append(x.shape[0])
        return x + 1

    b = Batcher.of_arrays(infer, max_batch=4, max_wait_ms=60, fixed_batch=True)
    inputs = [np.full((1, 3), i, np.int64) for i in range(7)]
    with ThreadPoolExecutor(7) as pool:
        outs = list(pool.map(b.submit, inputs))
    b.close()
    assert [int(o[0, 0]) for o in outs] == [i + 1 for i in range(7)]
    assert set(shapes) == {4} and len(shapes) >= 2  # every call padded to max_batch


def test_batcher_groups_shapes_and_reports_errors():
    def infer(x):
        if x.shape[1] == 3:
            raise ValueError("bad shape")
        return x

    b = Batcher.of_arrays(infer, max_batch=4, max_wait_ms=30)
    with ThreadPoolExecutor(4) as pool:
        good = [pool.submit(b.submit, np.zeros((1, 2))) for _ in range(2)]
        bad = [pool.submit(b.submit, np.zeros((1, 3))) for _ in range(2)]
        assert all(f.result().shape == (1, 2) for f in good)
        for f in bad:
            with pytest.raises(ValueError, match="bad shape"):
                f.result()
    b.close()


def test_batching_needs_a_dynamic_batch_dimension(engines):
    from onnx import TensorProto

    fixed = load_model(rgb_model(engines / "b1.onnx", label_dtype=TensorProto.UINT8))
    fixed.contract = dataclasses.replace(fixed.contract, batch_dynamic=False)  # as a model exported with batch 1
    served = ServedModel.serve(fixed, batch_max=8, batch_wait_ms=5)
    try:
        assert served.batcher is None
    finally:
        served.close()


def test_service_with_batching_answers_every_request_correctly(engines):
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    cases = []
    for i in range(24):
        photo, truth = quadrants(64, 96)  # one shape: these can share a batch
        if i % 3 == 0:
            photo, truth = np.ascontiguousarray(photo[::-1]), np.ascontiguousarray(truth[::-1])
        if i % 4 == 0:
            photo, truth = quadrants(96, 128)  # another shape: batched separately
        cases.append((photo, truth))
    with make_client(engines, "rgb", batch_max=8, batch_wait_ms=30) as c:
        barrier = threading.Barrier(12)

        def run(case):
            barrier.wait()  # twelve requests arrive together, twice
            r = c.post("/segment", params={"view": "labels"}, files={"image": ("p.png", png_bytes(case[0]), "image/png")})
            return r.status_code, decode_png(r.content)

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(run, cases))
        stats = c.get("/models/active").json()["batching"]
        metrics = c.get("/metrics").text
    for (_, truth), (status, labels) in zip(cases, results):
        assert status == 200 and np.array_equal(labels, truth)
    assert stats["images"] == 24 and stats["largest_batch"] > 1 and stats["batches"] < 24
    assert "segment_batch_size_count" in metrics


def test_batching_off_by_default(client):
    assert client.get("/models/active").json()["batching"] is None


def test_gpu_decoded_jpegs_batch_in_the_warmed_shape_and_declined_ones_fall_back(engines, monkeypatch):
    """With GPU decoding and batching on (ONNX Runtime on CUDA), concurrent JPEGs are decoded as one batch and
    run as one batch of ``batch_max`` rows; one the decoder declines, or that decodes to another size, comes back
    None (its caller decodes it on the CPU) without costing the others their answers.

    No GPU here: nvImageCodec is stood in for by OpenCV (RGB, as it returns), the model's run on GPU memory by its
    CPU run, and the CUDA provider's costly shape change is claimed."""
    import cv2
    from onnx import TensorProto

    from app.engines.model import SegmentationModel
    from app.engines.onnxrt import OnnxRuntime
    from app.serving import gpu_decode
    from app.serving.pipeline import preprocess

    model = load_model(rgb_model(engines / "rgb.onnx", label_dtype=TensorProto.UINT8))
    photo, truth = quadrants(64, 64)
    cases = [(np.ascontiguousarray(np.rot90(photo, k)), np.rot90(truth, k)) for k in range(4)]
    jpegs = [cv2.imencode(".png", p)[1].tobytes() for p, _ in cases]  # lossless, so answers are exact
    declined = {jpegs[1]}
    odd = cv2.imencode(".png", cv2.resize(photo, (96, 64)))[1].tobytes()  # "EXIF-rotated": not the model's size
    deep = cv2.imencode(".png", photo.astype(np.uint16) * 256)[1].tobytes()  # decodes to 16 bits: not RGB uint8
    decodes, runs = [], []

    def fake_decode(datas):
        decodes.append(len(datas))
        return [None if d in declined else FakeGpuImage(np.ascontiguousarray(cv2.imdecode(
            np.frombuffer(d, np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1])) if d == deep else fake_gpu_decode(d)
            for d in datas]

    def fake_infer_on_gpu(images, rows=1):
        runs.append((len(images), rows))
        return np.concatenate([model.infer(preprocess(np.ascontiguousarray(im.array[..., ::-1]), model, (64, 64)))
                               for im in images])

    monkeypatch.setattr(gpu_decode, "available", lambda: True)
    monkeypatch.setattr(gpu_decode, "warm", lambda h, w: None)
    monkeypatch.setattr(gpu_decode, "decode", fake_decode)
    monkeypatch.setattr(SegmentationModel, "accepts_gpu_images", property(lambda self: True))
    monkeypatch.setattr(OnnxRuntime, "shape_change_is_costly", property(lambda self: True))
    monkeypatch.setattr(model, "infer_on_gpu", fake_infer_on_gpu, raising=False)
    served = ServedModel.serve(model, batch_max=4, batch_wait_ms=40, gpu_decode_on=True)
    try:
        assert served.jpeg_batcher is not None
        work = [(jpegs[i % 4], cases[i % 4][1]) for i in range(12)] + [(odd, None)] * 2 + [(deep, None)]
        with ThreadPoolExecutor(7) as pool:
            answers = list(pool.map(lambda item: served.infer_jpeg(item[0]), work))
        for (data, labels), answer in zip(work, answers):
            if data in declined or data in (odd, deep):
                assert answer is None
            else:
                assert answer.shape == (1, 64, 64) and np.array_equal(answer[0], labels)
        stats = served.describe()["gpu_decode_batching"]
        assert stats["images"] == 15 and stats["largest_batch"] > 1 and sum(decodes) == 15
        assert runs and all(rows == 4 for _, rows in runs)  # every run in the one warmed batch shape
        assert sum(n for n, _ in runs) == 9  # the 3 declined, 2 odd-sized and 1 16-bit were never run
    finally:
        served.close()


def test_a_batch_step_that_answers_too_few_fails_its_callers_instead_of_stranding_them():
    b = Batcher(lambda items: items[:-1], max_batch=4, max_wait_ms=50)
    try:
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(b.submit, i) for i in range(3)]
            errors = [f.exception(timeout=10) for f in futures]
        assert all(isinstance(e, RuntimeError) and "answered" in str(e) for e in errors), errors
        with pytest.raises(RuntimeError, match="answered 0 of 1"):  # the thread lives on, and still checks
            b.submit(7)
    finally:
        b.close()


def test_gpu_decode_keeps_the_good_images_when_the_batch_call_fails(monkeypatch):
    """nvImageCodec raising for a batch (one bad file in it) costs only that file: each is decoded alone then."""
    import queue

    from app.serving import gpu_decode

    class Decoder:
        def decode(self, src):
            if isinstance(src, list):
                raise RuntimeError("batch failed")
            if src == b"bad":
                raise RuntimeError("not a JPEG")
            return f"image of {src.decode()}"

    pool = queue.Queue()
    pool.put(Decoder())
    monkeypatch.setattr(gpu_decode, "_pool", pool)
    monkeypatch.setattr(gpu_decode, "_created", gpu_decode.DECODERS_PER_PROCESS)  # no nvImageCodec needed
    assert gpu_decode.decode([b"a", b"bad", b"c"]) == ["image of a", None, "image of c"]
    assert gpu_decode.decode([b"bad"]) == [None]
    assert pool.qsize() == 1  # the decoder went back to the pool each time
