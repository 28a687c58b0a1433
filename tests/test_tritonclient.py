"""Triton's own HTTP client (tritonclient[http]), unchanged, against the real server on loopback: what a Triton or
KServe user runs works here."""

from contextlib import closing

import numpy as np
import pytest

from .models import png_bytes, quadrants
from .server import TOKEN

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the dev extra")
from tritonclient.utils import InferenceServerException  # noqa: E402

ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def triton(protocol_server):
    with closing(httpclient.InferenceServerClient(url=protocol_server.url.removeprefix("http://"))) as client:
        yield client


def test_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.get_server_metadata()["name"] == "bisenet-serve"
    meta = triton.get_model_metadata("rgb")
    assert [i["name"] for i in meta["inputs"]] == ["image", "pixels"]
    assert meta["outputs"][0] == {"name": "labels", "datatype": "UINT8", "shape": [-1, -1, -1]}
    assert triton.is_model_ready("rgb") and not triton.is_model_ready("raw")


def test_infer_encoded_images_as_binary_bytes(triton):
    photo, truth = quadrants(48, 64)
    image = httpclient.InferInput("image", [2], "BYTES")
    image.set_data_from_numpy(np.array([png_bytes(photo), png_bytes(photo)], dtype=object), binary_data=True)
    result = triton.infer("rgb", [image], outputs=[httpclient.InferRequestedOutput("labels", binary_data=True),
                                                   httpclient.InferRequestedOutput("class_shares", binary_data=False)],
                          request_id="r1")
    labels = result.as_numpy("labels")
    assert labels.dtype == np.uint8 and labels.shape == (2, 48, 64)
    assert np.array_equal(labels, np.stack([truth, truth]))
    assert np.allclose(result.as_numpy("class_shares")[1], np.bincount(truth.ravel(), minlength=3) / truth.size)
    assert result.get_response()["id"] == "r1"


@pytest.mark.parametrize("binary", [True, False])
def test_infer_pixels(triton, binary):
    photo, truth = quadrants(32, 48)
    pixels = httpclient.InferInput("pixels", [32, 48, 3], "UINT8")
    pixels.set_data_from_numpy(np.ascontiguousarray(photo[..., ::-1]), binary_data=binary)
    result = triton.infer("rgb", [pixels])  # no outputs named: all of them, as binary data
    assert np.array_equal(result.as_numpy("labels"), truth[None])
    assert result.as_numpy("class_shares").shape == (1, 3)


def test_errors_reach_the_client_in_words(triton):
    image = httpclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([b"not an image"], dtype=object))
    with pytest.raises(InferenceServerException, match="unsupported or unrecognised image format"):
        triton.infer("rgb", [image])
    with pytest.raises(InferenceServerException, match="'raw' is not loaded"):
        triton.infer("raw", [image])


def test_repository_extension(triton):
    index = {m["name"]: m["state"] for m in triton.get_model_repository_index(headers=ADMIN)}
    exercise_repository_extension(triton, index, ADMIN)


def exercise_repository_extension(triton, index: dict, admin: dict) -> None:
    """Index, load refused without the token, load beside the default, unload of the default refused, unload;
    only ``rgb`` loaded again at the end. For Triton's HTTP and gRPC clients alike."""
    assert index == {"raw": "UNAVAILABLE", "rgb": "READY"}
    with pytest.raises(InferenceServerException, match="admin token"):
        triton.load_model("raw")
    try:
        triton.load_model("raw", headers=admin)
        assert triton.is_model_ready("raw") and triton.is_model_ready("rgb")
        with pytest.raises(InferenceServerException, match="default"):
            triton.unload_model("rgb", headers=admin)
    finally:
        triton.unload_model("raw", headers=admin)
    assert not triton.is_model_ready("raw") and triton.is_model_ready("rgb")
