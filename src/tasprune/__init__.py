"""tasprune: prune CNNs to a FLOP, parameter or latency budget by Transformable
Architecture Search.

Every network, built-in or your own, is described by its layer plan (`LayerPlan`,
traced by torch.fx) and pruned to a `PlanShape`. The phases and the whole job, as the
command line runs them: `prune(config, out_dir)` (teacher, search, KD training,
evaluation, report), `search(network, data, config, out_dir)` and
`train(target, data, config, out_dir)`, each configured by its dataclass
(`PruneConfig`, `SearchConfig`, `TrainConfig`; the command line's flags are generated
from their fields). A module of your own in Python: `prune_model(model, data,
flops_ratio=0.5)`. Any saved model: `load_model(dir)`.
"""

from tasprune._version import __version__
from tasprune.data import DataBundle, DataError, load_data
from tasprune.export import load_model, load_pruned, load_pruned_model, load_shape
from tasprune.flops import count_flops, count_params, layer_table
from tasprune.hub import from_pretrained, save_pretrained
from tasprune.models import Shape, create_model, list_models, paper_shape, paper_shape_names
from tasprune.models.network import build_model, to_view
from tasprune.net.plan import LayerPlan, ModelSpec, PlanShape
from tasprune.net.trace import PlanError, channelwise, trace_plan
from tasprune.pipeline import load_prune_config, prune, prune_model
from tasprune.settings import PruneConfig, SearchConfig, TrainConfig
from tasprune.tas.searcher import SearchResult, search
from tasprune.training.distill import distill_loss
from tasprune.training.trainer import TrainResult, train

__all__ = [
    "DataBundle",
    "DataError",
    "LayerPlan",
    "ModelSpec",
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
    "channelwise",
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
    "load_shape",
    "paper_shape",
    "paper_shape_names",
    "prune",
    "prune_model",
    "save_pretrained",
    "search",
    "to_view",
    "trace_plan",
    "train",
]
