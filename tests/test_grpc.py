"""The Open Inference Protocol over gRPC, with Triton's own gRPC client (tritonclient[grpc]), unchanged, against the
real server on loopback."""

from contextlib import closing

import numpy as np
import pytest

from .models import png_bytes, quadrants
from .server import TOKEN
from .test_tritonclient import exercise_repository_extension

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is in the dev extra")
from tritonclient.utils import InferenceServerException  # noqa: E402

ADMIN = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def triton(protocol_server):
    with closing(grpcclient.InferenceServerClient(url=protocol_server.grpc_address)) as client:
        yield client


def test_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.get_server_metadata(as_json=True)["name"] == "bisenet-serve"
    meta = triton.get_model_metadata("rgb", as_json=True)
    assert meta["platform"] == "onnxruntime_onnx" and [i["name"] for i in meta["inputs"]] == ["image", "pixels"]
    assert meta["outputs"][1] == {"name": "class_shares", "datatype": "FP32", "shape": ["-1", "3"]}
    assert triton.is_model_ready("rgb") and not triton.is_model_ready("raw")


def test_infer_images_and_pixels(triton):
    photo, truth = quadrants(48, 64)
    image = grpcclient.InferInput("image", [2], "BYTES")
    image.set_data_from_numpy(np.array([png_bytes(photo)] * 2, dtype=object))
    result = triton.infer("rgb", [image], request_id="g1")
    assert np.array_equal(result.as_numpy("labels"), np.stack([truth, truth]))
    assert np.allclose(result.as_numpy("class_shares")[0], np.bincount(truth.ravel(), minlength=3) / truth.size)
    assert result.get_response().id == "g1"
    pixels = grpcclient.InferInput("pixels", [48, 64, 3], "UINT8")
    pixels.set_data_from_numpy(np.ascontiguousarray(photo[..., ::-1]))
    result = triton.infer("rgb", [pixels], outputs=[grpcclient.InferRequestedOutput("labels")])
    assert np.array_equal(result.as_numpy("labels"), truth[None]) and result.as_numpy("class_shares") is None


def test_errors_carry_status_and_words(triton):
    image = grpcclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([b"not an image"], dtype=object))
    with pytest.raises(InferenceServerException, match="unsupported or unrecognised image format") as caught:
        triton.infer("rgb", [image])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="not loaded"):
        triton.infer("raw", [image])
    with pytest.raises(InferenceServerException, match="no model called 'nope'") as caught:
        triton.get_model_metadata("nope")
    assert caught.value.status() == "StatusCode.NOT_FOUND"


def test_repository_extension(triton):
    index = {m.name: m.state for m in triton.get_model_repository_index(headers=ADMIN).models}
    exercise_repository_extension(triton, index, ADMIN)


def test_typed_contents(protocol_server):
    """Inputs as typed contents rather than raw (what other gRPC clients than Triton's send): encoded images in
    `bytes_contents` as they are, pixels in `uint_contents`."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    photo, truth = quadrants(16, 24)
    tensor = pb.ModelInferRequest.InferInputTensor
    with grpc.insecure_channel(protocol_server.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for given in (tensor(name="image", datatype="BYTES", shape=[1],
                             contents=pb.InferTensorContents(bytes_contents=[png_bytes(photo)])),
                      tensor(name="pixels", datatype="UINT8", shape=[16, 24, 3],
                             contents=pb.InferTensorContents(uint_contents=photo[..., ::-1].ravel().tolist()))):
            response = stub.ModelInfer(pb.ModelInferRequest(model_name="rgb", inputs=[given]))
            labels = response.outputs[0]
            assert (labels.name, labels.datatype, list(labels.shape)) == ("labels", "UINT8", [1, 16, 24])
            assert np.array_equal(np.frombuffer(response.raw_output_contents[0], np.uint8).reshape(16, 24), truth)
