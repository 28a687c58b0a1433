"""Online hard example mining cross-entropy, as in the BiSeNetV2 paper and upstream's recipe."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class OhemCrossEntropy(nn.Module):
    """Mean CE over pixels whose loss exceeds ``-log(thresh)``, but over at least 1/16 of the valid pixels.

    ``weight`` (one per class) re-weights the kept pixels, e.g. to lift thin classes; hardness is judged on the
    unweighted loss, so the weights change what is learnt from a hard pixel, not which pixels are hard.
    """

    def __init__(self, thresh: float = 0.7, ignore_index: int = 255, min_fraction: float = 1 / 16,
                 weight: torch.Tensor | None = None):
        super().__init__()
        self.loss_thresh = -math.log(thresh)
        self.ignore_index = ignore_index
        self.min_fraction = min_fraction
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.float(), labels, ignore_index=self.ignore_index, reduction="none").view(-1)
        if self.weight is None:
            pixel_w = torch.ones_like(loss)
        else:
            pixel_w = self.weight[labels.view(-1).clamp(max=len(self.weight) - 1)]
        loss, order = loss.sort(descending=True)  # ignored pixels have loss 0: they sort last
        pixel_w = pixel_w[order]
        n_min = ((labels != self.ignore_index).sum() * self.min_fraction).clamp(min=1)
        # Tensor-only selection (no .item()), so the GPU is never stalled by a host sync.
        keep = (loss > self.loss_thresh) | (torch.arange(loss.numel(), device=loss.device) < n_min)
        w = keep * pixel_w
        return (loss * w).sum() / w.sum().clamp(min=1e-6)
