"""Export a BiSeNet to ONNX (``segment export``), verify it against PyTorch, and write its metadata."""

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from tqdm import tqdm

from ..core.datasets import DATASETS
from ..core.metadata import ModelMeta, save_meta, sha256_file
from . import build_model, load_checkpoint

log = logging.getLogger("segment.export")
INPUT_NAME, OUTPUT_NAME = "input_image", "preds"


class WithArgmax(nn.Module):
    """Puts the argmax in the graph (a standard ONNX ArgMax + Cast): labels out, not C x H x W floats."""

    def __init__(self, model: nn.Module, num_classes: int):
        super().__init__()
        self.model = model
        self.dtype = torch.uint8 if num_classes <= 256 else torch.int32

    def forward(self, x):
        return self.model(x).argmax(dim=1).to(self.dtype)


class RawPixels(nn.Module):
    """uint8 RGB [N,H,W,3] in: cast, NCHW layout and (x/255 - mean)/std inside the graph, so a client sends
    a quarter of the bytes and no pre-processing runs outside the model."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) / std_t)

    def forward(self, x):
        return self.model(x.permute(0, 3, 1, 2).float() * self.scale - self.shift)


def _with_logits_output(model_path: Path) -> bytes:
    """The exported graph with the ArgMax's input added as an output, to compare logits too."""
    proto = onnx.load(str(model_path))
    argmax = next((n for n in proto.graph.node if n.op_type == "ArgMax"), None)
    if argmax is not None:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(argmax.input[0]))
    return proto.SerializeToString()


def verify(model: nn.Module, onnx_path: Path, height: int, width: int, seed: int = 0, raw: bool = False) -> dict:
    """Run PyTorch and ONNX Runtime on one random input: max logit difference and label agreement."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.integers(0, 256, (1, height, width, 3), np.uint8) if raw
                         else rng.standard_normal((1, 3, height, width), np.float32))
    with torch.no_grad():
        ref = model(x).numpy()
    sess = ort.InferenceSession(_with_logits_output(onnx_path), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {INPUT_NAME: x.numpy()})))
    preds = outs.pop(OUTPUT_NAME)
    logits = next(iter(outs.values()), preds)  # logits-output graphs: preds are the logits
    labels = preds if preds.ndim == 3 else preds.argmax(1)
    return {"max_abs_diff": float(np.abs(logits - ref).max()),
            "label_agreement": float((labels == ref.argmax(1)).mean())}


def export(arch: str, out: Path, *, weights: Path | None, classes: int, dataset: str, height: int, width: int,
           output: str = "labels", dynamic_hw: bool = False, opset: int = 18, seed: int = 0,
           input_kind: str = "float", description: str | None = None, extra: dict | None = None) -> dict:
    """Export ``arch`` to ``out`` (+ ``out.json``); ``weights=None`` exports random weights (for tests)."""
    if height % 32 or width % 32:
        raise ValueError(f"--height and --width must be multiples of 32 (got {height}x{width})")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=5, desc="export", unit="step", bar_format="{desc}: {n}/{total} {postfix}")

    steps.set_postfix_str("building model")
    torch.manual_seed(seed)
    model = build_model(arch, classes).eval()
    if weights is not None:
        load_checkpoint(model, weights)
    steps.update()

    steps.set_postfix_str("tracing to ONNX")
    names, palette, mean, std = DATASETS[dataset]
    raw = input_kind == "uint8"
    if raw:
        model = RawPixels(model, mean, std).eval()
    wrapped = (WithArgmax(model, classes) if output == "labels" else model).eval()
    if raw:
        axes = {0: "batch", 1: "height", 2: "width"} if dynamic_hw else {0: "batch"}
        example = torch.zeros(1, height, width, 3, dtype=torch.uint8)
    else:
        axes = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
        example = torch.zeros(1, 3, height, width)
    out_axes = ({0: "batch", 1: "height", 2: "width"} if dynamic_hw else {0: "batch"}) if output == "labels" else \
        ({0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(wrapped, (example,), str(out), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=opset, dynamo=False,
                          dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: out_axes})
    steps.update()

    steps.set_postfix_str("onnx.checker")
    onnx.checker.check_model(str(out), full_check=True)
    steps.update()

    steps.set_postfix_str("ONNX Runtime vs PyTorch")
    check = verify(model, out, height, width, seed, raw=raw)
    steps.update()

    if len(names) != classes:  # a custom class count: numbered names, generated colours
        names, palette = [f"class {i}" for i in range(classes)], []
    meta = ModelMeta(dataset=dataset, arch=arch, num_classes=classes, class_names=names, palette=palette,
                     mean=mean, std=std, input_size=(height, width), trained=weights is not None,
                     input_format="uint8_nhwc" if raw else "float_nchw",
                     source_sha256=sha256_file(weights) if weights else None, sha256=sha256_file(out),
                     description=description,
                     extra={"output": output, "input": input_kind, "dynamic_hw": dynamic_hw, "opset": opset,
                            "precision": "fp32", "seed": None if weights else seed, "exported_with": f"torch {torch.__version__}",
                            "check": check, **(extra or {})})
    meta_file = save_meta(out, meta)
    steps.set_postfix_str("done")
    steps.update()
    steps.close()
    return {"onnx": str(out), "metadata": str(meta_file), **check}
