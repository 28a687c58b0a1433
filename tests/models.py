"""Tiny ONNX models whose right answer is known exactly (built with onnx.helper), test photos and PNG helpers, and
the paths tests read."""

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper

from app.core.resources import bundled_models, sample_image

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SAMPLE = sample_image()
BUNDLED = bundled_models()  # the models shipped in the package

# "RGB argmax" models: the class of a pixel is its strongest colour channel (0 red, 1 green, 2 blue).
# With mean 0.5 and std 0.5 the normalised input keeps that order, so the right answer is known exactly.
RGB_META = {"dataset": "custom", "class_names": ["red", "green", "blue"],
            "palette": [[200, 10, 10], [10, 200, 10], [10, 10, 200]],
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "trained": False}


def rgb_model(path: Path, output: str = "labels", height: int | str = 64, width: int | str = 64,
              label_dtype=TensorProto.UINT8, meta: dict | None = RGB_META, opset: int = 17,
              conv: bool = False) -> Path:
    """Write an ONNX model: input_image [N,3,H,W] -> labels [N,H,W] (ArgMax+Cast) or logits (Identity).

    ``conv`` puts an identity 1x1 convolution first: same answers, but something int8 quantization can act on."""
    x = helper.make_tensor_value_info("input_image", TensorProto.FLOAT, ["N", 3, height, width])
    nodes, initializers, feature = [], [], "input_image"
    if conv:
        initializers.append(onnx.numpy_helper.from_array(np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1), "eye"))
        nodes.append(helper.make_node("Conv", ["input_image", "eye"], ["feature"]))
        feature = "feature"
    if output == "labels":
        nodes += [helper.make_node("ArgMax", [feature], ["idx"], axis=1, keepdims=0),
                  helper.make_node("Cast", ["idx"], ["preds"], to=label_dtype)]
        y = helper.make_tensor_value_info("preds", label_dtype, ["N", height, width])
    else:
        nodes.append(helper.make_node("Identity", [feature], ["preds"]))
        y = helper.make_tensor_value_info("preds", TensorProto.FLOAT, ["N", 3, height, width])
    return _save(helper.make_graph(nodes, "rgb_argmax", [x], [y], initializer=initializers), path, meta, opset)


def _save(graph, path: Path, meta: dict | None, opset: int = 17) -> Path:
    """Check and write a test model, with its metadata JSON beside it unless ``meta`` is None."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    if meta is not None:
        path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def raw_rgb_model(path: Path, height: int | str = 64, width: int | str = 64) -> Path:
    """A raw-pixel model (as `segment export --input uint8` makes): uint8 RGB [N,H,W,3] -> labels [N,H,W], the
    class of a pixel its strongest channel, through a 1x1 identity convolution (cuDNN's work on a GPU)."""
    x = helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", height, width, 3])
    y = helper.make_tensor_value_info("preds", TensorProto.UINT8, ["N", height, width])
    eye = onnx.numpy_helper.from_array(np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1), "eye")
    nodes = [helper.make_node("Transpose", ["pixels"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Cast", ["nchw"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("Conv", ["x", "eye"], ["feature"]),
             helper.make_node("ArgMax", ["feature"], ["idx"], axis=1, keepdims=0),
             helper.make_node("Cast", ["idx"], ["preds"], to=TensorProto.UINT8)]
    return _save(helper.make_graph(nodes, "raw_rgb_argmax", [x], [y], initializer=[eye]), path,
                 {**RGB_META, "input_format": "uint8_nhwc"})


def slow_rgb_model(path: Path, size: int = 256, layers: int = 8, channels: int = 32) -> Path:
    """The RGB model's exact answers at ``size`` x ``size``, after a branch of 3x3 convolutions whose mean is
    multiplied by zero and added to the input: tens of milliseconds a call on one CPU thread, so that requests
    arrive while it runs (batching can be seen)."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("input_image", TensorProto.FLOAT, ["N", 3, size, size])
    y = helper.make_tensor_value_info("preds", TensorProto.UINT8, ["N", size, size])
    inits, nodes, feature = [onnx.numpy_helper.from_array(np.zeros((), np.float32), "zero")], [], "input_image"
    for i in range(layers):
        w = (rng.standard_normal((channels, 3 if i == 0 else channels, 3, 3)) * 0.1).astype(np.float32)
        inits.append(onnx.numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("Conv", [feature, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        feature = f"r{i}"
    nodes += [helper.make_node("ReduceMean", [feature], ["mean"], axes=[1, 2, 3], keepdims=1),
              helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
              helper.make_node("Add", ["input_image", "nothing"], ["same"]),
              helper.make_node("ArgMax", ["same"], ["idx"], axis=1, keepdims=0),
              helper.make_node("Cast", ["idx"], ["preds"], to=TensorProto.UINT8)]
    return _save(helper.make_graph(nodes, "slow_rgb_argmax", [x], [y], initializer=inits), path, RGB_META)


def argmin_model(path: Path) -> Path:
    """Like the RGB model but picks the weakest channel: a second model with visibly different answers."""
    x = helper.make_tensor_value_info("input_image", TensorProto.FLOAT, ["N", 3, "H", "W"])
    y = helper.make_tensor_value_info("preds", TensorProto.UINT8, ["N", "H", "W"])
    nodes = [helper.make_node("ArgMin", ["input_image"], ["i"], axis=1, keepdims=0),
             helper.make_node("Cast", ["i"], ["preds"], to=TensorProto.UINT8)]
    model = helper.make_model(helper.make_graph(nodes, "argmin", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    path.with_suffix(".json").write_text(json.dumps(RGB_META))
    return path


def quadrants(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A BGR photo with red, green and blue blocks (and a red bottom-right), and its true labels."""
    labels = np.zeros((h, w), np.uint8)
    labels[: h // 2, w // 2:] = 1
    labels[h // 2:, : w // 2] = 2
    rgb = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230]], np.uint8)[labels]
    return np.ascontiguousarray(rgb[..., ::-1]), labels


class FakeGpuImage:
    """An image "in GPU memory" for tests without a GPU: a host array behind ``__cuda_array_interface__``, as
    nvImageCodec's images carry it (``array``: the pixels, for a fake GPU run)."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape = array, array.shape
        self.__cuda_array_interface__ = {"shape": array.shape, "typestr": array.dtype.str,  # '|u1' for uint8
                                         "data": (array.ctypes.data, False), "strides": None, "version": 3}


def fake_gpu_decode(data: bytes) -> FakeGpuImage | None:
    """What nvImageCodec gives for a JPEG, made with OpenCV: RGB, or None for what it cannot read."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if bgr is None else FakeGpuImage(np.ascontiguousarray(bgr[..., ::-1]))


def png_bytes(bgr: np.ndarray) -> bytes:
    return cv2.imencode(".png", bgr)[1].tobytes()


def decode_png(data: bytes, flags=cv2.IMREAD_UNCHANGED) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    assert img is not None, "response is not a PNG"
    return img


def make_client(engines: Path, model: str, **settings):
    """A TestClient of the service on ``engines`` serving ``model`` (use it as a context manager)."""
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    engines = Path(engines)
    settings.setdefault("results_dir", engines.parent / "results")  # video jobs beside the repository, not in ROOT
    return TestClient(create_app(Settings(engines_dir=engines, model=model, **settings)))
