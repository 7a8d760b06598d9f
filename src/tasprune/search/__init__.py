"""TAS search: the space of widths and depths, Gumbel sampling, the supernet, the FLOP
loss, the alternating search loop and the derivation of the shape (docs/search.md)."""

from tasprune.search.cost import FlopLoss, expected_cost, flop_loss, supernet_flop_loss
from tasprune.search.sampling import gumbel_softmax, gumbel_topk, tau_at
from tasprune.search.searcher import SearchConfig, SearchResult, check_budget, search
from tasprune.search.space import SearchSpace, depth_choices, width_choices
from tasprune.search.supernet import Arch, SuperNet, channel_interp

__all__ = [
    "Arch",
    "FlopLoss",
    "SearchConfig",
    "SearchResult",
    "SearchSpace",
    "SuperNet",
    "channel_interp",
    "check_budget",
    "depth_choices",
    "expected_cost",
    "flop_loss",
    "gumbel_softmax",
    "gumbel_topk",
    "search",
    "supernet_flop_loss",
    "tau_at",
    "width_choices",
]
