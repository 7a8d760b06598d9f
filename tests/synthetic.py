"""A tiny learnable image dataset for training tests (no files, no network)."""

from __future__ import annotations

import torch

from tasprune.data.source import BatchTransform, DataBundle, TensorImages


def synthetic_bundle(n_train: int = 96, n_test: int = 48, classes: int = 3, size: int = 12,
                     channels: int = 1, seed: int = 0) -> DataBundle:
    """Each class is a fixed random pattern plus noise, shared by both splits."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.rand(classes, channels, size, size, generator=gen)

    def split(n: int) -> TensorImages:
        labels = torch.arange(n) % classes
        noise = torch.rand(n, channels, size, size, generator=gen)
        images = (patterns[labels] * 180 + noise * 75).round().to(torch.uint8)
        return TensorImages(images, labels)

    return DataBundle(name="synthetic", train=split(n_train), test=split(n_test),
                      num_classes=classes, in_channels=channels, resolution=size,
                      transform=BatchTransform(mean=(0.5,) * channels, std=(0.25,) * channels,
                                               pad=1))


def brightness_bundle(n: int = 96, classes: int = 4, res: int = 8, seed: int = 0
                      ) -> DataBundle:
    """Random RGB images whose class sets the mean brightness of one channel (learnable);
    the same images serve as both splits."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = torch.randint(0, 120, (n, 3, res, res), generator=gen)
    images[:, 0] += (labels * 40)[:, None, None]
    src = TensorImages(images.clamp(0, 255).to(torch.uint8), labels)
    return DataBundle(name="tiny", train=src, test=src, num_classes=classes, in_channels=3,
                      resolution=res, transform=BatchTransform((0.5,) * 3, (0.25,) * 3, pad=1))
