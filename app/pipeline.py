"""The segmentation pipeline: decode -> resize -> normalise -> run -> labels at the original size -> render."""

import time
from dataclasses import dataclass, field

import cv2
import numpy as np

from .imaging import colorize, decode, encode_indexed_png, encode_png, overlay
from .runner import SegmentationModel

VIEWS = ("mask", "overlay", "labels")


def input_size(model: SegmentationModel, height: int, width: int, max_side: int) -> tuple[int, int]:
    """(H, W) to feed: the model's fixed size, or for dynamic H/W the image rounded to multiples of 32."""
    fixed_h, fixed_w = model.input_hw
    if fixed_h and fixed_w:
        return fixed_h, fixed_w
    scale = min(1.0, max_side / max(height, width))
    h = fixed_h or max(32, int(round(height * scale / 32)) * 32)
    w = fixed_w or max(32, int(round(width * scale / 32)) * 32)
    return h, w


def preprocess(image_bgr: np.ndarray, model: SegmentationModel, size: tuple[int, int]) -> np.ndarray:
    """The model's input tensor: resize in uint8 first, then (float models) RGB, scale, normalise, NCHW."""
    h, w = size
    if model.uint8_input:
        resized = image_bgr if image_bgr.shape[:2] == (h, w) else cv2.resize(image_bgr, (w, h), interpolation=cv2.INTER_LINEAR)
        return np.ascontiguousarray(resized[None, :, :, ::-1])
    return normalized_blob(image_bgr, model.meta.mean, model.meta.std, size)


def normalized_blob(image_bgr: np.ndarray, mean, std, size: tuple[int, int]) -> np.ndarray:
    """[1,3,H,W] float32 of (RGB/255 - mean) / std at ``size``: the pre-processing of float-input models."""
    h, w = size
    mean255, std255 = np.asarray(mean) * 255.0, np.asarray(std) * 255.0
    # One OpenCV call does resize, BGR->RGB, (x - mean) / std and the NCHW layout.
    params = cv2.dnn.Image2BlobParams(scalefactor=tuple(1.0 / std255), size=(w, h), mean=tuple(mean255),
                                      swapRB=True, ddepth=cv2.CV_32F)
    return cv2.dnn.blobFromImageWithParams(image_bgr, params)


def restore_size(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Labels back to the original image size (nearest neighbour: class ids must not be blended)."""
    if labels.shape == (height, width):
        return labels
    return cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST)


@dataclass
class Segmentation:
    """One request's result: the photo, its labels, and milliseconds spent per stage."""

    image: np.ndarray
    labels: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


class Stopwatch:
    """Collects per-stage durations in milliseconds."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round((now - self._t) * 1000.0, 3)
        self._t = now


def segment_bytes(model: SegmentationModel, data: bytes, max_pixels: int, max_side: int,
                  min_side: int = 1) -> Segmentation:
    """Decode and segment one upload; raises ``ImageError`` for unusable input."""
    watch = Stopwatch()
    image = decode(data, max_pixels, min_side)
    watch.lap("decode")
    seg = segment_image(model, image, max_side)
    seg.timings = {**watch.timings, **seg.timings}
    return seg


def segment_image(model: SegmentationModel, image: np.ndarray, max_side: int = 2048) -> Segmentation:
    """Segment a decoded BGR image; labels come back at the image's own size."""
    watch = Stopwatch()
    height, width = image.shape[:2]
    tensor = preprocess(image, model, input_size(model, height, width, max_side))
    watch.lap("preprocess")
    labels = model.infer(tensor)[0]
    watch.lap("inference")
    labels = restore_size(labels, height, width)
    watch.lap("postprocess")
    return Segmentation(image=image, labels=labels, timings=watch.timings)


def view_image(seg: Segmentation, model: SegmentationModel, view: str, alpha: float = 0.5) -> np.ndarray:
    """A view as an image: the colour mask (BGR), the overlay on the photo, or the class ids (1 channel)."""
    if view == "labels":
        return seg.labels.astype(np.uint8 if model.num_classes <= 256 else np.uint16, copy=False)
    mask = colorize(seg.labels, model.palette_bgr)
    return overlay(seg.image, mask, alpha) if view == "overlay" else mask


def render(seg: Segmentation, model: SegmentationModel, view: str, alpha: float, compression: int) -> bytes:
    """PNG bytes of a view. Mask and labels are written as indexed / grey PNGs straight from the class ids."""
    labels = seg.labels if model.num_classes <= 256 else seg.labels.astype(np.uint16)
    if view == "mask" and labels.dtype == np.uint8:
        return encode_indexed_png(labels, model.palette, compression)
    if view == "labels":
        return encode_indexed_png(labels, None, compression)
    return encode_png(view_image(seg, model, view, alpha), compression)
