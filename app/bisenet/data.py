"""CamVid-style data held in memory, with augmentation done on the GPU in one resampling pass.

The whole CamVid split is ~190 MB as uint8, so it lives on the device; each batch is made by one
``grid_sample`` (random scale, crop and flip together) plus photometric jitter, which keeps a fast
GPU fed without worker processes.
"""

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

IGNORE = 255


def load_split(root: str | Path, split: str, void_id: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """RGB images [N,H,W,3] uint8 and labels [N,H,W] uint8 (``void_id`` mapped to 255)."""
    root = Path(root)
    paths = sorted((root / "images" / split).glob("*.jpg"))
    if not paths:
        raise FileNotFoundError(f"no images under {root / 'images' / split}")
    images, labels = [], []
    for p in paths:
        images.append(cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
        lab = cv2.imread(str(root / "labels" / split / (p.stem + ".png")), cv2.IMREAD_UNCHANGED)
        lab[lab == void_id] = IGNORE
        labels.append(lab)
    return np.stack(images), np.stack(labels)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of RGB images scaled to [0, 1]."""
    x = images.reshape(-1, 3).astype(np.float64) / 255.0
    return x.mean(0).round(4).tolist(), x.std(0).round(4).tolist()


class GpuAugment:
    """Random scale, crop, horizontal flip and colour jitter for a batch, on the images' device."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std, crop=(352, 480),
                 scale=(0.75, 1.75), jitter=0.4, device="cuda"):
        self.images = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).contiguous()  # N,3,H,W uint8
        self.labels = torch.from_numpy(labels).to(device)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.crop, self.scale, self.jitter, self.device = crop, scale, jitter, device

    def __call__(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = self.images.shape
        ch, cw = self.crop
        idx = torch.randint(0, n, (batch,), device=self.device)
        img = self.images[idx].float() / 255.0
        lab = self.labels[idx].float().unsqueeze(1)

        img = self._colour_jitter(img)
        img = (img - self.mean) / self.std

        # Crop pixel (u, v) comes from source pixel ((u + off_x) / s, (v + off_y) / s); normalised
        # coordinates turn that into one affine matrix per sample.
        s = torch.empty(batch, device=self.device).uniform_(*self.scale)
        off_x = torch.rand(batch, device=self.device) * (w * s - cw)
        off_y = torch.rand(batch, device=self.device) * (h * s - ch)
        flip = torch.where(torch.rand(batch, device=self.device) < 0.5, -1.0, 1.0)
        theta = torch.zeros(batch, 2, 3, device=self.device)
        theta[:, 0, 0] = flip * cw / (w * s)
        theta[:, 0, 2] = (2 * off_x + cw) / (w * s) - 1
        theta[:, 1, 1] = ch / (h * s)
        theta[:, 1, 2] = (2 * off_y + ch) / (h * s) - 1
        grid = F.affine_grid(theta, (batch, 3, ch, cw), align_corners=False)
        img = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # Shift labels by one so that padding (0) is distinguishable, then map it to IGNORE.
        lab = F.grid_sample(lab + 1, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        lab = lab.squeeze(1).long() - 1
        lab[lab < 0] = IGNORE
        return img.contiguous(memory_format=torch.channels_last), lab

    def _colour_jitter(self, img: torch.Tensor) -> torch.Tensor:
        b = img.shape[0]

        def factor():
            return torch.empty(b, 1, 1, 1, device=self.device).uniform_(1 - self.jitter, 1 + self.jitter)

        img = img * factor()  # brightness
        grey = img.mean(dim=(1, 2, 3), keepdim=True)
        img = (img - grey) * factor() + grey  # contrast
        luma = (0.299 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3])
        img = (img - luma) * factor() + luma  # saturation
        return img.clamp_(0, 1)
