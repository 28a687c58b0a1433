"""Train BiSeNetV2 on a CamVid-layout data set (``segment train``); needs a CUDA GPU for sensible speed.

Recipe: SGD with momentum, linear warm-up then poly decay, OHEM cross-entropy on the main head and
(by default) plain cross-entropy on the four auxiliary heads, bf16 autocast, channels-last, GPU-side augmentation (see ``data.py``). The
schedule runs on the larger of iteration progress and time progress, so ``--minutes`` bounds the run.
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.iou import confusion, report
from . import build_model
from .data import IGNORE, GpuAugment, channel_stats, load_split
from .loss import OhemCrossEntropy

CAMVID_CLASSES = ["sky", "building", "pole", "road", "sidewalk", "tree", "sign", "fence", "car",
                  "pedestrian", "bicyclist"]


def param_groups(model, weight_decay):
    """No weight decay on biases and norms (1-D parameters)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(progress: float, it: int, warmup: int) -> float:
    """Linear warm-up from 0.1x over ``warmup`` iterations, then poly(0.9) decay over ``progress``."""
    if it < warmup:
        return 0.1 + 0.9 * it / warmup
    return max(1.0 - progress, 0.0) ** 0.9


@torch.no_grad()
def evaluate_torch(model, images, labels, mean, std, size, num_classes, device) -> dict:
    """mIoU of ``model`` on a split, resizing inputs to ``size`` and predictions back (nearest)."""
    model.eval()
    conf = np.zeros((num_classes, num_classes), np.int64)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    for i in range(0, len(images), 16):
        x = torch.from_numpy(images[i:i + 16]).to(device).permute(0, 3, 1, 2).float() / 255.0
        h, w = x.shape[2:]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(((x - m) / s).contiguous(memory_format=torch.channels_last))
        pred = logits.float().argmax(1, keepdim=True).float()
        pred = F.interpolate(pred, size=(h, w), mode="nearest").squeeze(1).byte().cpu().numpy()
        conf += confusion(labels[i:i + 16], pred, num_classes, ignore=IGNORE)
    model.train()
    return report(conf, CAMVID_CLASSES[:num_classes] if num_classes == 11 else [str(c) for c in range(num_classes)])


def save_checkpoint(path: Path, model, optim, iteration: int, elapsed: float) -> None:
    """Everything needed to resume, written atomically (a crash mid-save keeps the previous checkpoint)."""
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "iteration": iteration,
                "elapsed": elapsed}, tmp)
    tmp.replace(path)


def main(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tr_img, tr_lab = load_split(args.data, "train")
    va_img, va_lab = load_split(args.data, "val")
    mean, std = channel_stats(tr_img)
    print(f"train {len(tr_img)} / val {len(va_img)} images; mean {mean} std {std}; device {device}", flush=True)
    augment = GpuAugment(tr_img, tr_lab, mean, std, crop=tuple(args.crop), scale=tuple(args.scale), device=device)

    model = build_model(args.arch, args.classes, aux=True).to(device).to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if args.compile else model
    optim = torch.optim.SGD(param_groups(model, args.weight_decay), lr=args.lr, momentum=0.9)
    criterion = OhemCrossEntropy(ignore_index=IGNORE)
    aux_criterion = criterion if args.aux_loss == "ohem" else torch.nn.CrossEntropyLoss(ignore_index=IGNORE)

    log, start, it = [], time.time(), 0
    if args.resume:
        ckpt = torch.load(args.resume, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optim.load_state_dict(ckpt["optim"])
        it, start = int(ckpt["iteration"]), time.time() - float(ckpt["elapsed"])
        print(f"resumed from {args.resume} at iteration {it}", flush=True)
    while True:
        elapsed = time.time() - start
        progress = max(it / args.iters, elapsed / (args.minutes * 60) if args.minutes else 0.0)
        if progress >= 1.0:
            break
        for g in optim.param_groups:
            g["lr"] = args.lr * lr_factor(progress, it, args.warmup)
        x, y = augment(args.batch)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            outputs = step_model(x)
        loss = criterion(outputs[0], y) + args.aux_weight * sum(aux_criterion(o.float(), y) for o in outputs[1:])
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        it += 1
        if args.checkpoint_every and it % args.checkpoint_every == 0:
            save_checkpoint(out / "checkpoint.pth", model, optim, it, time.time() - start)
        if it % 200 == 0:
            rate = it / (time.time() - start)
            entry = {"iter": it, "loss": round(loss.item(), 4), "lr": round(optim.param_groups[0]["lr"], 5),
                     "it_per_s": round(rate, 2), "progress": round(progress, 3)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
            if not math.isfinite(entry["loss"]):
                raise RuntimeError("loss diverged")

    train_s = time.time() - start
    inference = build_model(args.arch, args.classes, aux=False)
    inference.load_state_dict({k: v for k, v in model.state_dict().items()
                               if not k.startswith(type(model).AUX_PREFIXES)})
    torch.save(inference.state_dict(), out / "weights.pth")
    inference.to(device).to(memory_format=torch.channels_last)
    evals = {}
    for size in args.eval_sizes.split(","):
        h, w = map(int, size.split("x"))
        evals[size] = evaluate_torch(inference, va_img, va_lab, mean, std, (h, w), args.classes, device)
        print(f"val mIoU at {size}: {evals[size]['miou']:.4f}", flush=True)
    summary = {"iterations": it, "train_seconds": round(train_s, 1), "mean": mean, "std": std,
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}, "val_torch": evals, "log": log,
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "torch": torch.__version__}
    (out / "train_log.json").write_text(json.dumps(summary, indent=1))
    print(f"done: {it} iterations in {train_s:.0f} s; weights in {out / 'weights.pth'}", flush=True)
    return summary

