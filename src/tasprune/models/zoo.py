"""Test and benchmark models: ResNet-18/50, MobileNetV2, a VGG-11 with BN and a small net
that concatenates channels.

Written for this project from the published architectures. The ResNets and MobileNetV2
follow torchvision's module layout and state-dict key names, so torchvision weights load
into them with `load_state_dict(strict=True)`. Every forward is straight-line code that
`torch.fx.symbolic_trace` can trace. Every factory takes `num_classes` and `in_channels`
and returns a freshly initialised module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "ZOO",
    "BasicBlock",
    "Bottleneck",
    "ConcatNet",
    "DenseBlock",
    "InvertedResidual",
    "MobileNetV2",
    "ResNet",
    "ResidualBlock",
    "TwoBranchBlock",
    "VGG",
    "concat_net",
    "mobilenet_v2",
    "resnet18",
    "resnet50",
    "vgg11_bn",
]


def _conv3x3(inp: int, out: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """A 3x3 convolution with padding 1 and no bias."""
    return nn.Conv2d(inp, out, 3, stride=stride, padding=1, groups=groups, bias=False)


def _conv1x1(inp: int, out: int, stride: int = 1) -> nn.Conv2d:
    """A 1x1 convolution without bias."""
    return nn.Conv2d(inp, out, 1, stride=stride, bias=False)


def _conv_bn_relu(inp: int, out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv (padding kernel // 2, no bias), BatchNorm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU(inplace=True),
    )


def _init_conv_bn(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, relu) convolutions, BatchNorm weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or projected shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inp: int, width: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inp, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as ResNet v1.5) and 1x1 expand by 4."""

    expansion = 4

    def __init__(self, inp: int, width: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        out = width * self.expansion
        self.conv1 = _conv1x1(inp, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, out)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A ResNet with torchvision's module names (conv1, bn1, layer1-4, fc)."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], depths: list[int],
                 num_classes: int = 10, in_channels: int = 3,
                 small_input: bool = False) -> None:
        super().__init__()
        self.inplanes = 64
        if small_input:
            self.conv1 = _conv3x3(in_channels, 64)
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (nn.Identity() if small_input
                                   else nn.MaxPool2d(3, stride=2, padding=1))
        self.layer1 = self._stage(block, 64, depths[0], 1)
        self.layer2 = self._stage(block, 128, depths[1], 2)
        self.layer3 = self._stage(block, 256, depths[2], 2)
        self.layer4 = self._stage(block, 512, depths[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        _init_conv_bn(self)

    def _stage(self, block: type[BasicBlock] | type[Bottleneck], width: int, depth: int,
               stride: int) -> nn.Sequential:
        out = width * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(_conv1x1(self.inplanes, out, stride),
                                       nn.BatchNorm2d(out))
        layers: list[nn.Module] = [block(self.inplanes, width, stride, downsample)]
        self.inplanes = out
        layers += [block(out, width) for _ in range(1, depth)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 10, in_channels: int = 3,
             small_input: bool = False) -> ResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2); 11,689,512 parameters at 1000 classes."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, small_input)


def resnet50(num_classes: int = 10, in_channels: int = 3,
             small_input: bool = False) -> ResNet:
    """ResNet-50 (Bottleneck, 3-4-6-3); 25,557,032 parameters at 1000 classes."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, small_input)


# ---------------------------------------------------------------------- MobileNetV2


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round `v` to the nearest multiple of `divisor`, never more than 10% below it."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _conv_bn_relu6(inp: int, out: int, kernel: int = 3, stride: int = 1,
                   groups: int = 1) -> nn.Sequential:
    """Conv (padding kernel // 2, no bias), BatchNorm and ReLU6."""
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride=stride, padding=kernel // 2, groups=groups,
                  bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, linear 1x1 projection; residual when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(inp, hidden, kernel=1))
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


# (expand ratio t, output channels c, repeats n, first stride s)
_MOBILENET_V2_SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class MobileNetV2(nn.Module):
    """MobileNetV2 in torchvision's layout (`features`, `classifier`)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0,
                 small_input: bool = True) -> None:
        super().__init__()
        inp = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [
            _conv_bn_relu6(in_channels, inp, stride=1 if small_input else 2)
        ]
        for row, (t, c, n, s) in enumerate(_MOBILENET_V2_SETTING):
            if small_input and row == 1:
                s = 1
            oup = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(inp, oup, s if i == 0 else 1, t))
                inp = oup
        layers.append(_conv_bn_relu6(inp, self.last_channel, kernel=1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2),
                                        nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0,
                 small_input: bool = True) -> MobileNetV2:
    """MobileNetV2; `small_input` (28-32 px images) makes the stem and second stage stride 1.
    3,504,872 parameters at 1000 classes."""
    return MobileNetV2(num_classes, in_channels, width_mult, small_input)


# ---------------------------------------------------------------------------- VGG

_VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class VGG(nn.Module):
    """A plain VGG with BN: conv-BN-ReLU per width, 2x2 max pool per "M", a small head."""

    def __init__(self, config: list[int | str], num_classes: int = 10,
                 in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        inp = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                width = int(item)
                layers += [nn.Conv2d(inp, width, 3, padding=1), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                inp = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(inp, 512), nn.ReLU(inplace=True),
                                        nn.Dropout(0.5), nn.Linear(512, num_classes))
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg11_bn(num_classes: int = 10, in_channels: int = 3, small_input: bool = True) -> VGG:
    """VGG-11 with BN; `small_input` drops the last pool so 28 px inputs end at 1x1."""
    config = _VGG11[:-1] if small_input else _VGG11
    return VGG(config, num_classes, in_channels)


# ---------------------------------------------------------------- concatenating net


class TwoBranchBlock(nn.Module):
    """Inception-style: a 1x1 and a 3x3 branch, concatenated (out1 + out3 channels)."""

    def __init__(self, inp: int, out1: int, out3: int) -> None:
        super().__init__()
        self.branch1 = _conv_bn_relu(inp, out1, kernel=1)
        self.branch3 = _conv_bn_relu(inp, out3, kernel=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x)], dim=1)


class DenseBlock(nn.Module):
    """DenseNet-style: the input concatenated with a new branch (inp + growth channels)."""

    def __init__(self, inp: int, growth: int) -> None:
        super().__init__()
        self.branch = _conv_bn_relu(inp, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.branch(x)], dim=1)


class ResidualBlock(nn.Module):
    """`relu(x + body(x))` with body conv-BN-ReLU-conv-BN at the same width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv3x3(width, width), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), _conv3x3(width, width),
                                  nn.BatchNorm2d(width))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.body(x))


class ConcatNet(nn.Module):
    """Stem 16, two-branch block to 16+24, stride-2 conv to 32, dense block to 32+16,
    residual block at 48, pool and a linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(in_channels, 16)
        self.mixed = TwoBranchBlock(16, 16, 24)
        self.reduce = _conv_bn_relu(40, 32, stride=2)
        self.dense = DenseBlock(32, 16)
        self.residual = ResidualBlock(48)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(48, num_classes)
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(self.mixed(self.stem(x)))
        x = self.residual(self.dense(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def concat_net(num_classes: int = 10, in_channels: int = 3) -> ConcatNet:
    """The small concatenating net (channel concat in two places, one residual add)."""
    return ConcatNet(num_classes, in_channels)


ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
    "vgg11_bn": vgg11_bn,
    "concat_net": concat_net,
}
