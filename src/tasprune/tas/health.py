"""How healthy a search is: the accuracy of the shape it would derive now.

The supernet's own accuracy during the search is that of sampled mixtures of
sub-networks, which says little about the one network the search hands over.
`subnet_accuracy` cuts that network out of the supernet (`SuperNet.subnet`),
re-estimates its BatchNorm statistics on a few training batches (the running
statistics a supernet keeps are shared by many sub-networks and fit none of
them), and measures its accuracy on held-out images.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from tasprune.data.source import DataBundle
from tasprune.net.plan import PlanShape
from tasprune.tas.supernet import SuperNet


def recalibrate_bn(model: nn.Module, images: Iterable[torch.Tensor]) -> None:
    """Replace every BatchNorm's running statistics by their plain average over the
    batches `images` (a train-mode forward without gradients); leaves `model` in eval
    mode with the BatchNorm momenta it had."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for x in images:
            model(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


def accuracy(model: nn.Module, data: DataBundle, indices: torch.Tensor, batch_size: int,
             device: torch.device) -> float:
    """Top-1 accuracy (a fraction) of `model` in its current mode on training images
    `indices`, without augmentation."""
    correct = 0
    with torch.no_grad():
        for images, labels in data.train.batches(batch_size, indices=indices):
            x = data.transform(images.to(device))
            correct += int((model(x).argmax(1) == labels.to(device)).sum())
    return correct / max(len(indices), 1)


def subnet_accuracy(net: SuperNet, shape: PlanShape, data: DataBundle, calibrate: torch.Tensor,
                    held_out: torch.Tensor, batch_size: int) -> float:
    """Accuracy on training images `held_out` of the pruned network of `shape` cut from
    the supernet, its BatchNorm statistics re-estimated on training images `calibrate`."""
    device = net.width_logits.device
    model = net.subnet(shape)
    batches = (data.transform(images.to(device)) for images, _ in
               data.train.batches(batch_size, indices=calibrate))
    recalibrate_bn(model, batches)
    return accuracy(model, data, held_out, batch_size, device)


@dataclass
class Health:
    """The per-epoch check of a search: the argmax shape's accuracy on `held_out`
    (validation-half images) after BatchNorm recalibration on `calibrate` (train-half
    images), next to the teacher's accuracy on the same images (None: no teacher)."""

    data: DataBundle
    calibrate: torch.Tensor
    held_out: torch.Tensor
    batch_size: int
    teacher_acc: float | None = None

    def measure(self, net: SuperNet, shape: PlanShape) -> dict[str, float]:
        out = {"subnet_acc": subnet_accuracy(net, shape, self.data, self.calibrate,
                                             self.held_out, self.batch_size)}
        if self.teacher_acc is not None:
            out["teacher_acc"] = self.teacher_acc
        return out
