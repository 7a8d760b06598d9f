"""Where a phase runs: device names, mixed precision, and whether a network fits the data."""

from __future__ import annotations

import torch

from tasprune.data.source import DataBundle
from tasprune.net.plan import PlanShape

AMP_CHOICES = ("auto", "off", "bf16", "fp16")


def parse_device(name: str) -> torch.device:
    """A torch device from its name; one PyTorch cannot use is a ValueError naming it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not one tasprune can run on; use 'auto', "
                         "'cpu', 'cuda' or 'cuda:N'")
    return device


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; a CUDA device that is absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = parse_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine; "
                         "use --device cpu")
    return device


def resolve_amp(amp: str, device: torch.device) -> str:
    if amp != "auto":
        return amp
    if device.type != "cuda":
        return "off"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def check_fits_data(shape: PlanShape, data: DataBundle, what: str) -> None:
    """Classes and input channels of a network must be the dataset's."""
    if shape.num_classes != data.num_classes or shape.in_channels != data.in_channels:
        raise ValueError(
            f"the {what} has {shape.num_classes} classes and {shape.in_channels} input channels "
            f"but the data {data.name!r} has {data.num_classes} classes and {data.in_channels} "
            "channels; use the data the network was made for, or search and train it again "
            "for this data")


