"""tasprune: prune CNNs to a FLOP, parameter or latency budget by Transformable
Architecture Search.

The three phases and the whole job, as the command line runs them:
`prune(config, out_dir)` (teacher, search, KD training, evaluation, report),
`search(shape_full, data, config, out_dir)` and `train(shape, data, config, out_dir)`,
each configured by its dataclass (`PruneConfig`, `SearchConfig`, `TrainConfig`; the
command line's flags are generated from their fields).

A network of your own (any CNN torch.fx can trace): `prune_model(model, data,
flops_ratio=0.5)`, and `load_pruned_model(dir, factory)` to load the result.
"""

__version__ = "0.1.0"

from tasprune.custom import load_pruned_model, plan_of, prune_model  # noqa: E402
from tasprune.data import DataBundle, DataError, load_data  # noqa: E402
from tasprune.export import load_model, load_pruned  # noqa: E402
from tasprune.flops import count_flops, count_params, layer_table  # noqa: E402
from tasprune.hub import from_pretrained, save_pretrained  # noqa: E402
from tasprune.models import build_model, create_model, list_models  # noqa: E402
from tasprune.pipeline import load_prune_config, prune  # noqa: E402
from tasprune.plan import LayerPlan, PlanShape  # noqa: E402
from tasprune.settings import PruneConfig, SearchConfig, TrainConfig  # noqa: E402
from tasprune.shape import Shape, paper_shape, paper_shape_names  # noqa: E402
from tasprune.tas.searcher import SearchResult, search  # noqa: E402
from tasprune.trace import PlanError  # noqa: E402
from tasprune.training.distill import distill_loss  # noqa: E402
from tasprune.training.trainer import TrainResult, train  # noqa: E402

__all__ = [
    "DataBundle",
    "DataError",
    "LayerPlan",
    "PlanError",
    "PlanShape",
    "PruneConfig",
    "SearchConfig",
    "SearchResult",
    "Shape",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "build_model",
    "count_flops",
    "count_params",
    "create_model",
    "distill_loss",
    "from_pretrained",
    "layer_table",
    "list_models",
    "load_data",
    "load_model",
    "load_prune_config",
    "load_pruned",
    "load_pruned_model",
    "paper_shape",
    "paper_shape_names",
    "plan_of",
    "prune",
    "prune_model",
    "save_pretrained",
    "search",
    "train",
]
