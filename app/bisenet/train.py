"""Train a BiSeNet on a CamVid-layout data set (``segment train``); needs a CUDA GPU for sensible speed.

Recipe: SGD with momentum, linear warm-up then poly decay, OHEM cross-entropy on the main head and
(by default) plain cross-entropy on the four auxiliary heads, optionally class-weighted, bf16 autocast,
channels-last, GPU-side augmentation (see ``data.py``), optionally an EMA of the weights over the last part
of training. The schedule runs on the larger of iteration progress and time progress, so ``--minutes`` bounds
the run. Progress lines carry iteration, loss, it/s and ETA; ``checkpoint.pth`` resumes a run (``--resume``).
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
from . import ARCHS, build_model
from .data import IGNORE, GpuAugment, channel_stats, class_weights, load_split
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


class WeightAverage:
    """Exponential moving average of a model's floating-point state (weights and BN statistics).

    Updated every few steps with one fused ``_foreach_lerp_``, so it costs little; integer buffers
    (BN's batch counters) are copied.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        current = model.state_dict()
        keys = [k for k, v in self.state.items() if v.is_floating_point()]
        torch._foreach_lerp_([self.state[k] for k in keys], [current[k].detach() for k in keys], 1.0 - self.decay)
        for k, v in self.state.items():
            if not v.is_floating_point():
                v.copy_(current[k])
        self.updates += 1


def inference_state(arch: str, state: dict) -> dict:
    """A training state dict without the auxiliary heads: upstream's inference layout."""
    prefixes = ARCHS[arch].AUX_PREFIXES
    return {k: v.detach().cpu().clone() for k, v in state.items() if not k.startswith(prefixes)}


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
        x = ((x - m) / s).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(x).float()
        pred = logits.argmax(1, keepdim=True).float()
        pred = F.interpolate(pred, size=(h, w), mode="nearest").squeeze(1).byte().cpu().numpy()
        conf += confusion(labels[i:i + 16], pred, num_classes, ignore=IGNORE)
    model.train()
    return report(conf, CAMVID_CLASSES[:num_classes] if num_classes == 11 else [str(c) for c in range(num_classes)])


def save_checkpoint(path: Path, model, optim, iteration: int, elapsed: float, ema: WeightAverage | None) -> None:
    """Everything needed to resume, written atomically (a crash mid-save keeps the previous checkpoint)."""
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "iteration": iteration,
                "elapsed": elapsed, "ema": None if ema is None else ema.state,
                "ema_updates": 0 if ema is None else ema.updates,
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}, tmp)
    tmp.replace(path)


def _progress_line(it: int, loss: float, lr: float, rate: float, progress: float, elapsed: float) -> dict:
    eta = elapsed * (1 - progress) / progress if progress > 0 else float("nan")
    return {"iter": it, "loss": round(loss, 4), "lr": round(lr, 5), "it_per_s": round(rate, 2),
            "progress": round(progress, 3), "elapsed_s": round(elapsed),
            "eta_s": round(eta) if math.isfinite(eta) else None}


def main(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tr_img, tr_lab = load_split(args.data, args.splits)
    va_img, va_lab = load_split(args.data, args.val_split)
    # Normalisation comes from the train split alone, whatever is trained on: it is the dataset's fixed
    # mean/std that export writes into the metadata (app/classes.py), so serving pre-processes the same way.
    mean, std = channel_stats(load_split(args.data, "train")[0]) if args.splits != "train" else channel_stats(tr_img)
    held_out = args.val_split not in args.splits.split(",")
    print(f"train on {args.splits}: {len(tr_img)} images / {args.val_split}: {len(va_img)} images"
          f"{'' if held_out else ' (NOT held out: it is trained on)'}; mean {mean} std {std}; device {device}",
          flush=True)
    augment = GpuAugment(tr_img, tr_lab, mean, std, crop=tuple(args.crop), scale=tuple(args.scale), jitter=args.jitter,
                         aspect=tuple(args.aspect), cast=args.cast, blur=args.blur, device=device)

    model = build_model(args.arch, args.classes, aux=True).to(device).to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if args.compile else model
    optim = torch.optim.SGD(param_groups(model, args.weight_decay), lr=args.lr, momentum=0.9)
    weights = None
    if args.class_weights:
        weights = class_weights(tr_lab, args.classes, power=args.class_weights)
        print(f"class weights {weights}", flush=True)
    weight_t = None if weights is None else torch.tensor(weights, device=device)
    criterion = OhemCrossEntropy(ignore_index=IGNORE, weight=weight_t)
    aux_criterion = (criterion if args.aux_loss == "ohem"
                     else torch.nn.CrossEntropyLoss(ignore_index=IGNORE, weight=weight_t))

    log, start, it, ema = [], time.time(), 0, None
    if args.resume:
        ckpt = torch.load(args.resume, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optim.load_state_dict(ckpt["optim"])
        it, start = int(ckpt["iteration"]), time.time() - float(ckpt["elapsed"])
        if ckpt.get("ema") is not None:
            ema = WeightAverage(model, args.ema)
            ema.state, ema.updates = ckpt["ema"], int(ckpt.get("ema_updates", 0))
        if ckpt.get("rng") is not None:
            torch.set_rng_state(ckpt["rng"].cpu())
        if ckpt.get("cuda_rng") is not None and device == "cuda":
            torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu())
        print(f"resumed from {args.resume} at iteration {it}", flush=True)
    window_t, window_it = time.time(), it
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
        # The average starts late, from the then weights: early weights are far from the final basin.
        if args.ema and progress >= args.ema_start and it % args.ema_every == 0:
            if ema is None:
                ema = WeightAverage(model, args.ema)
            else:
                ema.update(model)
        if args.checkpoint_every and it % args.checkpoint_every == 0:
            save_checkpoint(out / "checkpoint.pth", model, optim, it, time.time() - start, ema)
        if it % args.log_every == 0:
            now = time.time()
            entry = _progress_line(it, loss.item(), optim.param_groups[0]["lr"], (it - window_it) / (now - window_t),
                                   progress, now - start)
            window_t, window_it = now, it
            log.append(entry)
            print(json.dumps(entry), flush=True)
            if not math.isfinite(entry["loss"]):
                raise RuntimeError("loss diverged")

    train_s = time.time() - start
    save_checkpoint(out / "checkpoint.pth", model, optim, it, train_s, ema)
    candidates = {"last": inference_state(args.arch, model.state_dict())}
    if ema is not None:
        candidates["ema"] = inference_state(args.arch, ema.state)
    # What the recipe ships is fixed before any score is seen: the average when there is one.
    shipped = "ema" if ema is not None else "last"
    torch.save(candidates[shipped], out / "weights.pth")
    if ema is not None:
        torch.save(candidates["last"], out / "weights_last.pth")
    evals = {}
    inference = build_model(args.arch, args.classes, aux=False).to(device).to(memory_format=torch.channels_last)
    for name, state in candidates.items():
        inference.load_state_dict(state)
        for size in args.eval_sizes.split(","):
            h, w = map(int, size.split("x"))
            key = size if name == shipped else f"{name}:{size}"
            evals[key] = evaluate_torch(inference, va_img, va_lab, mean, std, (h, w), args.classes, device)
            print(f"{args.val_split} mIoU ({name} weights) at {size}: {evals[key]['miou']:.4f}", flush=True)
    summary = {"iterations": it, "train_seconds": round(train_s, 1), "mean": mean, "std": std,
               "class_weights": weights, "shipped_weights": shipped,
               "ema_updates": 0 if ema is None else ema.updates, "val_held_out": held_out,
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
               "val_torch": evals, "log": log,
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "torch": torch.__version__}
    (out / "train_log.json").write_text(json.dumps(summary, indent=1))
    print(f"done: {it} iterations in {train_s:.0f} s; weights in {out / 'weights.pth'}", flush=True)
    return summary
