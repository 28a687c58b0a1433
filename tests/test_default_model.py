"""The bundled default model: a trained BiSeNetV2 on CamVid, served with no configuration."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from app.core.config import DEFAULT_MODEL, Settings
from app.engines import load_model

from .models import BUNDLED, SAMPLE, SHARED, decode_png, make_client

ENGINES = BUNDLED
CAMVID = SHARED / "datasets" / "camvid"


def test_default_model_ships_and_is_described():
    path = ENGINES / f"{DEFAULT_MODEL}.onnx"
    assert path.is_file() and path.stat().st_size <= 15 * 2**20
    model = load_model(path)
    try:
        assert model.meta.trained and model.meta.dataset == "camvid" and model.num_classes == 11
        assert model.input_hw == (448, 608)
        training = model.meta.extra["training"]
    finally:
        model.close()
    # Trained on train+val; its honest figure is the same recipe's train-only run, with val held out.
    assert training["recipe"]["splits"] == "train,val" and training["from_scratch"]
    assert training["train_only_run"]["val_miou_service_pipeline"] >= 0.70
    assert "train+val" in (ENGINES / f"{DEFAULT_MODEL}.md").read_text()
    assert Settings().engines_dir == Path("engines") and Settings().model == DEFAULT_MODEL


def test_an_empty_repository_is_filled_even_when_the_control_store_came_first(tmp_path):
    """A fresh repository gets the bundled models even if another process of the service opened its control store
    there first (a Ray model replica starting beside the ingress did); one with a model of its own is left alone,
    and so is one seeded before and emptied since (`rm engines/*` keeps hidden files): deleted models stay deleted."""
    from app.core.resources import seed_repository

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".control.db").write_bytes(b"")
    assert seed_repository(fresh)
    assert (fresh / f"{DEFAULT_MODEL}.onnx").read_bytes() == (BUNDLED / f"{DEFAULT_MODEL}.onnx").read_bytes()
    assert not list(fresh.glob("*.seeding"))
    for visible in fresh.glob("[!.]*"):
        visible.unlink()
    assert not seed_repository(fresh) and not list(fresh.glob("*.onnx"))

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.onnx").write_bytes(b"not the bundled model")
    assert not seed_repository(kept) and sorted(p.name for p in kept.iterdir()) == ["mine.onnx"]
    assert not seed_repository("s3://bucket/models")  # an object store is the operator's to fill


def test_bisenetv1_ships_beside_the_default():
    """A BiSeNetV1 trained from scratch, with its card; its honest (train-only) val score is recorded."""
    path = ENGINES / "camvid_bisenetv1.onnx"
    model = load_model(path)
    try:
        meta = model.meta
        assert meta.trained and meta.arch == "bisenetv1" and meta.dataset == "camvid" and model.num_classes == 11
        assert model.input_hw == (448, 608) and model.batch_dynamic and model.output_kind == "labels"
    finally:
        model.close()
    training = meta.extra["training"]
    assert training["from_scratch"] and training["recipe"]["splits"] == "train,val"
    assert meta.extra["evaluation"]["held_out"] is False and training["train_only_run"]["val_miou_pytorch_bf16"]
    assert "from scratch" in (ENGINES / "camvid_bisenetv1.md").read_text()


def test_default_model_segments_a_real_street():
    """On the Cityscapes sample, road, sky, buildings and cars are where a person sees them."""
    with make_client(ENGINES, DEFAULT_MODEL) as c:
        r = c.post("/segment", params={"view": "labels"},
                   files={"image": ("street.png", SAMPLE.read_bytes(), "image/png")})
    assert r.status_code == 200
    labels = decode_png(r.content)
    assert labels.shape == (1024, 2048)
    names = ["sky", "building", "pole", "road", "sidewalk", "tree", "sign", "fence", "car", "pedestrian", "bicyclist"]
    share = {n: float((labels == i).mean()) for i, n in enumerate(names)}
    assert share["road"] > 0.15 and share["building"] > 0.05 and share["car"] > 0.02
    bottom_centre = labels[900:1000, 800:1200]
    assert (bottom_centre == names.index("road")).mean() > 0.8


@pytest.mark.parametrize("source", [DEFAULT_MODEL, "camvid_bisenetv1"])
def test_int8_variant_is_built_from_the_shipped_model(source):
    """The bundled int8 models: Q/DQ graph, built from exactly the shipped fp32 file, parity recorded."""
    import onnx

    from app.core.metadata import load_meta, sha256_file

    path = ENGINES / f"{source}_int8.onnx"
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    meta = load_meta(path)
    build = meta.build.model_dump()
    assert meta.precision == "int8" and build["target"] == "onnxruntime"
    assert build["source_sha256"] == sha256_file(ENGINES / f"{source}.onnx")
    assert build["parity"]["label_agreement"] >= 0.95 and not build["parity"]["flagged"]
    assert meta.extra["evaluation"]["pipeline"].startswith("segment eval: ONNX Runtime CPU int8")


@pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/datasets/camvid is not beside the checkout")
@pytest.mark.parametrize("name", [DEFAULT_MODEL, f"{DEFAULT_MODEL}_int8", "camvid_bisenetv1", "camvid_bisenetv1_int8"])
def test_bundled_model_val_miou_at_least_70_percent(name):
    """Through the service's own pipeline (ONNX Runtime on CPU, the shipped ONNX, the service's pre-processing);
    the score written in each model's metadata is the one measured here."""
    from app.builds.quantize import cpu_has_vnni
    from app.serving.evaluate import evaluate

    model = load_model(ENGINES / f"{name}.onnx")
    try:
        result = evaluate(model, CAMVID, "val", void_id=11)
    finally:
        model.close()
    assert result["images"] == 101
    assert result["miou"] >= 0.70, result
    recorded = model.meta.extra["evaluation"]["miou"]
    built_with_vnni = (model.meta.build.model_extra or {}).get("cpu_vnni") if model.meta.build else None
    if built_with_vnni is not None and built_with_vnni != cpu_has_vnni():
        # ONNX Runtime runs other int8 kernels on a CPU with(out) VNNI than the one the score was recorded on
        # (measured: 71.44% here without VNNI, 71.18% recorded with it): the same model, within a point.
        assert abs(result["miou"] - recorded) <= 0.01, (result["miou"], recorded)
    else:
        assert round(result["miou"], 4) == recorded
