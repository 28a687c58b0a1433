"""BiSeNetV2 (Yu et al., 2021): a detail branch, a semantic branch and bilateral guided aggregation."""

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvBNReLU, conv_bn, init_weights


class DetailBranch(nn.Module):
    """Wide, shallow branch at 1/8 resolution that keeps spatial detail."""

    def __init__(self):
        super().__init__()
        self.S1 = nn.Sequential(ConvBNReLU(3, 64, stride=2), ConvBNReLU(64, 64))
        self.S2 = nn.Sequential(ConvBNReLU(64, 64, stride=2), ConvBNReLU(64, 64), ConvBNReLU(64, 64))
        self.S3 = nn.Sequential(ConvBNReLU(64, 128, stride=2), ConvBNReLU(128, 128), ConvBNReLU(128, 128))

    def forward(self, x):
        return self.S3(self.S2(self.S1(x)))


class StemBlock(nn.Module):
    """Fast 4x down-sampling: a strided conv path and a max-pool path, concatenated and fused."""

    def __init__(self):
        super().__init__()
        self.conv = ConvBNReLU(3, 16, stride=2)
        self.left = nn.Sequential(ConvBNReLU(16, 8, k=1), ConvBNReLU(8, 16, stride=2))
        self.right = nn.MaxPool2d(3, stride=2, padding=1)
        self.fuse = ConvBNReLU(32, 16)

    def forward(self, x):
        x = self.conv(x)
        return self.fuse(torch.cat([self.left(x), self.right(x)], dim=1))


class ContextEmbedding(nn.Module):
    """Global average pooling added back to the features (the paper's CE block)."""

    def __init__(self, ch: int = 128):
        super().__init__()
        self.bn = nn.BatchNorm2d(ch)
        self.conv_gap = ConvBNReLU(ch, ch, k=1)
        self.conv_last = ConvBNReLU(ch, ch)

    def forward(self, x):
        ctx = self.conv_gap(self.bn(x.mean(dim=(2, 3), keepdim=True)))
        return self.conv_last(x + ctx)


class GatherExpand(nn.Module):
    """Gather-and-expansion layer, stride 1 (identity shortcut)."""

    def __init__(self, ch: int, expand: int = 6):
        super().__init__()
        mid = ch * expand
        self.conv1 = ConvBNReLU(ch, ch)
        self.dwconv = conv_bn(ch, mid, groups=ch, relu=True)
        self.conv2 = conv_bn(mid, ch, k=1)
        self.conv2[1].zero_init = True
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.conv2(self.dwconv(self.conv1(x))) + x)


class GatherExpandDown(nn.Module):
    """Gather-and-expansion layer, stride 2, with a depthwise-separable shortcut."""

    def __init__(self, cin: int, cout: int, expand: int = 6):
        super().__init__()
        mid = cin * expand
        self.conv1 = ConvBNReLU(cin, cin)
        self.dwconv1 = conv_bn(cin, mid, stride=2, groups=cin)
        self.dwconv2 = conv_bn(mid, mid, groups=mid, relu=True)
        self.conv2 = conv_bn(mid, cout, k=1)
        self.conv2[1].zero_init = True
        self.shortcut = nn.Sequential(*conv_bn(cin, cin, stride=2, groups=cin), *conv_bn(cin, cout, k=1))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.conv2(self.dwconv2(self.dwconv1(self.conv1(x))))
        return self.relu(y + self.shortcut(x))


class SemanticBranch(nn.Module):
    """Narrow, deep branch down to 1/32; returns every stage for the auxiliary heads."""

    def __init__(self):
        super().__init__()
        self.S1S2 = StemBlock()
        self.S3 = nn.Sequential(GatherExpandDown(16, 32), GatherExpand(32))
        self.S4 = nn.Sequential(GatherExpandDown(32, 64), GatherExpand(64))
        self.S5_4 = nn.Sequential(GatherExpandDown(64, 128), *(GatherExpand(128) for _ in range(3)))
        self.S5_5 = ContextEmbedding(128)

    def forward(self, x):
        f2 = self.S1S2(x)
        f3 = self.S3(f2)
        f4 = self.S4(f3)
        f5_4 = self.S5_4(f4)
        return f2, f3, f4, f5_4, self.S5_5(f5_4)


def _dw_then_pw(ch: int) -> nn.Sequential:
    return nn.Sequential(*conv_bn(ch, ch, groups=ch), nn.Conv2d(ch, ch, 1, bias=False))


class BilateralGuidedAggregation(nn.Module):
    """Each branch gates the other through a sigmoid, at both resolutions, then sums."""

    def __init__(self, ch: int = 128):
        super().__init__()
        self.left1 = _dw_then_pw(ch)
        self.left2 = nn.Sequential(*conv_bn(ch, ch, stride=2), nn.AvgPool2d(3, stride=2, padding=1))
        self.right1 = conv_bn(ch, ch)
        self.right2 = _dw_then_pw(ch)
        self.conv = conv_bn(ch, ch, relu=True)

    def forward(self, detail, semantic):
        up = lambda t: F.interpolate(t, scale_factor=4.0, mode="nearest")  # noqa: E731
        detail_hi = self.left1(detail) * torch.sigmoid(up(self.right1(semantic)))
        semantic_lo = self.left2(detail) * torch.sigmoid(self.right2(semantic))
        return self.conv(detail_hi + up(semantic_lo))


class SegmentHead(nn.Module):
    """Conv, dropout, (aux only: 2x nearest up + conv), 1x1 classifier, bilinear up to input size."""

    def __init__(self, cin: int, mid: int, num_classes: int, up: int, aux: bool):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid)
        self.drop = nn.Dropout(0.1)
        if aux:
            pre = nn.Sequential(nn.Upsample(scale_factor=2.0), ConvBNReLU(mid, up * up))
            cls_in, up = up * up, up // 2
        else:
            pre, cls_in = nn.Identity(), mid
        self.conv_out = nn.Sequential(
            pre,
            nn.Conv2d(cls_in, num_classes, 1, bias=True),
            nn.Upsample(scale_factor=float(up), mode="bilinear", align_corners=False),
        )

    def forward(self, x):
        return self.conv_out(self.drop(self.conv(x)))


class BiSeNetV2(nn.Module):
    """BiSeNetV2. ``aux=True`` adds the four training heads; ``forward`` then returns five logits."""

    AUX_PREFIXES = ("aux2.", "aux3.", "aux4.", "aux5_4.")

    def __init__(self, num_classes: int, aux: bool = False):
        super().__init__()
        self.detail = DetailBranch()
        self.segment = SemanticBranch()
        self.bga = BilateralGuidedAggregation()
        self.head = SegmentHead(128, 1024, num_classes, up=8, aux=False)
        self.aux = aux
        if aux:
            self.aux2 = SegmentHead(16, 128, num_classes, up=4, aux=True)
            self.aux3 = SegmentHead(32, 128, num_classes, up=8, aux=True)
            self.aux4 = SegmentHead(64, 128, num_classes, up=16, aux=True)
            self.aux5_4 = SegmentHead(128, 128, num_classes, up=32, aux=True)
        init_weights(self)

    def forward(self, x):
        f2, f3, f4, f5_4, context = self.segment(x)
        logits = self.head(self.bga(self.detail(x), context))
        if not self.aux:
            return logits
        return logits, self.aux2(f2), self.aux3(f3), self.aux4(f4), self.aux5_4(f5_4)
