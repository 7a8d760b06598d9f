"""Test and benchmark models: ResNet-18/50, ResNeXt-50 32x4d (and a small ResNeXt for fast
tests), RegNetX/Y-400MF,
EfficientNet-B0, DenseNet-121, ShuffleNetV2 x1.0, MobileNetV2, a VGG-11 with BN and a small
net that concatenates channels.

Written for this project from the published architectures. The ResNets, ResNeXt, RegNets,
EfficientNet, DenseNet, ShuffleNetV2 and MobileNetV2 follow torchvision's module layout,
state-dict key names, parameter counts and initialisation, so torchvision weights load into
them with `load_state_dict(strict=True)`. Every forward is straight-line code that
`torch.fx.symbolic_trace` can trace (stochastic depth is one wrapped call, as in
torchvision). Every factory takes `num_classes` and `in_channels` and returns a freshly
initialised module. `small_input` (the default except for ResNet-18/50) gives a stride-1
stem and no early downsampling (8x in all) for 28-32 px images, and `small_input=False`
torchvision's network exactly. The key names do not depend on `small_input`; only the stem
convolutions of the ResNets, ResNeXt and DenseNet change shape (7x7 to 3x3).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from functools import partial

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ZOO",
    "AnyStage",
    "BasicBlock",
    "Bottleneck",
    "BottleneckTransform",
    "ConcatNet",
    "DenseBlock",
    "DenseLayer",
    "DenseNet",
    "DenseNetBlock",
    "EfficientNet",
    "InvertedResidual",
    "MBConv",
    "MobileNetV2",
    "RegNet",
    "ResBottleneckBlock",
    "ResNet",
    "ResidualBlock",
    "ShuffleInvertedResidual",
    "ShuffleNetV2",
    "SqueezeExcitation",
    "StochasticDepth",
    "Transition",
    "TwoBranchBlock",
    "VGG",
    "channel_shuffle",
    "concat_net",
    "densenet121",
    "efficientnet_b0",
    "mobilenet_v2",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "resnext_small",
    "shufflenet_v2_x1_0",
    "stochastic_depth",
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
                 downsample: nn.Module | None = None, groups: int = 1,
                 base_width: int = 64) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
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
    """1x1 reduce, 3x3 (carrying the stride, as ResNet v1.5) and 1x1 expand to 4 * `width`.

    With `groups` and `base_width` (ResNeXt) the inner width is
    `int(width * base_width / 64) * groups` and the 3x3 convolution is grouped."""

    expansion = 4

    def __init__(self, inp: int, width: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1,
                 base_width: int = 64) -> None:
        super().__init__()
        inner = int(width * (base_width / 64.0)) * groups
        out = width * self.expansion
        self.conv1 = _conv1x1(inp, inner)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = _conv3x3(inner, inner, stride, groups)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = _conv1x1(inner, out)
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
    """A ResNet (or ResNeXt, with `groups` and `width_per_group`) with torchvision's module
    names (conv1, bn1, layer1-4, fc)."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], depths: list[int],
                 num_classes: int = 10, in_channels: int = 3,
                 small_input: bool = False, groups: int = 1,
                 width_per_group: int = 64) -> None:
        super().__init__()
        self.inplanes = 64
        self.groups = groups
        self.base_width = width_per_group
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
        # torchvision's ResNet scheme: Kaiming-normal (fan_out, relu) convs, BN 1/0, the
        # linear layer at PyTorch's default (no zero-init of the last BN)
        _init_conv_bn(self)

    def _stage(self, block: type[BasicBlock] | type[Bottleneck], width: int, depth: int,
               stride: int) -> nn.Sequential:
        out = width * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(_conv1x1(self.inplanes, out, stride),
                                       nn.BatchNorm2d(out))
        layers: list[nn.Module] = [block(self.inplanes, width, stride, downsample,
                                         self.groups, self.base_width)]
        self.inplanes = out
        layers += [block(out, width, groups=self.groups, base_width=self.base_width)
                   for _ in range(1, depth)]
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


def resnext50_32x4d(num_classes: int = 10, in_channels: int = 3,
                    small_input: bool = True) -> ResNet:
    """ResNeXt-50 32x4d (grouped Bottleneck, 3-4-6-3); `small_input` makes the stem a stride-1
    3x3 conv without max pool. 25,028,904 parameters at 1000 classes."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, small_input,
                  groups=32, width_per_group=4)


def resnext_small(num_classes: int = 10, in_channels: int = 3,
                  small_input: bool = True) -> ResNet:
    """A small ResNeXt for fast tests: torchvision's ResNeXt layout with 2-2-2-2 grouped
    bottleneck blocks of 8 groups (4 channels a group at the first stage)."""
    return ResNet(Bottleneck, [2, 2, 2, 2], num_classes, in_channels, small_input,
                  groups=8, width_per_group=4)


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


# ------------------------------------------------------------- shared building blocks


def _conv_norm_act(inp: int, out: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                   activation: Callable[..., nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: conv (padding (kernel - 1) // 2, no bias),
    BatchNorm and, unless `activation` is None, `activation(inplace=True)`."""
    layers: list[nn.Module] = [
        nn.Conv2d(inp, out, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups,
                  bias=False),
        nn.BatchNorm2d(out),
    ]
    if activation is not None:
        layers.append(activation(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision's SqueezeExcitation: global average pool, 1x1 conv `fc1` to `squeeze`
    channels, `activation`, 1x1 conv `fc2` back, `scale_activation`; scales the input."""

    def __init__(self, channels: int, squeeze: int,
                 activation: Callable[..., nn.Module] = nn.ReLU,
                 scale_activation: Callable[..., nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.activation(self.fc1(self.avgpool(x)))
        scale = self.scale_activation(self.fc2(scale))
        return scale * x


def stochastic_depth(input: torch.Tensor, p: float, mode: str,
                     training: bool = True) -> torch.Tensor:
    """Drop whole residual branches with probability `p` while training: per sample
    (`mode="row"`) or for the whole batch (`"batch"`); survivors are scaled by 1 / (1 - p)."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ("batch", "row"):
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input
    survival_rate = 1.0 - p
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device)
    noise = noise.bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


# a leaf for symbolic tracing: one call_function node, its branches are not traced
torch.fx.wrap("stochastic_depth")


class StochasticDepth(nn.Module):
    """`stochastic_depth` as a module (training flag from the module's mode)."""

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(input, self.p, self.mode, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}"


# -------------------------------------------------------------------------- RegNet


class BottleneckTransform(nn.Sequential):
    """RegNet's `f`: 1x1 `a`, grouped 3x3 `b` (carrying the stride), optional
    SqueezeExcitation `se` (RegNetY) and linear 1x1 `c`."""

    def __init__(self, width_in: int, width_out: int, stride: int, group_width: int,
                 bottleneck_multiplier: float, se_ratio: float | None) -> None:
        w_b = int(round(width_out * bottleneck_multiplier))
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["a"] = _conv_norm_act(width_in, w_b, 1)
        layers["b"] = _conv_norm_act(w_b, w_b, 3, stride, groups=w_b // group_width)
        if se_ratio:
            layers["se"] = SqueezeExcitation(w_b, int(round(se_ratio * width_in)), nn.ReLU)
        layers["c"] = _conv_norm_act(w_b, width_out, 1, activation=None)
        super().__init__(layers)


class ResBottleneckBlock(nn.Module):
    """`relu(proj(x) + f(x))`, or `relu(x + f(x))` without projection. `proj` None means
    torchvision's rule: project when the width or the stride changes."""

    def __init__(self, width_in: int, width_out: int, stride: int, group_width: int = 1,
                 bottleneck_multiplier: float = 1.0, se_ratio: float | None = None,
                 proj: bool | None = None) -> None:
        super().__init__()
        if proj is None:
            proj = width_in != width_out or stride != 1
        self.proj: nn.Module | None = (
            _conv_norm_act(width_in, width_out, 1, stride, activation=None) if proj else None)
        self.f = BottleneckTransform(width_in, width_out, stride, group_width,
                                     bottleneck_multiplier, se_ratio)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            x = self.proj(x) + self.f(x)
        else:
            x = x + self.f(x)
        return self.activation(x)


class AnyStage(nn.Sequential):
    """`depth` ResBottleneckBlocks named `block{stage_index}-{i}`; the first carries the
    stride (and the projection `proj_first`, None for torchvision's rule)."""

    def __init__(self, width_in: int, width_out: int, stride: int, depth: int,
                 group_width: int, bottleneck_multiplier: float, se_ratio: float | None,
                 stage_index: int, proj_first: bool | None = None) -> None:
        super().__init__()
        for i in range(depth):
            block = ResBottleneckBlock(width_in if i == 0 else width_out, width_out,
                                       stride if i == 0 else 1, group_width,
                                       bottleneck_multiplier, se_ratio,
                                       proj_first if i == 0 else None)
            self.add_module(f"block{stage_index}-{i}", block)


# torchvision's stage parameters, as its BlockParams.from_init_params quantises them from
# (depth, w_0, w_a, w_m, group width): X-400MF (22, 24, 24.48, 2.54, 16) and Y-400MF
# (16, 48, 27.89, 2.09, 8, SE 0.25); every stage has stride 2 and bottleneck multiplier 1.0.
# (stage depths, stage widths, group width, SE ratio)
_REGNET_X_400MF = ((1, 2, 7, 12), (32, 64, 160, 400), 16, None)
_REGNET_Y_400MF = ((1, 3, 6, 6), (48, 104, 208, 440), 8, 0.25)


class RegNet(nn.Module):
    """RegNet in torchvision's layout (`stem`, `trunk_output.block1-4`, `avgpool`, `fc`);
    `small_input` makes the stem and the first stage stride 1 (keeping its projection)."""

    def __init__(self, depths: tuple[int, ...], widths: tuple[int, ...], group_width: int,
                 se_ratio: float | None = None, num_classes: int = 10, in_channels: int = 3,
                 small_input: bool = True, stem_width: int = 32,
                 bottleneck_multiplier: float = 1.0) -> None:
        super().__init__()
        self.stem = _conv_norm_act(in_channels, stem_width, 3, stride=1 if small_input else 2)
        current = stem_width
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        for i, (depth, width) in enumerate(zip(depths, widths)):
            stride = 1 if small_input and i == 0 else 2
            # every torchvision stage starts with stride 2, hence with a projection
            stages[f"block{i + 1}"] = AnyStage(current, width, stride, depth, group_width,
                                               bottleneck_multiplier, se_ratio, i + 1,
                                               proj_first=True)
            current = width
        self.trunk_output = nn.Sequential(stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(current, num_classes)
        # torchvision's ResNet-style scheme: conv weights N(0, 2 / (k*k*out)) (biases, only
        # in SE, left at PyTorch's default), BN 1/0, linear N(0, 0.01) with zero bias
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.trunk_output(self.stem(x)))
        return self.fc(x.flatten(start_dim=1))


def regnet_x_400mf(num_classes: int = 10, in_channels: int = 3,
                   small_input: bool = True) -> RegNet:
    """RegNetX-400MF (depths 1-2-7-12, widths 32-64-160-400, group width 16);
    5,495,976 parameters at 1000 classes."""
    depths, widths, group_width, se_ratio = _REGNET_X_400MF
    return RegNet(depths, widths, group_width, se_ratio, num_classes, in_channels, small_input)


def regnet_y_400mf(num_classes: int = 10, in_channels: int = 3,
                   small_input: bool = True) -> RegNet:
    """RegNetY-400MF (depths 1-3-6-6, widths 48-104-208-440, group width 8, SE 0.25);
    4,344,144 parameters at 1000 classes."""
    depths, widths, group_width, se_ratio = _REGNET_Y_400MF
    return RegNet(depths, widths, group_width, se_ratio, num_classes, in_channels, small_input)


# -------------------------------------------------------------------- EfficientNet


class MBConv(nn.Module):
    """EfficientNet's block: 1x1 expand (unless the ratio is 1), depthwise conv, SE with
    SiLU (squeeze to input // 4), linear 1x1 projection; stochastic-depth residual."""

    def __init__(self, inp: int, out: int, expand_ratio: float, kernel: int, stride: int,
                 stochastic_depth_prob: float) -> None:
        super().__init__()
        if not 1 <= stride <= 2:
            raise ValueError("illegal stride value")
        self.use_res_connect = stride == 1 and inp == out
        expanded = _make_divisible(inp * expand_ratio, 8)
        layers: list[nn.Module] = []
        if expanded != inp:
            layers.append(_conv_norm_act(inp, expanded, 1, activation=nn.SiLU))
        layers += [
            _conv_norm_act(expanded, expanded, kernel, stride, groups=expanded,
                           activation=nn.SiLU),
            SqueezeExcitation(expanded, max(1, inp // 4), partial(nn.SiLU, inplace=True)),
            _conv_norm_act(expanded, out, 1, activation=None),
        ]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")
        self.out_channels = out

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += input
        return result


# (expand ratio, kernel, first stride, input channels, output channels, layers)
_EFFICIENTNET_B0 = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
]


class EfficientNet(nn.Module):
    """EfficientNet in torchvision's layout (`features`, `avgpool`, `classifier`);
    `small_input` makes the stem and the second stage stride 1, as in `mobilenet_v2`."""

    def __init__(self, setting: list[tuple[int, int, int, int, int, int]],
                 num_classes: int = 10, in_channels: int = 3, small_input: bool = True,
                 dropout: float = 0.2, stochastic_depth_prob: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            _conv_norm_act(in_channels, setting[0][3], 3, stride=1 if small_input else 2,
                           activation=nn.SiLU)
        ]
        total_blocks = sum(row[5] for row in setting)
        block_id = 0
        for row, (t, k, s, inp, out, n) in enumerate(setting):
            if small_input and row == 1:
                s = 1
            stage: list[nn.Module] = []
            for i in range(n):
                sd_prob = stochastic_depth_prob * float(block_id) / total_blocks
                stage.append(MBConv(inp if i == 0 else out, out, t, k, s if i == 0 else 1,
                                    sd_prob))
                block_id += 1
            layers.append(nn.Sequential(*stage))
        last_in = setting[-1][4]
        last_out = 4 * last_in
        layers.append(_conv_norm_act(last_in, last_out, 1, activation=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True),
                                        nn.Linear(last_out, num_classes))
        # torchvision's scheme: conv Kaiming-normal (fan_out), BN 1/0,
        # linear U(-1/sqrt(out), 1/sqrt(out)) with zero bias
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                init_range = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -init_range, init_range)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def efficientnet_b0(num_classes: int = 10, in_channels: int = 3,
                    small_input: bool = True) -> EfficientNet:
    """EfficientNet-B0 (dropout 0.2, stochastic depth 0.2); 5,288,548 parameters at 1000
    classes."""
    return EfficientNet(_EFFICIENTNET_B0, num_classes, in_channels, small_input)


# ------------------------------------------------------------------------ DenseNet


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (to bn_size * growth) on the concatenated previous features, then
    BN-ReLU-3x3 conv to `growth` new channels."""

    def __init__(self, inp: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(inp)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(inp, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        out = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class DenseNetBlock(nn.ModuleDict):
    """`denselayer1..n`, each fed the block input and all earlier layers' outputs; returns
    them all concatenated (inp + n * growth channels)."""

    def __init__(self, num_layers: int, inp: int, bn_size: int, growth_rate: int,
                 drop_rate: float) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}",
                            DenseLayer(inp + i * growth_rate, growth_rate, bn_size, drop_rate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN, ReLU, 1x1 conv and 2x2 average pool between dense blocks."""

    def __init__(self, inp: int, out: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(inp)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(inp, out, 1, bias=False)
        self.pool = nn.AvgPool2d(2, stride=2)


class DenseNet(nn.Module):
    """DenseNet-BC in torchvision's layout (`features.conv0 .. norm5`, `classifier`);
    `small_input` makes `conv0` a stride-1 3x3 conv and `pool0` an identity."""

    def __init__(self, growth_rate: int = 32, block_config: tuple[int, ...] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0,
                 num_classes: int = 10, in_channels: int = 3,
                 small_input: bool = True) -> None:
        super().__init__()
        if small_input:
            conv0 = nn.Conv2d(in_channels, num_init_features, 3, padding=1, bias=False)
            pool0: nn.Module = nn.Identity()
        else:
            conv0 = nn.Conv2d(in_channels, num_init_features, 7, stride=2, padding=3,
                              bias=False)
            pool0 = nn.MaxPool2d(3, stride=2, padding=1)
        self.features = nn.Sequential(OrderedDict([
            ("conv0", conv0),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", pool0),
        ]))
        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", DenseNetBlock(
                num_layers, channels, bn_size, growth_rate, drop_rate))
            channels += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}",
                                         Transition(channels, channels // 2))
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)
        # torchvision's ("official init from torch repo"): conv Kaiming-normal (fan_in),
        # BN 1/0, linear bias 0 (weight left at PyTorch's default)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x), inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        return self.classifier(torch.flatten(out, 1))


def densenet121(num_classes: int = 10, in_channels: int = 3,
                small_input: bool = True) -> DenseNet:
    """DenseNet-121 (growth 32, bn_size 4, blocks 6-12-24-16, 64 initial features);
    7,978,856 parameters at 1000 classes."""
    return DenseNet(32, (6, 12, 24, 16), 64, num_classes=num_classes,
                    in_channels=in_channels, small_input=small_input)


# ------------------------------------------------------------------- ShuffleNetV2


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of `groups` equal groups (view, transpose, view)."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ShuffleInvertedResidual(nn.Module):
    """ShuffleNetV2's unit (torchvision's `InvertedResidual`): at stride 1 half the channels
    pass through and `branch2` transforms the other half; at stride 2 `branch1` and
    `branch2` both downsample the whole input. Concatenated, then channel-shuffled."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        if not 1 <= stride <= 3:
            raise ValueError("illegal stride value")
        self.stride = stride
        branch_features = oup // 2
        if stride == 1 and inp != branch_features << 1:
            raise ValueError(f"Invalid combination of stride {stride}, inp {inp} and oup {oup}"
                             " values. If stride == 1 then inp should be equal to oup // 2 << 1.")
        if stride > 1:
            self.branch1 = nn.Sequential(
                self.depthwise_conv(inp, inp, 3, stride=stride, padding=1),
                nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch_features, 1, bias=False),
                nn.BatchNorm2d(branch_features),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else branch_features, branch_features, 1, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
            self.depthwise_conv(branch_features, branch_features, 3, stride=stride, padding=1),
            nn.BatchNorm2d(branch_features),
            nn.Conv2d(branch_features, branch_features, 1, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
        )

    @staticmethod
    def depthwise_conv(i: int, o: int, kernel_size: int, stride: int = 1, padding: int = 0,
                       bias: bool = False) -> nn.Conv2d:
        """A depthwise convolution (groups = input channels)."""
        return nn.Conv2d(i, o, kernel_size, stride, padding, bias=bias, groups=i)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 in torchvision's layout (`conv1`, `maxpool`, `stage2-4`, `conv5`, `fc`);
    `small_input` makes `conv1` stride 1 and `maxpool` an identity."""

    def __init__(self, stages_repeats: list[int], stages_out_channels: list[int],
                 num_classes: int = 10, in_channels: int = 3,
                 small_input: bool = True) -> None:
        super().__init__()
        if len(stages_repeats) != 3:
            raise ValueError("expected stages_repeats as list of 3 positive ints")
        if len(stages_out_channels) != 5:
            raise ValueError("expected stages_out_channels as list of 5 positive ints")
        self._stage_out_channels = stages_out_channels
        out = stages_out_channels[0]
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, out, 3, 1 if small_input else 2, 1, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU(inplace=True),
        )
        self.maxpool: nn.Module = (nn.Identity() if small_input
                                   else nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.stage2, self.stage3, self.stage4 = (
            nn.Sequential(ShuffleInvertedResidual(i, o, 2),
                          *[ShuffleInvertedResidual(o, o, 1) for _ in range(repeats - 1)])
            for i, o, repeats in zip(stages_out_channels[:3], stages_out_channels[1:4],
                                     stages_repeats)
        )
        inp = stages_out_channels[3]
        out = stages_out_channels[-1]
        self.conv5 = nn.Sequential(
            nn.Conv2d(inp, out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(out, num_classes)
        # torchvision sets no scheme here: PyTorch's default initialisation of each layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.stage4(self.stage3(self.stage2(x)))
        x = self.conv5(x)
        x = x.mean([2, 3])  # global average pool
        return self.fc(x)


def shufflenet_v2_x1_0(num_classes: int = 10, in_channels: int = 3,
                       small_input: bool = True) -> ShuffleNetV2:
    """ShuffleNetV2 x1.0 (repeats 4-8-4, channels 24-116-232-464-1024); 2,278,604
    parameters at 1000 classes."""
    return ShuffleNetV2([4, 8, 4], [24, 116, 232, 464, 1024], num_classes, in_channels,
                        small_input)


ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
    "vgg11_bn": vgg11_bn,
    "concat_net": concat_net,
    "resnext50_32x4d": resnext50_32x4d,
    "resnext_small": resnext_small,
    "regnet_x_400mf": regnet_x_400mf,
    "regnet_y_400mf": regnet_y_400mf,
    "efficientnet_b0": efficientnet_b0,
    "densenet121": densenet121,
}
# ShuffleNetV2 is kept out of the registry: its channel shuffle reshapes the channel axis,
# so the tracer refuses it (the refusal is tested); `tasprune.models.zoo:shufflenet_v2_x1_0`
# still names it for anyone who wants to see that error.
