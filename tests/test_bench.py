"""GET /bench and `segment test`: report structure, honesty of the figures, caps, one run at a time."""

import json
import threading

import pytest

from app.serving import bench
from app.cli import main
from app.engines import load_model

from .models import make_client, rgb_model

TOKEN = {"Authorization": "Bearer t"}


@pytest.fixture
def model(engines):
    m = load_model(rgb_model(engines / "rgb.onnx", height="H", width="W"))
    yield m
    m.close()


def check_report(report: dict, iterations: int, batch: int) -> None:
    lat = report["latency_ms"]
    assert report["iterations"] == iterations and report["batch"] == batch
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert lat["min"] <= lat["mean"] <= lat["max"]
    assert report["throughput_images_per_s"] == pytest.approx(iterations * batch / report["wall_s"], rel=1e-6)
    # Iterations run back to back: wall time is the latencies plus loop overhead, never less.
    assert report["wall_s"] * 1000 >= lat["mean"] * iterations * 0.999
    assert report["backend"] == "onnxruntime" and report["device"] and report["precision"] == "fp32"


def test_engine_mode_report(model):
    report = bench.run(model, bench.BenchConfig(iterations=25, warmup_iterations=3, batch=2))
    check_report(report, 25, 2)
    assert report["input_shape"] == [2, 3, 1024, 2048] and report["warmup_iterations"] == 3


def test_input_size_for_dynamic_models(model, engines):
    report = bench.run(model, bench.BenchConfig(iterations=3, warmup_iterations=1, size=(256, 512)))
    assert report["input_shape"] == [1, 3, 256, 512]
    with pytest.raises(ValueError, match="multiples of 32"):
        bench.run(model, bench.BenchConfig(iterations=1, size=(100, 100)))
    fixed = load_model(rgb_model(engines / "fixed.onnx", height=64, width=64))
    try:
        with pytest.raises(ValueError, match="fixed input of 64x64"):
            bench.run(fixed, bench.BenchConfig(iterations=1, size=(128, 128)))
    finally:
        fixed.close()


def test_e2e_mode_has_stage_means(model):
    report = bench.run(model, bench.BenchConfig(mode="e2e", iterations=5, warmup_iterations=1))
    check_report(report, 5, 1)
    assert set(report["stage_mean_ms"]) == {"decode", "preprocess", "inference", "postprocess", "encode"}
    assert sum(report["stage_mean_ms"].values()) <= report["latency_ms"]["mean"] * 1.01


def test_time_cap_stops_early(model):
    report = bench.run(model, bench.BenchConfig(iterations=100_000, seconds=0.3, warmup_iterations=0))
    assert 1 <= report["iterations"] < 100_000 and report["wall_s"] < 3


def test_bench_route_caps_and_auth(engines):
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    with make_client(engines, "rgb", admin_token="t") as c:
        r = c.get("/bench", headers=TOKEN, params={"iterations": 5, "warmup": 1})
        assert r.status_code == 200
        check_report(r.json(), 5, 1)
        assert c.get("/bench", headers=TOKEN, params={"seconds": 31}).status_code == 422
        assert c.get("/bench", headers=TOKEN, params={"iterations": 2001}).status_code == 422
        assert c.get("/bench", headers=TOKEN, params={"mode": "e2e", "batch": 2}).status_code == 400
        r = c.get("/bench", headers=TOKEN, params={"iterations": 2, "height": 64, "width": 128})
        assert r.status_code == 200 and r.json()["input_shape"] == [1, 3, 64, 128]


def test_concurrent_bench_is_refused_with_409(engines):
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    with make_client(engines, "rgb", admin_token="t") as c:
        results = {}

        def long_run():
            results["first"] = c.get("/bench", headers=TOKEN, params={"iterations": 2000, "seconds": 3})

        t = threading.Thread(target=long_run)
        t.start()
        state = c.app.state.service
        for _ in range(200):
            if state.bench_lock.locked():
                break
            threading.Event().wait(0.02)
        second = c.get("/bench", headers=TOKEN, params={"iterations": 1})
        # Segmentation keeps working while the benchmark runs.
        from .models import png_bytes, quadrants

        seg = c.post("/segment", files={"image": ("p.png", png_bytes(quadrants(32, 32)[0]), "image/png")})
        t.join()
    assert second.status_code == 409 and "already running" in second.json()["detail"]
    assert seg.status_code == 200
    assert results["first"].status_code == 200


def test_segment_test_cli_prints_table_and_saves_json(engines, tmp_path, capsys):
    path = rgb_model(engines / "rgb.onnx", height="H", width="W")
    out = tmp_path / "run.json"
    assert main(["test", str(path), "--iterations", "7", "--warmup", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "throughput" in text and "p99" in text and "onnxruntime" in text
    saved = json.loads(out.read_text())
    check_report(saved, 7, 1)


def test_raw_pixel_model_reports_its_own_layout(engines):
    """A uint8 NHWC model (`segment export --input uint8`): both modes report the shape it is really fed."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", 64, 128, 3])
    y = helper.make_tensor_value_info("preds", TensorProto.UINT8, ["N", 64, 128])
    nodes = [helper.make_node("ArgMax", ["pixels"], ["idx"], axis=3, keepdims=0),
             helper.make_node("Cast", ["idx"], ["preds"], to=TensorProto.UINT8)]
    graph = helper.make_model(helper.make_graph(nodes, "raw", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    graph.ir_version = 8
    onnx.save(graph, str(engines / "raw.onnx"))
    m = load_model(engines / "raw.onnx")
    try:
        assert m.uint8_input and m.input_shape(2, 64, 128) == (2, 64, 128, 3)
        assert bench.run(m, bench.BenchConfig(iterations=2, warmup_iterations=1))["input_shape"] == [1, 64, 128, 3]
        assert bench.run(m, bench.BenchConfig(mode="e2e", iterations=2, warmup_iterations=1))["input_shape"] == [1, 64, 128, 3]
    finally:
        m.close()
