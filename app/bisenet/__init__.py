"""Our PyTorch BiSeNet family, checkpoint-compatible with upstream (CoinCheung/BiSeNet).

Needs the ``export`` extra (torch). The service never imports this package.
"""

from pathlib import Path

import torch
from torch import nn

from .v1 import BiSeNetV1
from .v2 import BiSeNetV2

ARCHS = {"bisenetv1": BiSeNetV1, "bisenetv2": BiSeNetV2}


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: the message names every offending key."""


def build_model(arch: str, num_classes: int, aux: bool = False) -> nn.Module:
    """Construct ``arch`` with random weights; nothing is downloaded."""
    try:
        cls = ARCHS[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}") from None
    return cls(num_classes, aux=aux)


def _unwrap(state: dict) -> dict:
    # Training scripts often save {"model": state_dict, ...} or a DDP-wrapped "module." dict.
    for key in ("model", "state_dict"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load an upstream-style ``state_dict`` into ``model``, strictly.

    Auxiliary-head keys are ignored when ``model`` has no auxiliary heads; any other missing,
    unexpected or mis-shaped key raises :class:`CheckpointError` naming the keys.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state_dict, got {type(state).__name__}")
    state = _unwrap(state)
    if not getattr(model, "aux", True):
        state = {k: v for k, v in state.items() if not k.startswith(type(model).AUX_PREFIXES)}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("mis-shaped keys", mis_shaped))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
