"""BiSeNetV1 (Yu et al., 2018): a spatial path, a ResNet-18 context path and feature fusion."""

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvBNReLU, init_weights
from .resnet import ResNet18


def _up2(x):
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class AttentionRefinement(nn.Module):
    """Re-weights channels by a sigmoid of their global average."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x):
        feat = self.conv(x)
        atten = self.bn_atten(self.conv_atten(feat.mean(dim=(2, 3), keepdim=True)))
        return feat * torch.sigmoid(atten)


class ContextPath(nn.Module):
    """ResNet-18 with attention refinement at 1/16 and 1/32 plus a global context vector."""

    def __init__(self):
        super().__init__()
        self.resnet = ResNet18()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, k=1)

    def forward(self, x):
        f8, f16, f32 = self.resnet(x)
        context = self.conv_avg(f32.mean(dim=(2, 3), keepdim=True))
        up32 = self.conv_head32(_up2(self.arm32(f32) + context))
        up16 = self.conv_head16(_up2(self.arm16(f16) + up32))
        return up16, up32  # 1/8 and 1/16


class SpatialPath(nn.Module):
    """Three strided convolutions to 1/8, keeping spatial detail."""

    def __init__(self):
        super().__init__()
        self.conv1 = ConvBNReLU(3, 64, k=7, stride=2)
        self.conv2 = ConvBNReLU(64, 64, stride=2)
        self.conv3 = ConvBNReLU(64, 64, stride=2)
        self.conv_out = ConvBNReLU(64, 128, k=1)

    def forward(self, x):
        return self.conv_out(self.conv3(self.conv2(self.conv1(x))))


class FeatureFusion(nn.Module):
    """Concatenates both paths and adds a channel-attention-weighted copy."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, k=1)
        self.conv = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, spatial, context):
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        atten = torch.sigmoid(self.bn(self.conv(feat.mean(dim=(2, 3), keepdim=True))))
        return feat * atten + feat


class OutputHead(nn.Module):
    """Conv, 1x1 classifier, bilinear up-sampling by ``up``."""

    def __init__(self, cin: int, mid: int, num_classes: int, up: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, num_classes, 1, bias=True)
        self.up = nn.Upsample(scale_factor=float(up), mode="bilinear", align_corners=False)

    def forward(self, x):
        return self.up(self.conv_out(self.conv(x)))


class BiSeNetV1(nn.Module):
    """BiSeNetV1. ``aux=True`` adds the two training heads; ``forward`` then returns three logits."""

    AUX_PREFIXES = ("conv_out16.", "conv_out32.")

    def __init__(self, num_classes: int, aux: bool = False):
        super().__init__()
        self.cp = ContextPath()
        self.sp = SpatialPath()
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = OutputHead(256, 256, num_classes, up=8)
        self.aux = aux
        if aux:
            self.conv_out16 = OutputHead(128, 64, num_classes, up=8)
            self.conv_out32 = OutputHead(128, 64, num_classes, up=16)
        init_weights(self)

    def forward(self, x):
        cp8, cp16 = self.cp(x)
        logits = self.conv_out(self.ffm(self.sp(x), cp8))
        if not self.aux:
            return logits
        return logits, self.conv_out16(cp8), self.conv_out32(cp16)
