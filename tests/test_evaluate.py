"""`segment eval`: metrics, confusion matrix (text and image), and the flip / multi-scale options."""

import json
import shutil

import cv2
import numpy as np
import pytest

from app.cli import main
from app.core.config import DEFAULT_MODEL
from app.engines import load_model
from app.serving.evaluate import LogitsSession, augmented_labels, evaluate
from app.serving.pipeline import segment_image

from .models import BUNDLED, SHARED

CAMVID = SHARED / "datasets" / "camvid"
pytestmark = pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/datasets/camvid is not beside the checkout")


@pytest.fixture(scope="module")
def two_val_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("camvid2")
    for kind, suffix in (("images", ".jpg"), ("labels", ".png")):
        (root / kind / "val").mkdir(parents=True)
    for image in sorted((CAMVID / "images" / "val").glob("*.jpg"))[:2]:
        shutil.copy(image, root / "images" / "val")
        shutil.copy(CAMVID / "labels" / "val" / f"{image.stem}.png", root / "labels" / "val")
    return root


@pytest.fixture(scope="module")
def model():
    m = load_model(BUNDLED / f"{DEFAULT_MODEL}.onnx")
    yield m
    m.close()


def test_confusion_matrix_counts_every_scored_pixel(model, two_val_images):
    result = evaluate(model, two_val_images, void_id=11)
    conf = np.array(result["confusion"])
    labels = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted((two_val_images / "labels" / "val").iterdir())]
    assert conf.shape == (11, 11) and conf.sum() == sum(int((lab < 11).sum()) for lab in labels)
    assert result["pixel_accuracy"] == pytest.approx(np.trace(conf) / conf.sum())
    assert result["pipeline"] == "service pipeline"


def test_logits_argmax_at_one_scale_is_the_served_labels(model, two_val_images):
    """The augmentation path reads logits from the same graph: with no flip and scale 1, it is the service."""
    image = cv2.imread(str(sorted((two_val_images / "images" / "val").iterdir())[0]))
    served = segment_image(model, image).labels
    same = augmented_labels(LogitsSession(model), image, (1.0,), flip=False)
    # Bilinear resizing of probabilities vs nearest resizing of labels differs on class borders only.
    assert same.shape == served.shape and (same == served).mean() > 0.97


def test_flip_and_scales_are_reported_separately(model, two_val_images):
    plain = evaluate(model, two_val_images, void_id=11)
    tta = evaluate(model, two_val_images, void_id=11, flip=True, scales=(0.75, 1.0, 1.25))
    assert tta["pipeline"] == "test-time augmentation: scales [0.75, 1.0, 1.25], flip True"
    assert np.array(tta["confusion"]).sum() == np.array(plain["confusion"]).sum()
    assert tta["confusion"] != plain["confusion"] and tta["miou"] > 0.5


def test_cli_prints_and_saves_the_confusion_matrix(two_val_images, tmp_path, capsys):
    out_png, out_json = tmp_path / "cm.png", tmp_path / "r.json"
    assert main(["eval", str(BUNDLED / f"{DEFAULT_MODEL}.onnx"), "--data", str(two_val_images), "--void-id", "11",
                 "--confusion", str(out_png), "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "confusion matrix, % of each true class" in text and "pixel accuracy" in text
    image = cv2.imread(str(out_png))
    assert image is not None and image.shape[0] == image.shape[1] > 11 * 40
    assert json.loads(out_json.read_text())["per_class_iou"].keys() >= {"pole", "sign"}


def test_cli_refuses_bad_scales(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "m.onnx", "--data", ".", "--scales", "0.75,x"])
    assert "expected scales like 0.75,1,1.25" in capsys.readouterr().err


def test_eval_over_http_scores_the_served_default_as_the_model_file_does(tmp_path, two_val_images, capsys):
    """`segment eval URL`: each image goes through a running service's POST /segment?view=labels (how a held-out
    split is checked); on the same images it gives the confusion matrix of the model file, pixel for pixel."""
    from .server import Server

    engines = tmp_path / "engines"
    engines.mkdir()
    for suffix in (".onnx", ".json"):
        shutil.copy(BUNDLED / f"{DEFAULT_MODEL}{suffix}", engines)
    with_file = tmp_path / "file.json"
    over_http = tmp_path / "http.json"
    assert main(["eval", str(engines / f"{DEFAULT_MODEL}.onnx"), "--data", str(two_val_images), "--void-id", "11",
                 "--json", str(with_file)]) == 0
    server = Server(engines, model=DEFAULT_MODEL)
    try:
        assert main(["eval", server.url, "--data", str(two_val_images), "--void-id", "11",
                     "--json", str(over_http)]) == 0
        with pytest.raises(SystemExit) as refused:
            main(["eval", server.url, "--data", str(two_val_images), "--flip"])
        assert refused.value.code == 2
    finally:
        server.stop()
    local, remote = json.loads(with_file.read_text()), json.loads(over_http.read_text())
    assert remote["confusion"] == local["confusion"] and remote["model"] == DEFAULT_MODEL
    assert remote["pipeline"].startswith("service over HTTP") and remote["images"] == 2
    assert "test-time augmentation" in capsys.readouterr().err
