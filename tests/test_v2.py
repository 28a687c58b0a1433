"""The Open Inference Protocol v2 routes through the real TestClient: metadata, health, inference in the JSON
encoding and with binary tensor data, the repository extension, and errors as {"error": ...}."""

import base64
import json
import struct

import numpy as np
import pytest

from .models import RGB_META, make_client, png_bytes, quadrants, raw_rgb_model, rgb_model
from .server import TOKEN

ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def v2(engines):
    """The dynamic-H/W RGB model served, a raw-pixel one beside it in the repository."""
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    raw_rgb_model(engines / "raw.onnx", height=64, width=64)
    with make_client(engines, "rgb", admin_token=TOKEN) as c:
        yield c


def infer_json(client, tensor: dict, model: str = "rgb", **extra):
    return client.post(f"/v2/models/{model}/infer", json={"inputs": [tensor], **extra})


def image_tensor(*images: bytes) -> dict:
    return {"name": "image", "datatype": "BYTES", "shape": [len(images)],
            "data": [base64.b64encode(i).decode() for i in images]}


def binary_request(header: dict, *chunks: bytes) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + b"".join(chunks), {"Inference-Header-Content-Length": str(len(head)),
                                     "Content-Type": "application/octet-stream"}


def split_binary(response) -> tuple[dict, bytes]:
    n = int(response.headers["inference-header-content-length"])
    return json.loads(response.content[:n]), response.content[n:]


def test_server_metadata_and_health(v2):
    meta = v2.get("/v2").json()
    assert meta["name"] == "bisenet-serve" and {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])
    assert v2.get("/v2/health/live").status_code == 200
    assert v2.get("/v2/health/ready").status_code == 200


def test_model_metadata_for_served_and_unloaded_models(v2):
    served = v2.get("/v2/models/rgb").json()
    assert served["platform"] == "onnxruntime_onnx" and served["versions"] == ["1"]
    assert {t["name"]: (t["datatype"], t["shape"]) for t in served["inputs"]} == {
        "image": ("BYTES", [-1]), "pixels": ("UINT8", [-1, -1, -1, 3])}
    assert {t["name"]: (t["datatype"], t["shape"]) for t in served["outputs"]} == {
        "labels": ("UINT8", [-1, -1, -1]), "class_shares": ("FP32", [-1, 3])}
    assert v2.get("/v2/models/raw").json()["outputs"][1]["shape"] == [-1, 3]  # from metadata, not loaded
    assert v2.get("/v2/models/rgb/versions/1").status_code == 200
    missing = v2.get("/v2/models/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    assert v2.get("/v2/models/rgb/versions/7").status_code == 404


def test_model_ready_only_for_the_loaded_model(v2):
    assert v2.get("/v2/models/rgb/ready").status_code == 200
    not_loaded = v2.get("/v2/models/raw/ready")
    assert not_loaded.status_code == 400 and "not loaded" in not_loaded.json()["error"]
    assert v2.get("/v2/models/nope/ready").status_code == 404


def test_infer_json_images_gives_exact_labels_and_shares(v2):
    photo, truth = quadrants(48, 80)
    r = infer_json(v2, image_tensor(png_bytes(photo), png_bytes(photo)), id="req-1")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "rgb" and body["id"] == "req-1"
    out = {o["name"]: o for o in body["outputs"]}
    labels = out["labels"]
    assert labels["datatype"] == "UINT8" and labels["shape"] == [2, 48, 80]
    assert np.array_equal(np.array(labels["data"], np.uint8).reshape(2, 48, 80), np.stack([truth, truth]))
    shares = np.array(out["class_shares"]["data"], np.float32).reshape(out["class_shares"]["shape"])
    assert shares.shape == (2, 3)
    assert np.allclose(shares[0], np.bincount(truth.ravel(), minlength=3) / truth.size)


def test_infer_pixels_json_and_binary_agree_with_truth(v2):
    photo, truth = quadrants(32, 64)
    rgb = np.ascontiguousarray(photo[..., ::-1])
    as_json = infer_json(v2, {"name": "pixels", "datatype": "UINT8", "shape": [32, 64, 3],
                              "data": rgb.ravel().tolist()}, outputs=[{"name": "labels"}])
    assert [o["name"] for o in as_json.json()["outputs"]] == ["labels"]
    assert np.array_equal(np.array(as_json.json()["outputs"][0]["data"]).reshape(1, 32, 64), truth[None])
    body, headers = binary_request(
        {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [2, 32, 64, 3],
                     "parameters": {"binary_data_size": 2 * rgb.nbytes}}],
         "outputs": [{"name": "labels", "parameters": {"binary_data": True}}, {"name": "class_shares"}]},
        rgb.tobytes(), rgb.tobytes())
    r = v2.post("/v2/models/rgb/infer", content=body, headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    header, data = split_binary(r)
    labels, shares = header["outputs"]
    assert labels["parameters"]["binary_data_size"] == len(data) == 2 * 32 * 64
    assert np.array_equal(np.frombuffer(data, np.uint8).reshape(2, 32, 64), np.stack([truth, truth]))
    assert "data" in shares and len(shares["data"]) == 6


def test_infer_binary_bytes_images(v2):
    photo, truth = quadrants(40, 40)
    png = png_bytes(photo)
    element = struct.pack("<I", len(png)) + png
    body, headers = binary_request({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                "parameters": {"binary_data_size": len(element)}}],
                                    "parameters": {"binary_data_output": True}}, element)
    header, data = split_binary(v2.post("/v2/models/rgb/infer", content=body, headers=headers))
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert sizes == [40 * 40, 3 * 4]
    assert np.array_equal(np.frombuffer(data[:sizes[0]], np.uint8).reshape(40, 40), truth)
    assert np.isclose(np.frombuffer(data[sizes[0]:], "<f4").sum(), 1.0)


@pytest.mark.parametrize("tensor, status, words", [
    (image_tensor(b"not an image at all"), 415, "unsupported"),
    (image_tensor(png_bytes(quadrants(32, 32)[0])[:60]), 400, "corrupt"),
    ({"name": "image", "datatype": "BYTES", "shape": [1], "data": ["***"]}, 400, "base64"),
    ({"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}, 400, "BYTES [N]"),
    ({"name": "pixels", "datatype": "UINT8", "shape": [2, 2, 3], "data": [300] * 12}, 400, "range"),
    ({"name": "pixels", "datatype": "UINT8", "shape": [2, 2, 3], "data": [1] * 5}, 400, "12 elements"),
    ({"name": "pixels", "datatype": "UINT8", "shape": [4, 4], "data": [1] * 16}, 400, "[H,W,3]"),
    ({"name": "depth", "datatype": "UINT8", "shape": [1], "data": [1]}, 400, "send one input"),
])
def test_bad_inputs_are_explained_in_the_protocol_error_shape(v2, tensor, status, words):
    r = infer_json(v2, tensor)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and words in r.json()["error"]


def test_request_level_errors(v2):
    assert v2.post("/v2/models/rgb/infer", content=b"{not json").json()["error"].startswith("the inference request")
    assert v2.post("/v2/models/rgb/infer", json={"inputs": []}).status_code == 400
    body, headers = binary_request({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 3],
                                                "parameters": {"binary_data_size": 99}}]}, b"abc")
    assert "runs past" in v2.post("/v2/models/rgb/infer", content=body, headers=headers).json()["error"]
    two = infer_json(v2, image_tensor(png_bytes(quadrants(32, 32)[0]), png_bytes(quadrants(32, 64)[0])))
    assert two.status_code == 400 and "different sizes" in two.json()["error"]
    asked = infer_json(v2, image_tensor(png_bytes(quadrants(32, 32)[0])), outputs=[{"name": "logits"}])
    assert asked.status_code == 400 and "unknown output" in asked.json()["error"]
    not_loaded = infer_json(v2, image_tensor(png_bytes(quadrants(32, 32)[0])), model="raw")
    assert not_loaded.status_code == 409 and "'raw' is not loaded" in not_loaded.json()["error"]
    assert infer_json(v2, image_tensor(b"x"), model="nope").status_code == 404


def test_limits_apply_as_on_segment(engines):
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    photo = png_bytes(quadrants(64, 64)[0])
    with make_client(engines, "rgb", max_pixels=1000, max_upload_bytes=4096, max_request_images=2) as c:
        big = infer_json(c, image_tensor(photo))
        assert big.status_code == 413 and "limit" in big.json()["error"]
        pixels = infer_json(c, {"name": "pixels", "datatype": "UINT8", "shape": [40, 40, 3], "data": [0] * 4800})
        assert pixels.status_code == 413 and set(pixels.json()) == {"error"}
        small = png_bytes(quadrants(8, 8)[0])
        three = infer_json(c, image_tensor(small, small, small))
        assert three.status_code == 400 and "1 to 2 images" in three.json()["error"]
    with make_client(engines, "rgb", min_side=16) as c:
        assert infer_json(c, image_tensor(png_bytes(quadrants(8, 8)[0]))).status_code == 400


def test_repository_index_load_and_unload(v2):
    assert v2.post("/v2/repository/index").status_code == 401  # the repository extension is an admin's
    index = {m["name"]: m for m in v2.post("/v2/repository/index", headers=ADMIN).json()}
    assert index["rgb"]["state"] == "READY" and index["raw"]["state"] == "UNAVAILABLE"
    assert [m["name"] for m in v2.post("/v2/repository/index", headers=ADMIN, json={"ready": True}).json()] == ["rgb"]
    refused = v2.post("/v2/repository/models/raw/load")
    assert refused.status_code == 401 and set(refused.json()) == {"error"}
    assert v2.post("/v2/repository/models/raw/load", headers=ADMIN).status_code == 200
    assert v2.get("/v2/models/raw/ready").status_code == 200 and v2.get("/v2/models/rgb/ready").status_code == 200
    assert v2.get("/models").json()["models"][0]["name"] == "raw"  # the control plane's own view agrees
    photo, truth = quadrants(64, 64)
    r = infer_json(v2, image_tensor(png_bytes(photo)), model="raw")
    assert np.array_equal(np.array(r.json()["outputs"][0]["data"]).reshape(64, 64), truth)
    default = v2.post("/v2/repository/models/rgb/unload", headers=ADMIN)
    assert default.status_code == 409 and set(default.json()) == {"error"}
    assert v2.post("/v2/repository/models/raw/unload", headers=ADMIN).status_code == 200
    assert v2.get("/v2/models/raw/ready").status_code == 400
    assert v2.post("/v2/repository/models/nope/load", headers=ADMIN).status_code == 404


def test_no_model_served(engines):
    with make_client(engines, "absent") as c:
        ready = c.get("/v2/health/ready")
        assert ready.status_code == 503 and "no model" in ready.json()["error"]
        assert infer_json(c, image_tensor(b"x"), model="absent").status_code == 404


def test_many_classes_give_int32_labels(engines):
    meta = {**RGB_META, "num_classes": 300, "class_names": [f"c{i}" for i in range(300)]}
    rgb_model(engines / "wide.onnx", height="H", width="W", meta=meta, label_dtype=6)
    with make_client(engines, "wide") as c:
        assert c.get("/v2/models/wide").json()["outputs"][0]["datatype"] == "INT32"
        photo, truth = quadrants(32, 32)
        out = infer_json(c, image_tensor(png_bytes(photo)), model="wide").json()["outputs"]
        assert out[0]["datatype"] == "INT32" and out[1]["shape"] == [1, 300]
        assert np.array_equal(np.array(out[0]["data"]).reshape(32, 32), truth)


def test_rest_of_the_api_keeps_detail(v2):
    r = v2.post("/segment", files={"image": ("x.png", b"nope", "image/png")})
    assert r.status_code == 415 and "detail" in r.json()
