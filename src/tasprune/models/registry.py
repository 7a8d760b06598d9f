"""Model names -> networks."""

from __future__ import annotations

from tasprune.families import MODELS
from tasprune.models.resnet import ResNet
from tasprune.shape import Shape


def build_model(shape: Shape) -> ResNet:
    """The network a Shape describes (full or pruned), freshly initialised."""
    return ResNet(shape)


def create_model(
    name: str,
    num_classes: int | None = None,
    in_channels: int | None = None,
    resolution: int | None = None,
) -> ResNet:
    """The unpruned network of a registered name, e.g. create_model("resnet56", num_classes=10).

    Names: see list_models(); small-image ResNets of other depths as
    "cifar-resnet<D>" (basic, D = 6n+2) or "cifar-resnet<D>-bottleneck" (D = 9n+2).
    """
    return ResNet(Shape.full(name, num_classes=num_classes, in_channels=in_channels,
                             resolution=resolution))


def list_models() -> list[str]:
    """Registered model names by family (small-image ResNets first, then ImageNet ones),
    then by depth: resnet8 before resnet20 before resnet110."""
    def key(name: str) -> tuple[str, int, str]:
        digits = "".join(c for c in name if c.isdigit())
        return MODELS[name][0], int(digits or 0), name

    return sorted(MODELS, key=key)
