"""A model repository at an fsspec URI (memory://, file://) served through a hash-checked local cache, and the
choice among TensorRT engines built for several GPU kinds (a pure function of metadata and the node, run on CPU)."""

import base64
import json
import os
import subprocess
import sys
import uuid

import fsspec
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.errors import IncompatibleEngine
from app.core.metadata import load_meta, sha256_file
from app.engines.tensorrt import choose_engine
from app.main import create_app
from app.repository import ModelRepository

from .models import ROOT, decode_png, png_bytes, quadrants, rgb_model


def publish(folder, uri: str) -> None:
    """Copy a local repository folder to ``uri``, as an operator would with the object store's tools."""
    fs, base = fsspec.core.url_to_fs(uri)
    for path in folder.iterdir():
        fs.put_file(str(path), f"{base}/{path.name}")


@pytest.fixture
def source(tmp_path):
    """A local folder with the RGB model, its sha256 recorded in its metadata (``segment engines --stamp-sha256``)."""
    folder = tmp_path / "source"
    rgb_model(folder / "rgb.onnx", height="H", width="W")
    assert ModelRepository(folder).stamp_sha256() == ["rgb.onnx"]
    return folder


@pytest.fixture
def uri(source):
    uri = f"memory://repo-{uuid.uuid4().hex}"
    publish(source, uri)
    yield uri
    fs, base = fsspec.core.url_to_fs(uri)
    fs.rm(base, recursive=True)


def client(tmp_path, uri: str, model: str = "rgb") -> TestClient:
    return TestClient(create_app(Settings(engines_dir=uri, model=model, control_db=tmp_path / "control.db",
                                          model_cache_dir=tmp_path / "cache", results_dir=tmp_path / "results")))


def segments_right(c: TestClient) -> bool:
    photo, truth = quadrants(64, 96)
    r = c.post("/segment/json", files={"image": ("p.png", png_bytes(photo), "image/png")})
    assert r.status_code == 200, r.text
    return np.array_equal(decode_png(base64.b64decode(r.json()["labels_png"])), truth)


def cached(tmp_path, file: str):
    return [p for p in (tmp_path / "cache").glob(f"*/{file}")]


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_a_uri_repository_serves_through_a_checked_cache(tmp_path, source, scheme):
    if scheme == "memory":
        uri = f"memory://repo-{uuid.uuid4().hex}"
    else:
        (tmp_path / "bucket").mkdir()
        uri = (tmp_path / "bucket").as_uri()
    publish(source, uri)
    with client(tmp_path, uri) as c:
        assert c.get("/readyz").status_code == 200
        assert segments_right(c)
        [entry] = c.get("/models").json()["models"]
        assert (entry["name"], entry["state"]) == ("rgb", "loaded")
    [copy] = cached(tmp_path, "rgb.onnx")
    assert sha256_file(copy) == sha256_file(source / "rgb.onnx")
    assert not list(copy.parent.glob(".upload.*"))  # no temporary file left behind


def test_the_repository_is_read_only_through_the_api(tmp_path, source, uri):
    rgb_model(source / "other.onnx", height="H", width="W")
    ModelRepository(source).stamp_sha256()
    publish(source, uri)
    app = create_app(Settings(engines_dir=uri, model="rgb", control_db=tmp_path / "control.db", admin_token="t",
                              model_cache_dir=tmp_path / "cache", results_dir=tmp_path / "results"))
    with TestClient(app) as c:
        assert c.delete("/engines/missing", headers={"Authorization": "Bearer t"}).status_code == 404
        assert c.post("/models/other/load", headers={"Authorization": "Bearer t"}).status_code == 200
        r = c.delete("/engines/other", headers={"Authorization": "Bearer t"})
        assert r.status_code == 409 and "read-only" in r.json()["detail"], r.text
        other = next(m for m in c.get("/models").json()["models"] if m["name"] == "other")
        assert (other["wanted"], other["state"]) == (True, "loaded")  # refused before anything was unloaded
        onnx = (tmp_path / "source" / "rgb.onnx").read_bytes()
        r = c.post("/engines", headers={"Authorization": "Bearer t"}, data={"name": "new", "target": "onnxruntime"},
                   files={"onnx": ("new.onnx", onnx, "application/octet-stream")})
        assert r.status_code == 409 and "read-only" in r.json()["detail"], r.text


def test_a_corrupted_cache_file_is_fetched_again(tmp_path, source, uri):
    with client(tmp_path, uri) as c:
        assert segments_right(c)
    [copy] = cached(tmp_path, "rgb.onnx")
    copy.write_bytes(b"not the model any more")
    with client(tmp_path, uri) as c:
        assert c.get("/readyz").status_code == 200
        assert segments_right(c)
    assert sha256_file(copy) == sha256_file(source / "rgb.onnx")


def test_a_remote_file_that_does_not_match_its_hash_is_refused(tmp_path, source, uri):
    fs, base = fsspec.core.url_to_fs(uri)
    rgb_model(tmp_path / "other.onnx", height="H", width="W", conv=True)  # a valid model, but not the one hashed
    fs.put_file(str(tmp_path / "other.onnx"), f"{base}/rgb.onnx")
    with client(tmp_path, uri) as c:
        [entry] = c.get("/models").json()["models"]
        assert entry["state"] == "failed"
        assert "rgb.onnx does not match the sha256 its metadata records" in entry["reason"]
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "does not match the sha256" in ready.text
        photo, _ = quadrants(64, 96)
        assert c.post("/segment", files={"image": ("p.png", png_bytes(photo), "image/png")}).status_code == 503
    assert cached(tmp_path, "rgb.onnx") == []  # never in the cache under its name
    assert [p.name for p in (tmp_path / "cache").glob("*/.*") if not p.name.endswith(".json")] == []


def test_a_remote_model_without_a_recorded_hash_is_refused(tmp_path, uri):
    fs, base = fsspec.core.url_to_fs(uri)
    meta = json.loads(fs.cat_file(f"{base}/rgb.json"))
    del meta["sha256"]
    fs.pipe_file(f"{base}/rgb.json", json.dumps(meta).encode())
    with client(tmp_path, uri) as c:
        [entry] = c.get("/models").json()["models"]
        assert entry["state"] == "failed" and "has no sha256 in its metadata" in entry["reason"]


def run_cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **env})


def test_a_uri_the_service_cannot_use_is_a_clear_startup_error(tmp_path):
    r = run_cli("serve", SEGMENT_ENGINES_DIR="ftpx://bucket/models", SEGMENT_CONTROL_DB=str(tmp_path / "c.db"))
    assert r.returncode == 2
    assert "unknown URI scheme 'ftpx'" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("serve", SEGMENT_ENGINES_DIR="memory://models")
    assert r.returncode == 2 and "set SEGMENT_CONTROL_DB" in r.stderr and "Traceback" not in r.stderr


# ---- TensorRT engines for several GPU kinds ----------------------------------------------------------------------

H100 = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt_version": "10.3.0"}
H200 = {"gpu": "NVIDIA H200", "compute_capability": "9.0", "tensorrt_version": "10.3.0"}
A10G = {"gpu": "NVIDIA A10G", "compute_capability": "8.6", "tensorrt_version": "10.3.0"}


def engine(folder, file: str, gpu: dict) -> None:
    """An engine file (its bytes are never run here) with the build metadata a build on ``gpu`` writes."""
    folder.mkdir(exist_ok=True)
    (folder / file).write_bytes(os.urandom(256))
    meta = {"dataset": "camvid", "precision": "fp16", "input_size": [64, 96],
            "build": {"target": "tensorrt", "source": "seg.onnx", **gpu}}
    (folder / file).with_suffix(".json").write_text(json.dumps(meta))


@pytest.fixture
def engines(tmp_path):
    folder = tmp_path / "engines"
    engine(folder, "seg.nvidia-h100.sm90.trt10-3.engine", H100)
    engine(folder, "seg.nvidia-h200.sm90.trt10-3.engine", H200)
    engine(folder, "seg.nvidia-a10g.sm86.trt10-3.engine", A10G)
    return folder


def builds(folder) -> dict[str, dict]:
    return {p.name: load_meta(p).build.model_dump() for p in sorted(folder.glob("*.engine"))}


def test_the_engine_built_for_the_node_is_chosen(engines):
    found = builds(engines)
    assert choose_engine(found, H100) == "seg.nvidia-h100.sm90.trt10-3.engine"
    assert choose_engine(found, H200) == "seg.nvidia-h200.sm90.trt10-3.engine"  # same sm90: its own model first
    assert choose_engine(found, A10G) == "seg.nvidia-a10g.sm86.trt10-3.engine"
    # another H100 variant (PCIe): the same compute capability and TensorRT run an sm90 engine
    assert choose_engine(found, {**H100, "gpu": "NVIDIA H100 PCIe"}).endswith(".sm90.trt10-3.engine")
    # a patch release of TensorRT runs it too; another minor does not
    assert choose_engine(found, {**A10G, "tensorrt_version": "10.3.1"}) == "seg.nvidia-a10g.sm86.trt10-3.engine"


@pytest.mark.parametrize("node, says", [
    ({"gpu": "NVIDIA L4", "compute_capability": "8.9", "tensorrt_version": "10.3.0"},
     "this node has NVIDIA L4 (sm89, TensorRT 10.3.0)"),
    ({**H100, "tensorrt_version": "10.7.0"}, "this node has NVIDIA H100 80GB HBM3 (sm90, TensorRT 10.7.0)"),
    ({}, "this node has no GPU (no compute capability, no TensorRT)"),
])
def test_no_engine_for_the_node_is_refused_saying_why(engines, node, says):
    with pytest.raises(IncompatibleEngine) as refused:
        choose_engine(builds(engines), node)
    assert refused.value.status_code == 409
    assert says in refused.value.detail
    assert "seg.nvidia-h100.sm90.trt10-3.engine built for NVIDIA H100 80GB HBM3 (sm90, TensorRT 10.3.0)" in \
        refused.value.detail
    if node:
        assert "seg." + {"8.9": "nvidia-l4.sm89.trt10-3", "9.0": "nvidia-h100-80gb-hbm3.sm90.trt10-7"}[
            node["compute_capability"]] + ".engine" in refused.value.detail


def test_models_lists_one_entry_with_its_engines_and_refuses_to_load_here(engines):
    rgb_model(engines / "rgb.onnx", height="H", width="W")
    app = create_app(Settings(engines_dir=engines, model="rgb", admin_token="t",
                              results_dir=engines.parent / "results"))
    with TestClient(app) as c:
        models = {m["name"]: m for m in c.get("/models").json()["models"]}
        assert sorted(models) == ["rgb", "seg"]
        seg = models["seg"]
        assert seg["kind"] == "tensorrt engine" and "engines" not in models["rgb"]
        assert [e["built_for"] for e in seg["engines"]] == [
            "NVIDIA A10G (sm86, TensorRT 10.3.0)", "NVIDIA H100 80GB HBM3 (sm90, TensorRT 10.3.0)",
            "NVIDIA H200 (sm90, TensorRT 10.3.0)"]
        # this CPU node has no GPU and no TensorRT: refused with the reason, nothing loaded
        r = c.post("/models/seg/load", headers={"Authorization": "Bearer t"})
        assert r.status_code == 409 and "no engine of 'seg' runs here" in r.json()["detail"], r.text
        assert c.get("/engines/seg").json()["name"] == "seg"
        # deleting the model removes every engine and its metadata
        r = c.delete("/engines/seg", headers={"Authorization": "Bearer t"})
        assert r.status_code == 200 and len(r.json()["files"]) == 3, r.text  # the answer names each file removed
    assert sorted(p.name for p in engines.iterdir() if p.name.startswith("seg")) == []


def test_a_model_replaced_in_the_store_is_fetched_with_its_new_hash(tmp_path, source, uri):
    """The model file and its metadata replaced together within the listing's few seconds: the fetch sees the new
    file with the old hash, reads the metadata again, and serves the new model instead of refusing it."""
    from app.repository.remote import repository_at

    repository = repository_at(uri, tmp_path / "cache")
    first = repository.local_path("rgb")
    assert first.read_bytes() == (source / "rgb.onnx").read_bytes()
    newer = tmp_path / "newer"
    rgb_model(newer / "rgb.onnx", height="H", width="W", conv=True)
    ModelRepository(newer).stamp_sha256()
    assert (newer / "rgb.onnx").read_bytes() != (source / "rgb.onnx").read_bytes()
    publish(newer, uri)
    (tmp_path / "cache").joinpath(first.parent.name, "rgb.onnx").unlink()  # the next load fetches
    fetched = repository.local_path("rgb")
    assert fetched.read_bytes() == (newer / "rgb.onnx").read_bytes()
    assert load_meta(fetched).sha256 == sha256_file(newer / "rgb.onnx")


def test_an_engine_beside_its_onnx_keeps_its_own_metadata(tmp_path):
    """`segment compile m.onnx m.trt` (the seed's form): the engine's metadata goes to m.trt.json and the ONNX's m.json
    stays its own; one model lists both, in a folder and through an object store."""
    from app.core.metadata import ModelMeta, save_meta
    from app.repository.remote import repository_at

    folder = tmp_path / "engines"
    rgb_model(folder / "m.onnx", height="H", width="W")
    onnx_meta = (folder / "m.json").read_text()
    (folder / "m.trt").write_bytes(os.urandom(256))
    save_meta(folder / "m.trt", ModelMeta.model_validate(
        {"dataset": "camvid", "precision": "fp16", "input_size": [64, 96],
         "build": {"target": "tensorrt", "source": "m.onnx", **H100}}))
    assert (folder / "m.json").read_text() == onnx_meta and (folder / "m.trt.json").is_file()
    assert load_meta(folder / "m.onnx").precision == "fp32" and load_meta(folder / "m.trt").precision == "fp16"
    (entry,) = ModelRepository(folder).list()
    assert entry["file"] == "m.onnx" and [e["file"] for e in entry["engines"]] == ["m.trt"]
    assert entry["engines"][0]["built_for"] == "NVIDIA H100 80GB HBM3 (sm90, TensorRT 10.3.0)"
    uri = f"memory://repo-{uuid.uuid4().hex}"
    publish(folder, uri)
    remote = repository_at(uri, tmp_path / "cache")
    (entry,) = remote.list()
    assert entry["precision"] == "fp32" and entry["engines"][0]["built_for"].startswith("NVIDIA H100")
    assert load_meta(remote.root / "m.trt").precision == "fp16"
