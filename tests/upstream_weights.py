"""Deterministic weights and input that do not depend on any RNG, so logits computed once with upstream's
code (stored in ``data/upstream_logits.npz``) can be reproduced by our models on any machine."""

import math

import torch

INPUT_SHAPE = (1, 3, 64, 96)


def _wave(n: int, phase: float) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    return torch.sin(i * 0.7071 + phase) * 0.5 + torch.cos(i * 0.1234 + 2 * phase) * 0.5


def deterministic_state(template: dict) -> dict:
    """Weights for every key of ``template``: smooth, bounded, distinct per tensor; positive variances."""
    out = {}
    for k, (name, t) in enumerate(sorted(template.items())):
        if t.dtype == torch.int64:
            out[name] = torch.zeros_like(t)
            continue
        w = _wave(t.numel(), phase=k * 0.37).view(t.shape)
        if name.endswith("running_var"):
            w = 1.0 + 0.5 * w.abs()
        elif name.endswith("running_mean"):
            w = 0.1 * w
        elif t.ndim == 4:  # scale convolutions like Kaiming so activations neither vanish nor explode
            w = w * math.sqrt(2.0 / (t.shape[1] * t.shape[2] * t.shape[3]))
        out[name] = w.to(t.dtype)
    return out


def deterministic_input() -> torch.Tensor:
    n = math.prod(INPUT_SHAPE)
    return _wave(n, 0.5).view(INPUT_SHAPE).float() * 2.0
