"""The ResNet of both families (small-image and ImageNet), built from a Shape.

The two families differ only in their stem (3x3 conv vs 7x7 stride-2 conv and
max pool), base widths and whether the strided projection has BN; those are
constants of `tasprune.families`. One definition serves the unpruned network
and every pruned one, with stable parameter names (torchvision style: conv1,
bn1, layerN.M.convK, layerN.M.downsample, fc) so checkpoints load across
versions.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from tasprune.models.blocks import BLOCKS
from tasprune.shape import Shape


class ResNet(nn.Module):
    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.shape = shape
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
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, shape.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He et al. 2015 ("Delving deep into rectifiers") for convs, as torchvision
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stage_modules(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{s + 1}") for s in range(len(self.shape.blocks))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stage_modules():
            x = stage(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> Any:
        """Save in Hugging Face Hub layout (see `tasprune.hub.save_pretrained`)."""
        from tasprune.hub import save_pretrained

        return save_pretrained(self, save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], **kwargs: Any) -> ResNet:
        """Load a local directory or Hub repository (see `tasprune.hub.from_pretrained`)."""
        from tasprune.hub import from_pretrained

        return from_pretrained(name_or_path, **kwargs)
