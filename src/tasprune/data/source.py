"""Image sources and batched tensor transforms.

Every dataset is an `ImageSource`: labels known up front, and `batches()` that
yields `(uint8 images [B, C, H, W], int64 labels [B])` in an order fixed by an
explicit `torch.Generator` (so a run is reproducible and an epoch can be
replayed after a resume). Normalisation and augmentation happen afterwards, as
batched tensor ops on whatever device the model runs on (`BatchTransform`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch


class ImageSource(Protocol):
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int: ...

    def batches(
        self,
        batch_size: int,
        *,
        indices: torch.Tensor | None = None,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        train: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of uint8 images and labels, over `indices` (default: all) in order,
        or in the permutation drawn from `generator` when `shuffle`. `train` selects
        the source's own training-time decoding (random resized crops for folders)."""
        ...


class TensorImages:
    """An in-memory dataset: uint8 images [N, C, H, W] and int64 labels [N]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{images.shape[0]} images but labels of shape "
                             f"{tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def batches(
        self,
        batch_size: int,
        *,
        indices: torch.Tensor | None = None,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        train: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in index_batches(len(self), batch_size, indices=indices, shuffle=shuffle,
                                 generator=generator, drop_last=drop_last):
            yield self.images[idx], self.labels[idx]


def index_batches(
    n: int,
    batch_size: int,
    *,
    indices: torch.Tensor | None = None,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> list[torch.Tensor]:
    """The example indices of every batch of an `ImageSource.batches` call, in order."""
    order = torch.arange(n) if indices is None else indices
    if shuffle:
        order = order[torch.randperm(len(order), generator=generator)]
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    return [order[start:start + batch_size] for start in range(0, stop, batch_size)]


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def per_class_split(
    labels: torch.Tensor, fraction: float = 0.5, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into two disjoint parts holding `fraction` / the rest of every class."""
    first, second = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        k = int(round(fraction * len(idx)))
        first.append(idx[:k])
        second.append(idx[k:])
    return torch.sort(torch.cat(first)).values, torch.sort(torch.cat(second)).values


@dataclass(frozen=True)
class BatchTransform:
    """uint8 batch -> normalised float batch, with optional training augmentation.

    Augmentation (train=True): random crop with zero padding `pad` and random
    horizontal flip, drawn per image from `generator` on the CPU and applied as
    tensor ops on the batch's device.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int = 4
    flip: bool = True

    def __call__(self, images: torch.Tensor, train: bool = False,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.float().div_(255)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std  # padding below is then zero = the mean colour
        if train:
            x = self.augment(x, generator)
        return x

    def augment(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.pad > 0:
            p = self.pad
            shifts = torch.randint(0, 2 * p + 1, (2, n), generator=generator).to(x.device)
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            rows = (torch.arange(h, device=x.device)[None, :] + shifts[0][:, None])  # [n, h]
            cols = (torch.arange(w, device=x.device)[None, :] + shifts[1][:, None])  # [n, w]
            batch = torch.arange(n, device=x.device)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
            x = x.permute(0, 3, 1, 2)
        if self.flip:
            flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x.contiguous()


@dataclass(frozen=True)
class DataBundle:
    """A dataset ready for training: both splits, its size and its transform."""

    name: str
    train: ImageSource
    test: ImageSource
    num_classes: int
    in_channels: int
    resolution: int
    transform: BatchTransform
    class_names: tuple[str, ...] | None = None
