"""Online hard example mining cross-entropy, as in the BiSeNetV2 paper and upstream's recipe."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class OhemCrossEntropy(nn.Module):
    """Mean CE over pixels whose loss exceeds ``-log(thresh)``, but over at least 1/16 of the valid pixels."""

    def __init__(self, thresh: float = 0.7, ignore_index: int = 255, min_fraction: float = 1 / 16):
        super().__init__()
        self.loss_thresh = -math.log(thresh)
        self.ignore_index = ignore_index
        self.min_fraction = min_fraction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.float(), labels, ignore_index=self.ignore_index, reduction="none")
        loss = loss.view(-1).sort(descending=True).values  # ignored pixels have loss 0: they sort last
        n_min = ((labels != self.ignore_index).sum() * self.min_fraction).clamp(min=1)
        # Tensor-only selection (no .item()), so the GPU is never stalled by a host sync.
        keep = (loss > self.loss_thresh) | (torch.arange(loss.numel(), device=loss.device) < n_min)
        return (loss * keep).sum() / keep.sum()
