"""Confusion-matrix segmentation metrics (NumPy only, shared by training and the service's evaluation)."""

import numpy as np


def confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int, ignore: int | None = None) -> np.ndarray:
    """``num_classes`` x ``num_classes`` counts (rows: truth, columns: prediction); ``ignore`` pixels skipped."""
    labels = labels.reshape(-1).astype(np.int64)
    preds = preds.reshape(-1).astype(np.int64)
    if preds.size and (preds.min() < 0 or preds.max() >= num_classes):
        # an id beyond the table would land in the next row's counts: a wrong score, silently
        bad = int(preds.max() if preds.max() >= num_classes else preds.min())
        raise ValueError(f"a prediction has class id {bad}, outside the {num_classes} classes scored")
    keep = (labels >= 0) & (labels < num_classes)
    if ignore is not None:
        keep &= labels != ignore
    idx = labels[keep] * num_classes + preds[keep]
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """Intersection over union per class; NaN for a class absent from truth and prediction."""
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / union


def report(conf: np.ndarray, class_names: list[str]) -> dict:
    """mIoU, pixel accuracy and per-class IoU as a JSON-ready dict."""
    ious = iou_per_class(conf)
    return {
        "miou": float(np.nanmean(ious)),
        "pixel_accuracy": float(np.diag(conf).sum() / max(conf.sum(), 1)),
        "per_class_iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(class_names, ious)},
    }
