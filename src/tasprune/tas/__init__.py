"""The TAS algorithm on any layer plan: the space of widths and depths, Gumbel sampling,
the supernet, the cost losses and the derivation of the shape (docs/search.md). The
search loop that runs it is `tasprune.search` (`tasprune.tas.searcher`)."""

from tasprune.tas.cost import FlopLoss, expected_cost, flop_loss, supernet_flop_loss
from tasprune.tas.layers import Arch, channel_interp
from tasprune.tas.sampling import gumbel_softmax, gumbel_topk, tau_at
from tasprune.tas.space import SearchSpace, depth_choices, width_choices
from tasprune.tas.supernet import SuperNet

__all__ = [
    "Arch",
    "FlopLoss",
    "SearchSpace",
    "SuperNet",
    "channel_interp",
    "depth_choices",
    "expected_cost",
    "flop_loss",
    "gumbel_softmax",
    "gumbel_topk",
    "supernet_flop_loss",
    "tau_at",
    "width_choices",
]
