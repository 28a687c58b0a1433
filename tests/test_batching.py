"""Dynamic batching: concurrent requests share runner calls, and each gets its own answer."""

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from app.serving.batching import Batcher
from app.engines import load_model
from app.serving.served import ServedModel

from .models import decode_png, make_client, png_bytes, quadrants, rgb_model


def test_batcher_gathers_and_routes_rows_back():
    calls = []

    def infer(x):
        calls.append(x.shape[0])
        return x * 10

    b = Batcher(infer, max_batch=8, max_wait_ms=50)
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

    b = Batcher(infer, max_batch=4, max_wait_ms=0)
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

    b = Batcher(lambda x: x + 1, max_batch=4, max_wait_ms=0, on_batch=fail)
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

    b = Batcher(infer, max_batch=4, max_wait_ms=60, fixed_batch=True)
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

    b = Batcher(infer, max_batch=4, max_wait_ms=30)
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
