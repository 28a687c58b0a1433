"""mIoU of a served model through the service's own pipeline (``segment eval``)."""

from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ..core.iou import confusion, report
from ..engines import SegmentationModel
from .pipeline import segment_image


def evaluate(model: SegmentationModel, data: Path, split: str = "val", ignore: int = 255,
             void_id: int | None = None) -> dict:
    """Segment every ``images/SPLIT/*.jpg|png`` and score against ``labels/SPLIT/STEM.png``.

    ``void_id`` (e.g. 11 for CamVid) and ``ignore`` label values are left out of the metrics.
    """
    images = sorted(p for p in (data / "images" / split).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not images:
        raise FileNotFoundError(f"no images in {data / 'images' / split}")
    n = model.num_classes
    conf = np.zeros((n, n), np.int64)
    for path in tqdm(images, desc=f"eval {split}", unit="img"):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        truth = cv2.imread(str(data / "labels" / split / f"{path.stem}.png"), cv2.IMREAD_UNCHANGED)
        if void_id is not None:
            truth = np.where(truth == void_id, ignore, truth)
        conf += confusion(truth, segment_image(model, image).labels, n, ignore=ignore)
    return {"model": model.name, "images": len(images), "split": split,
            **report(conf, model.meta.class_names[:n])}
