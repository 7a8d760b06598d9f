"""ResNet families built from a Shape, and the name registry."""

from tasprune.models.registry import build_model, create_model, list_models
from tasprune.models.resnet import ResNet

__all__ = ["ResNet", "build_model", "create_model", "list_models"]
