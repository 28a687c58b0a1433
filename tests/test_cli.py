"""The `segment` command line: the seed's workflow verbatim, and clear errors."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.cli import main, worker_environment
from app.engines import tensorrt_available

from .models import RGB_META, ROOT, decode_png, png_bytes, quadrants, rgb_model


def segment(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_run_writes_mask_overlay_and_labels(engines, tmp_path):
    model = rgb_model(engines / "rgb.onnx", height="H", width="W")
    photo, truth = quadrants(64, 96)
    src = tmp_path / "in.png"
    src.write_bytes(png_bytes(photo))
    assert main(["run", str(model), str(src), str(tmp_path / "mask.png")]) == 0
    palette_bgr = np.array(RGB_META["palette"], np.uint8)[:, ::-1]
    assert np.array_equal(decode_png((tmp_path / "mask.png").read_bytes()), palette_bgr[truth])
    assert main(["run", str(model), str(src), str(tmp_path / "ids.png"), "--view", "labels"]) == 0
    assert np.array_equal(decode_png((tmp_path / "ids.png").read_bytes()), truth)
    assert main(["run", str(model), str(src), str(tmp_path / "over.jpg"), "--view", "overlay"]) == 0
    assert (tmp_path / "over.jpg").read_bytes()[:2] == b"\xff\xd8"  # a JPEG, as the seed writes


def test_clear_errors(engines, tmp_path):
    model = rgb_model(engines / "rgb.onnx")
    r = segment("run", str(tmp_path / "missing.onnx"), str(model), str(tmp_path / "o.png"))
    assert r.returncode != 0 and "no such model file" in r.stderr
    (tmp_path / "notes.txt").write_text("hello")
    r = segment("run", str(tmp_path / "notes.txt"), str(model), str(tmp_path / "o.png"))
    assert r.returncode != 0 and "expected a model file" in r.stderr
    r = segment("run", str(model), str(tmp_path / "notes.txt"), str(tmp_path / "o.png"))
    assert r.returncode != 0 and "not" in r.stderr and "Traceback" not in r.stderr
    r = segment("compile", str(model), str(tmp_path / "out.txt"))
    assert r.returncode != 0 and "must end in" in r.stderr
    r = segment("compile", str(model), str(tmp_path / "out.onnx"), "--bf16")
    assert r.returncode != 0 and "fp16 or int8 model for ONNX Runtime, not bf16" in r.stderr
    assert not (tmp_path / "out.onnx").exists()
    r = segment("compile", str(model), str(tmp_path / "out.trt"), "--max-shape", "8,1024")
    assert r.returncode != 0 and "batch,height,width" in r.stderr
    (tmp_path / "bad.engine").write_bytes(b"\0" * 32)
    r = segment("test", str(tmp_path / "bad.engine"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and ("TensorRT" in r.stderr or "could not be loaded" in r.stderr)


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed: compile would really build")
@pytest.mark.parametrize("argv", [["compile", "M", "out.trt", "--fp16"], ["compile", "--fp16", "M", "out.trt"],
                                  ["compile", "M", "out.plan"]])
def test_seed_compile_forms_parse_and_explain_missing_tensorrt(engines, tmp_path, argv):
    model = rgb_model(engines / "rgb.onnx")
    argv = [str(model) if a == "M" else str(tmp_path / a) if a.startswith("out") else a for a in argv]
    r = segment(*argv)
    assert r.returncode == 3 and "pip install '.[tensorrt]'" in r.stderr
    assert not list(tmp_path.glob("out*"))


def test_engines_lists_repository(engines, capsys):
    rgb_model(engines / "rgb.onnx")
    assert main(["engines", "--dir", str(engines)]) == 0
    line = capsys.readouterr().out
    assert "rgb" in line and "onnx" in line and "[untrained]" in line


def test_help_lists_every_command():
    r = segment("--help")
    for word in ("serve", "export", "compile", "run", "test", "engines", "segment compile model.onnx model.trt --fp16"):
        assert word in r.stdout


def test_serve_ray_options_say_what_goes_with_what(tmp_path):
    """--address joins a Ray cluster and --workers is the embedded server's: each refused where it does not apply,
    before anything starts (and before Ray is imported); without Ray, --ray says which extra to install."""
    r = segment("serve", "--address", "auto")
    assert r.returncode == 2 and "use it with --ray" in r.stderr
    r = segment("serve", "--ray", "--workers", "2")
    assert r.returncode == 2 and "SEGMENT_RAY_INGRESS_REPLICAS" in r.stderr
    (tmp_path / "ray").mkdir()  # a `ray` that is not there, as on a machine without the cluster extra
    (tmp_path / "ray" / "__init__.py").write_text("raise ModuleNotFoundError('No module named ray', name='ray')")
    r = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--ray"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 2 and "pip install 'bisenet-serve[cluster]'" in r.stderr


def test_worker_environment_is_taken_back(monkeypatch):
    """The worker processes' variables are set for the context only: afterwards the metrics folder is gone and so
    is the variable naming it (a later child process would be sent to a missing folder), a prior value is kept."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setenv("SEGMENT_WORKERS", "1")
    with worker_environment(3):
        shared = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        assert shared.is_dir() and os.environ["SEGMENT_WORKERS"] == "3"
    assert not shared.exists() and "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    assert os.environ["SEGMENT_WORKERS"] == "1"
