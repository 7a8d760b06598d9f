"""The ResNet of both families (small-image and ImageNet), built from a Shape.

The two families differ only in their stem (3x3 conv vs 7x7 stride-2 conv and
max pool), base widths and whether the strided projection has BN; those are
constants of `tasprune.models.families`. One definition serves the unpruned network
and every pruned one, with stable parameter names (torchvision style: conv1,
bn1, layerN.M.convK, layerN.M.downsample, fc) so checkpoints load across
versions.
"""

from __future__ import annotations

import torch
from torch import nn

from tasprune.models.blocks import BLOCKS
from tasprune.models.shape import Shape


class ResNet(nn.Module):
    def __init__(self, shape: Shape) -> None:
        super().__init__()
        skel = shape.skeleton
        spec = skel.family
        k = spec.stem_kernel
        self.conv1 = nn.Conv2d(shape.in_channels, shape.widths[0], k, stride=spec.stem_stride,
                               padding=k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(shape.widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1) if spec.stem_pool else nn.Identity()
        block_cls = BLOCKS[shape.block]
        in_ch = shape.widths[0]
        for s, stage in enumerate(skel.stages):
            blocks = []
            for blk in stage[: shape.blocks[s]]:
                widths = tuple(shape.widths[c.slot] for c in blk.convs)
                blocks.append(block_cls(in_ch, widths, blk.stride, blk.shortcut_bn))  # type: ignore[arg-type]
                in_ch = widths[-1]
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.num_stages = len(skel.stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, shape.num_classes)
        self._init(linear=False)  # the classifier has just initialised itself

    def reset_parameters(self) -> None:
        """He et al. 2015 ("Delving deep into rectifiers") for convs, as torchvision; BN 1
        and 0; the classifier as nn.Linear initialises itself."""
        self._init(linear=True)

    def _init(self, linear: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and linear:
                m.reset_parameters()

    def stage_modules(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{s + 1}") for s in range(self.num_stages)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stage_modules():
            x = stage(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)
