"""Residual blocks whose every width comes from the caller (a Shape).

Both blocks declare a *free shortcut* (`free_shortcut`, `make_shortcut`): in the TAS
paper's search space an identity shortcut may join a block's input and output at
different widths, and the block then grows a 1x1 projection (conv + BN) at `downsample`.
"""

from __future__ import annotations

import torch
from torch import nn


class Projection(nn.Module):
    """Projection shortcut: (2x2 average pool when strided) then 1x1 conv (+ BN).

    The average pool before a stride-1 conv (rather than a strided 1x1 conv) keeps
    every input pixel, as in the TAS code.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, bn: bool) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch) if bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.pool(x)))


class _FreeShortcut:
    """A block whose identity shortcut may become a projection at `downsample`."""

    free_shortcut = "downsample"

    def make_shortcut(self, in_ch: int, out_ch: int) -> Projection:
        """The stride-1 projection the block grows when its widths differ (conv + BN)."""
        return Projection(in_ch, out_ch, 1, True)


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)
    return conv, nn.BatchNorm2d(out_ch)


class BasicBlock(_FreeShortcut, nn.Module):
    """Two 3x3 convs (He et al., 2016); the stride sits on the first."""

    expansion = 1

    def __init__(self, in_ch: int, widths: tuple[int, int], stride: int,
                 shortcut_bn: bool) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_ch, widths[0], 3, stride)
        self.conv2, self.bn2 = _conv_bn(widths[0], widths[1], 3, 1)
        self.relu = nn.ReLU(inplace=True)
        needs_projection = stride > 1 or in_ch != widths[1]
        self.downsample = (Projection(in_ch, widths[1], stride, shortcut_bn or stride == 1)
                           if needs_projection else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(_FreeShortcut, nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand (ResNet v1.5: stride on the 3x3)."""

    expansion = 4

    def __init__(self, in_ch: int, widths: tuple[int, int, int], stride: int,
                 shortcut_bn: bool) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_ch, widths[0], 1, 1)
        self.conv2, self.bn2 = _conv_bn(widths[0], widths[1], 3, stride)
        self.conv3, self.bn3 = _conv_bn(widths[1], widths[2], 1, 1)
        self.relu = nn.ReLU(inplace=True)
        needs_projection = stride > 1 or in_ch != widths[2]
        self.downsample = (Projection(in_ch, widths[2], stride, shortcut_bn or stride == 1)
                           if needs_projection else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
}
