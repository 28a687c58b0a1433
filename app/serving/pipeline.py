"""The segmentation pipeline: decode -> resize -> normalise -> run -> labels at the original size -> render."""

import time
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..engines import SegmentationModel
from .batching import BatchRun, batch_size, infer_with_batch
from .imaging import check_header, colorize, decode_pixels, encode_indexed_png, encode_png, jpeg_complete, overlay

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
    """The model's input tensor: resize in uint8 first (a quarter of the bytes of float), then raw RGB
    pixels NHWC for raw-pixel models, or RGB / 255, normalised, NCHW float32."""
    h, w = size
    if image_bgr.shape[:2] != (h, w):
        image_bgr = cv2.resize(image_bgr, (w, h), interpolation=cv2.INTER_LINEAR)
    if model.uint8_input:
        return cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)[None]  # 0.2 ms vs 17 ms for NumPy's [..., ::-1] copy
    mean, std = model.meta.mean, model.meta.std
    blob = np.empty((1, 3, h, w), np.float32)
    for c in range(3):
        # One pass per plane, written straight into the NCHW tensor: x / (255 std) - mean / std. (addWeighted
        # with a zero second weight is OpenCV's one-call scale-shift-convert; 4x faster than blobFromImage.)
        plane = cv2.extractChannel(image_bgr, 2 - c)  # RGB plane c is BGR channel 2 - c
        cv2.addWeighted(plane, 1.0 / (255.0 * std[c]), plane, 0.0, -mean[c] / std[c], dst=blob[0, c], dtype=cv2.CV_32F)
    return blob


def restore_size(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Labels back to the original image size (nearest neighbour: class ids must not be blended)."""
    if labels.shape == (height, width):
        return labels
    return cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST)


@dataclass
class Segmentation:
    """One request's result: the photo (None when it was decoded on the GPU), its labels, and milliseconds
    spent per stage."""

    image: np.ndarray | None
    labels: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    # (stage, start, end) in epoch nanoseconds, for traces: the timings' stages, with a dynamic batch's queue wait
    # apart from its inference; and the batch the image ran in.
    spans: list[tuple[str, int, int]] = field(default_factory=list)
    batch_size: int = 1

    def class_shares(self, model: SegmentationModel) -> list[dict]:
        """The classes present, largest first: id, name, colour (hex), pixel count and percentage. Ids past the
        model's classes are named "unknown (id N)", in the palette's unknown colour."""
        counts = np.bincount(self.labels.ravel(), minlength=model.num_classes)
        total = int(counts.sum())
        names, palette = model.class_names, model.palette

        def name(i: int) -> str:
            return names[i] if i < len(names) else f"unknown (id {i})"

        return [{"id": i, "name": name(i), "color": "#{:02x}{:02x}{:02x}".format(*palette[min(i, len(palette) - 1)]),
                 "pixels": int(n), "percent": 100.0 * int(n) / total}
                for i, n in sorted(enumerate(counts), key=lambda kv: -kv[1]) if n]


def epoch_ns(perf_ns: int) -> int:
    """A ``perf_counter_ns`` reading on the wall clock (trace timestamps are epoch nanoseconds)."""
    return perf_ns + _EPOCH_OFFSET


_EPOCH_OFFSET = time.time_ns() - time.perf_counter_ns()


class Stopwatch:
    """Collects per-stage durations in milliseconds, and each stage's span on the wall clock."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self.spans: list[tuple[str, int, int]] = []
        self._t = time.perf_counter_ns()

    def lap(self, stage: str) -> None:
        now = time.perf_counter_ns()
        self.timings[stage] = round((now - self._t) / 1e6, 3)
        self.spans.append((stage, epoch_ns(self._t), epoch_ns(now)))
        self._t = now


def segment_bytes(model: SegmentationModel, data: bytes, max_pixels: int, max_side: int,
                  min_side: int = 1, gpu_decode: bool = False,
                  header: tuple[int, int, str] | None = None) -> Segmentation:
    """Decode and segment one upload; raises ``ImageError`` for unusable input.

    With ``gpu_decode`` (for a served model that decodes on the GPU), a JPEG at the model's own size goes straight
    from nvImageCodec into the model; the result then has no photo. Anything else, or a JPEG that nvImageCodec
    declines or that does not end as a JPEG must (cut short, or with bytes after it), is decoded on the CPU, which
    explains damage. ``header``: what :func:`check_header` found, when the caller has already checked it."""
    watch = Stopwatch()
    width, height, fmt = header or check_header(data, max_pixels, min_side)
    if gpu_decode and fmt == "jpeg" and (height, width) == model.input_hw and jpeg_complete(data):
        labels, batch = infer_with_batch(model.infer_jpeg, data)
        if labels is not None:  # decoded and segmented on the GPU: one stage, "inference"
            watch.lap("inference")
            return Segmentation(image=None, labels=labels[0], timings=watch.timings, spans=batch_spans(watch, batch),
                                batch_size=batch_size(batch))
    image = decode_pixels(data, fmt)
    watch.lap("decode")
    seg = segment_image(model, image, max_side)
    seg.timings = {**watch.timings, **seg.timings}
    seg.spans = watch.spans + seg.spans
    return seg


def segment_image(model: SegmentationModel, image: np.ndarray, max_side: int = 2048) -> Segmentation:
    """Segment a decoded BGR image; labels come back at the image's own size."""
    watch = Stopwatch()
    height, width = image.shape[:2]
    tensor = preprocess(image, model, input_size(model, height, width, max_side))
    watch.lap("preprocess")
    labels, batch = infer_with_batch(model.infer, tensor)
    labels = labels[0]
    watch.lap("inference")
    batch_spans(watch, batch)
    labels = restore_size(labels, height, width)
    watch.lap("postprocess")
    return Segmentation(image=image, labels=labels, timings=watch.timings, spans=watch.spans,
                        batch_size=batch_size(batch))


def batch_spans(watch: Stopwatch, batch: BatchRun | None) -> list:
    """The stopwatch's spans, its last (``inference``) split in two when a batcher ran it: the wait for company
    and the batch's run (the trace's ``queue`` and ``inference`` stages)."""
    if batch is not None:
        _, start, end = watch.spans.pop()
        watch.spans += [("queue", start, epoch_ns(batch.started_ns)), ("inference", epoch_ns(batch.started_ns), end)]
    return watch.spans


def view_image(seg: Segmentation, model: SegmentationModel, view: str, alpha: float = 0.5) -> np.ndarray:
    """A view as an image: the colour mask (BGR), the overlay on the photo, or the class ids (1 channel)."""
    if view == "labels":
        return seg.labels.astype(np.uint8 if model.num_classes <= 256 else np.uint16, copy=False)
    mask = colorize(seg.labels, model.palette_bgr)
    return overlay(seg.image, mask, alpha) if view == "overlay" else mask


def render(seg: Segmentation, model: SegmentationModel, view: str, alpha: float, compression: int) -> bytes:
    """PNG bytes of a view, its time added to ``seg.timings["encode"]``. Mask and labels are written as indexed /
    grey PNGs straight from the class ids."""
    start = time.perf_counter_ns()
    labels = seg.labels if model.num_classes <= 256 else seg.labels.astype(np.uint16)
    if view == "mask" and labels.dtype == np.uint8:
        png = encode_indexed_png(labels, model.palette, compression)
    elif view == "labels":
        png = encode_indexed_png(labels, None, compression)
    else:
        png = encode_png(view_image(seg, model, view, alpha), compression)
    end = time.perf_counter_ns()
    seg.timings["encode"] = round(seg.timings.get("encode", 0.0) + (end - start) / 1e6, 3)
    seg.spans.append(("encode", epoch_ns(start), epoch_ns(end)))
    return png
