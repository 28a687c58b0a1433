"""mIoU of a served model through the service's own pipeline (``segment eval``).

The default is exactly what the service does to an upload. ``flip`` and ``scales`` add test-time augmentation
(for reports only; the service never uses it): the model's ONNX graph is run with the logits before its ArgMax
exposed, and class probabilities are averaged over the mirrored and re-scaled inputs.
"""

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ..core.iou import confusion, report
from ..engines import SegmentationModel
from .pipeline import preprocess, segment_image


def split_images(data: Path, split: str) -> list[Path]:
    """The ``images/SPLIT/*.jpg|png`` of a data set, sorted; :class:`FileNotFoundError` when there are none."""
    folder = data / "images" / split
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")) \
        if folder.is_dir() else []
    if not images:
        raise FileNotFoundError(f"no images in {folder}")
    return images


def score(predict: Callable[[Path], np.ndarray], data: Path, split: str, class_names: list[str], ignore: int = 255,
          void_id: int | None = None) -> dict:
    """Confusion matrix, mIoU, pixel accuracy and per-class IoU of ``predict`` (an image file to its class ids at the
    image's size) over ``images/SPLIT`` against ``labels/SPLIT/STEM.png``. ``void_id`` (e.g. 11 for CamVid) and
    ``ignore`` label values are left out of the metrics."""
    n = len(class_names)
    conf = np.zeros((n, n), np.int64)
    images = split_images(data, split)
    for path in tqdm(images, desc=f"eval {split}", unit="img"):
        truth = cv2.imread(str(data / "labels" / split / f"{path.stem}.png"), cv2.IMREAD_UNCHANGED)
        if void_id is not None:
            truth = np.where(truth == void_id, ignore, truth)
        conf += confusion(truth, predict(path), n, ignore=ignore)
    return {"images": len(images), "split": split, **report(conf, class_names), "confusion": conf.tolist()}


def evaluate(model: SegmentationModel, data: Path, split: str = "val", ignore: int = 255,
             void_id: int | None = None, flip: bool = False, scales: tuple[float, ...] = (1.0,)) -> dict:
    """:func:`score` of a loaded model, each image segmented exactly as the service does an upload (or with
    test-time augmentation: ``flip``, ``scales``)."""
    tta = flip or tuple(scales) != (1.0,)
    logits = LogitsSession(model) if tta else None

    def predict(path: Path) -> np.ndarray:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        return augmented_labels(logits, image, scales, flip) if tta else segment_image(model, image).labels

    pipeline = "service pipeline" if not tta else f"test-time augmentation: scales {list(scales)}, flip {flip}"
    return {"model": model.name, "pipeline": pipeline,
            **score(predict, data, split, model.class_names, ignore, void_id)}


class LogitsSession:
    """The model's ONNX graph on ONNX Runtime's CPU provider, answering logits [C,H,W] for one input tensor."""

    def __init__(self, model: SegmentationModel):
        import onnx
        import onnxruntime as ort

        if model.path.suffix.lower() != ".onnx":
            raise ValueError(f"{model.path.name}: flip and multi-scale evaluation need an ONNX model")
        proto = onnx.load(str(model.path))
        if model.output_kind == "logits":
            output = proto.graph.output[0].name
        else:
            argmax = next((node for node in proto.graph.node if node.op_type == "ArgMax"), None)
            if argmax is None:
                raise ValueError(f"{model.path.name}: labels output without an ArgMax node; cannot read logits")
            output = argmax.input[0]
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(output))
        self.sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        self.output, self.model = output, model

    def __call__(self, image_bgr: np.ndarray) -> np.ndarray:
        """Logits at the image's size, which must be the model's input size (any, for dynamic H/W)."""
        tensor = preprocess(image_bgr, self.model, image_bgr.shape[:2])
        return self.sess.run([self.output], {self.model.input_name: tensor})[0][0].astype(np.float32)


def _window_logits(run: LogitsSession, image: np.ndarray, window: tuple[int | None, int | None]) -> np.ndarray:
    """Logits [C,H,W] of an image of any size through a model of fixed input size: padded with the mean colour
    where the image is smaller, slid over with 1/3 overlap where it is larger (the usual sliding-window test)."""
    h, w = image.shape[:2]
    wh, ww = window[0] or h, window[1] or w  # a dynamic dimension takes the image as it is
    mean_bgr = [255 * m for m in run.model.meta.mean[::-1]]
    ph, pw = max(wh - h, 0), max(ww - w, 0)
    padded = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=mean_bgr) if ph or pw else image
    H, W = padded.shape[:2]

    def starts(size, win):
        step = max(1, -(-2 * win // 3))
        return sorted({*range(0, size - win + 1, step), size - win})

    total, count = None, np.zeros((H, W), np.float32)
    for y in starts(H, wh):
        for x in starts(W, ww):
            out = run(np.ascontiguousarray(padded[y:y + wh, x:x + ww]))
            if total is None:
                total = np.zeros((out.shape[0], H, W), np.float32)
            total[:, y:y + wh, x:x + ww] += out
            count[y:y + wh, x:x + ww] += 1
    return (total / count)[:, :h, :w]


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


def augmented_labels(run: LogitsSession, image: np.ndarray, scales, flip: bool) -> np.ndarray:
    """Labels at the image's size from class probabilities averaged over ``scales`` (relative to the model's
    input size) and, with ``flip``, the mirrored image too."""
    h, w = image.shape[:2]
    window = run.model.input_hw
    base_h, base_w = window[0] or h, window[1] or w
    total = None
    for s in scales:
        size = (max(32, round(base_w * s)), max(32, round(base_h * s)))
        resized = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        for mirrored in (False, True) if flip else (False,):
            src = np.ascontiguousarray(resized[:, ::-1]) if mirrored else resized
            probs = _softmax(_window_logits(run, src, window))
            if mirrored:
                probs = probs[:, :, ::-1]
            # cv2.resize takes channels last; back to the photo's size before summing.
            probs = cv2.resize(np.ascontiguousarray(probs.transpose(1, 2, 0)), (w, h), interpolation=cv2.INTER_LINEAR)
            probs = probs.reshape(h, w, -1)
            total = probs if total is None else total + probs
    return total.argmax(2).astype(np.uint8 if total.shape[2] <= 256 else np.int32)


def confusion_table(conf: np.ndarray, names: list[str]) -> str:
    """The confusion matrix as text: each row (truth) in percent of that class's pixels."""
    rows = np.asarray(conf, np.float64)
    pct = 100 * rows / np.maximum(rows.sum(1, keepdims=True), 1)
    short = [n[:6] for n in names]
    lines = ["truth \\ pred " + " ".join(f"{s:>6}" for s in short)]
    for name, row in zip(names, pct):
        lines.append(f"{name[:12]:<12} " + " ".join(f"{v:6.1f}" for v in row))
    return "\n".join(lines)


def confusion_image(conf: np.ndarray, names: list[str], cell: int = 48) -> np.ndarray:
    """A BGR heat map of the row-normalised confusion matrix, with the percentages and class names."""
    rows = np.asarray(conf, np.float64)
    pct = rows / np.maximum(rows.sum(1, keepdims=True), 1)
    n, margin = len(names), 120
    img = np.full((margin + n * cell + 10, margin + n * cell + 10, 3), 255, np.uint8)
    heat = cv2.applyColorMap((pct * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)
    img[margin:margin + n * cell, margin:margin + n * cell] = cv2.resize(heat, (n * cell, n * cell),
                                                                        interpolation=cv2.INTER_NEAREST)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for i, name in enumerate(names):
        cv2.putText(img, name[:14], (4, margin + i * cell + cell // 2 + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        for j in range(n):
            v = pct[i, j] * 100
            colour = (0, 0, 0) if pct[i, j] > 0.5 else (255, 255, 255)
            cv2.putText(img, f"{v:.0f}", (margin + j * cell + 8, margin + i * cell + cell // 2 + 5), font, 0.4,
                        colour, 1, cv2.LINE_AA)
    column_names = np.full((margin, n * cell, 3), 255, np.uint8)
    rotated = cv2.rotate(column_names, cv2.ROTATE_90_CLOCKWISE)  # write names horizontally, then turn them upright
    for j, name in enumerate(names):
        cv2.putText(rotated, name[:14], (4, j * cell + cell // 2 + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    img[:margin, margin:margin + n * cell] = cv2.rotate(rotated, cv2.ROTATE_90_COUNTERCLOCKWISE)
    cv2.putText(img, "truth \\ prediction (% of row)", (4, 16), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return img
