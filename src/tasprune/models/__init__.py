"""The networks tasprune knows by name (built-in ResNets, the zoo), the factories users
bring, and the `Shape` view of the built-in ResNets."""

from tasprune.models.network import build_model, create_model
from tasprune.models.registry import list_models
from tasprune.models.resnet import ResNet
from tasprune.models.shape import Shape, paper_shape, paper_shape_names

__all__ = ["ResNet", "Shape", "build_model", "create_model", "list_models", "paper_shape",
           "paper_shape_names"]
