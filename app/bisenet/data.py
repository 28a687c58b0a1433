"""CamVid-style data held in memory, with augmentation done on the GPU in one resampling pass.

The whole CamVid split is ~190 MB as uint8, so it lives on the device; each batch is made by one
``grid_sample`` (random scale, aspect, crop and flip together) plus photometric jitter and blur, which
keeps a fast GPU fed without worker processes.
"""

import math
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

IGNORE = 255


def load_split(root: str | Path, split: str, void_id: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """RGB images [N,H,W,3] uint8 and labels [N,H,W] uint8 (``void_id`` mapped to 255).

    ``split`` may name several splits joined by commas (``train,val``): their images are concatenated.
    """
    root = Path(root)
    images, labels = [], []
    for name in split.split(","):
        paths = sorted((root / "images" / name).glob("*.jpg"))
        if not paths:
            raise FileNotFoundError(f"no images under {root / 'images' / name}")
        for p in paths:
            images.append(cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
            lab = cv2.imread(str(root / "labels" / name / (p.stem + ".png")), cv2.IMREAD_UNCHANGED)
            lab[lab == void_id] = IGNORE
            labels.append(lab)
    return np.stack(images), np.stack(labels)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of RGB images scaled to [0, 1]."""
    x = images.reshape(-1, 3).astype(np.float64) / 255.0
    return x.mean(0).round(4).tolist(), x.std(0).round(4).tolist()


def class_weights(labels: np.ndarray, num_classes: int, power: float = 0.5) -> list[float]:
    """Median-frequency balancing, softened: ``(median(freq) / freq_c) ** power`` (SegNet used power 1)."""
    counts = np.bincount(labels[labels != IGNORE].ravel(), minlength=num_classes)[:num_classes].astype(np.float64)
    freq = np.maximum(counts / counts.sum(), 1e-6)
    return ((np.median(freq) / freq) ** power).round(4).tolist()


class GpuAugment:
    """Random scale, aspect, crop, horizontal flip, colour jitter and blur for a batch, on the images' device.

    ``aspect`` stretches width against height by a factor drawn log-uniformly from the range; ``cast`` scales
    each RGB channel by up to +-cast (a change of light colour); ``blur`` is the probability of a Gaussian blur
    with sigma up to ``blur_sigma`` (camera focus and motion differ between drives).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std, crop=(352, 480),
                 scale=(0.75, 1.75), jitter=0.4, aspect=(1.0, 1.0), cast=0.0, blur=0.0, blur_sigma=1.5,
                 device="cuda"):
        self.images = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).contiguous()  # N,3,H,W uint8
        self.labels = torch.from_numpy(labels).to(device)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.crop, self.scale, self.jitter, self.device = crop, scale, jitter, device
        self.aspect, self.cast, self.blur, self.blur_sigma = aspect, cast, blur, blur_sigma

    def _uniform(self, batch: int, lo: float, hi: float) -> torch.Tensor:
        return torch.empty(batch, device=self.device).uniform_(lo, hi)

    def __call__(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = self.images.shape
        ch, cw = self.crop
        idx = torch.randint(0, n, (batch,), device=self.device)
        img = self.images[idx].float() / 255.0
        lab = self.labels[idx].float().unsqueeze(1)

        img = self._colour_jitter(img)
        if self.blur > 0:
            img = self._blur(img)
        img = (img - self.mean) / self.std

        # Crop pixel (u, v) comes from source pixel ((u + off_x) / sx, (v + off_y) / sy); normalised
        # coordinates turn that into one affine matrix per sample. A scaled image smaller than the crop
        # gets a negative offset: it lands at a random place inside the crop, padded with IGNORE.
        s = self._uniform(batch, *self.scale)
        a = torch.exp(self._uniform(batch, math.log(self.aspect[0]), math.log(self.aspect[1])))
        sx, sy = s * a.sqrt(), s / a.sqrt()
        off_x = torch.rand(batch, device=self.device) * (w * sx - cw)
        off_y = torch.rand(batch, device=self.device) * (h * sy - ch)
        flip = torch.where(torch.rand(batch, device=self.device) < 0.5, -1.0, 1.0)
        theta = torch.zeros(batch, 2, 3, device=self.device)
        theta[:, 0, 0] = flip * cw / (w * sx)
        theta[:, 0, 2] = (2 * off_x + cw) / (w * sx) - 1
        theta[:, 1, 1] = ch / (h * sy)
        theta[:, 1, 2] = (2 * off_y + ch) / (h * sy) - 1
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
        if self.cast > 0:
            img = img * torch.empty(b, 3, 1, 1, device=self.device).uniform_(1 - self.cast, 1 + self.cast)
        return img.clamp_(0, 1)

    def _blur(self, img: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur, its own sigma per sample; sigma 0 (no blur) with probability 1 - ``blur``."""
        b = img.shape[0]
        sigma = self._uniform(b, 0.3, self.blur_sigma) * (torch.rand(b, device=self.device) < self.blur)
        r = math.ceil(2 * self.blur_sigma)
        x = torch.arange(-r, r + 1, device=self.device, dtype=img.dtype)
        k = torch.exp(-x[None] ** 2 / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
        k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)  # one kernel per sample and channel
        flat = img.reshape(1, b * 3, *img.shape[2:])
        flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="replicate"), k[:, None, None, :], groups=b * 3)
        flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="replicate"), k[:, None, :, None], groups=b * 3)
        return flat.reshape(img.shape)
