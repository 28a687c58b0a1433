"""Building blocks shared by BiSeNetV1 and BiSeNetV2.

Attribute names are part of the checkpoint contract: they decide the ``state_dict`` keys, which
must match upstream's exactly (see ``../shared/contract``).
"""

from torch import nn


class ConvBNReLU(nn.Module):
    """Convolution, batch norm, ReLU; keys ``conv.weight`` and ``bn.*``."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, relu: bool = False):
    """A Sequential of conv and batch norm (keys ``0.weight``, ``1.*``), with an optional ReLU."""
    layers = [nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convolutions, unit batch norms, zeroed residual-closing norms.

    A batch norm flagged ``zero_init`` ends a residual branch: starting it at zero makes each block
    an identity at first, which trains faster from scratch.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 0.0 if getattr(m, "zero_init", False) else 1.0)
            nn.init.zeros_(m.bias)
