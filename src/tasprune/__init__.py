"""tasprune: prune CNNs to a FLOP budget by Transformable Architecture Search."""

__version__ = "0.1.0"

from tasprune.data import DataBundle, DataError, load_data  # noqa: E402
from tasprune.export import load_pruned  # noqa: E402
from tasprune.flops import count_flops, count_params, layer_table  # noqa: E402
from tasprune.hub import from_pretrained, save_pretrained  # noqa: E402
from tasprune.models import build_model, create_model, list_models  # noqa: E402
from tasprune.shape import Shape, paper_shape, paper_shape_names  # noqa: E402

__all__ = [
    "DataBundle",
    "DataError",
    "Shape",
    "__version__",
    "build_model",
    "count_flops",
    "count_params",
    "create_model",
    "from_pretrained",
    "layer_table",
    "list_models",
    "load_data",
    "load_pruned",
    "paper_shape",
    "paper_shape_names",
    "save_pretrained",
]
