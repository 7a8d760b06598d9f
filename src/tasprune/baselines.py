"""Hand-set pruned shapes to compare TAS against, at the same FLOP budget.

* uniform: one width ratio for every conv, found by bisection;
* l1: a global ranking of the teacher's filters by mean absolute weight (the
  L1 norm divided by the filter's size, so layers of different fan-in compare),
  dropping the weakest filters until the FLOP budget is met;
* random: shapes sampled uniformly from the TAS search space (a width choice per
  conv slot, a depth choice per stage); the one with the most FLOPs at or below
  the target is kept (never one above it, so every method meets the same budget).

Depths stay full for uniform and l1 (they prune channels only). All three
return a `Shape`; training it (with KD, weight inheritance for l1) is the same
recipe as for a searched shape.

Each method also takes another budget than the FLOPs: `cost` maps a shape to its
cost over the budget (at most 1 when it fits; several budgets: the largest such
ratio, `tasprune.tas.cost.normalized_cost`), and the method keeps the costliest
shape that fits, as it does with the FLOPs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from tasprune.flops import count_flops
from tasprune.shape import Shape
from tasprune.tas.space import DEFAULT_RATIOS, SearchSpace, used_slots

METHODS = ("uniform", "l1", "random")


Cost = Callable[[Shape], float]


def _check_ratio(full: Shape, flops_ratio: float, floor: Shape, method: str = "",
                 cost: Cost | None = None) -> tuple[Cost, float]:
    """The price of a shape and the target it must stay at or under (FLOPs, or `cost`
    and 1), after checking that `floor`, the method's smallest shape, fits."""
    which = f"{'the ' + method + ' method' if method else 'this method'}"
    if cost is not None:
        if cost(floor) > 1:
            raise ValueError(f"the budget cannot be reached by {which}: its smallest shape "
                             f"costs {cost(floor):.3f} of the budget")
        return cost, 1.0
    if not (math.isfinite(flops_ratio) and 0 < flops_ratio <= 1):
        raise ValueError(f"flops ratio must be in (0, 1], got {flops_ratio}")
    target = flops_ratio * count_flops(full)
    smallest = count_flops(floor)
    if smallest > target:
        low = smallest / count_flops(full)
        raise ValueError(
            f"flops ratio {flops_ratio} is below the smallest reachable {low:.4f} (of the "
            f"unpruned FLOPs) for {which}; choose a ratio in [{math.ceil(low * 1e4) / 1e4}, 1]"
        )
    return count_flops, int(target)


def smallest_shape(method: str, full: Shape, ratios: Sequence[float] = DEFAULT_RATIOS,
                   multiple_of: int = 1, min_ratio: float = 0.1) -> Shape:
    """The smallest shape `method` can give: its FLOPs bound the budgets it can reach."""
    if method == "uniform":
        return _scaled(full, 0.0)
    if method == "l1":
        return full.replace(widths=_min_widths(full, min_ratio))
    if method == "random":
        return SearchSpace.from_shape(full, ratios, multiple_of).smallest()
    raise ValueError(f"unknown baseline method {method!r}; expected one of {', '.join(METHODS)}")


def check_method_ratio(method: str, full: Shape, flops_ratio: float,
                       ratios: Sequence[float] = DEFAULT_RATIOS, multiple_of: int = 1,
                       cost: Cost | None = None) -> None:
    """Refuse a budget `method` cannot reach (naming the reachable range), before any training."""
    _check_ratio(full, flops_ratio, smallest_shape(method, full, ratios, multiple_of), method,
                 cost)


def _scaled(full: Shape, ratio: float) -> Shape:
    widths = tuple(max(1, int(round(ratio * w))) for w in full.full_widths)
    return full.replace(widths=widths, blocks=full.depths)


def uniform_shape(full: Shape, flops_ratio: float, tol: float = 1e-4,
                  cost: Cost | None = None) -> Shape:
    """Every conv keeps round(r * C) channels; r is the largest with FLOPs <= target."""
    price, target = _check_ratio(full, flops_ratio, smallest_shape("uniform", full),
                                 "uniform", cost)
    lo, hi = 0.0, 1.0
    if price(_scaled(full, hi)) <= target:
        return _scaled(full, hi)
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if price(_scaled(full, mid)) <= target:
            lo = mid
        else:
            hi = mid
    return _scaled(full, lo)


def _min_widths(full: Shape, min_ratio: float) -> tuple[int, ...]:
    return tuple(max(1, math.ceil(min_ratio * w)) for w in full.full_widths)


def l1_shape(full: Shape, teacher_state: Mapping[str, torch.Tensor], flops_ratio: float,
             min_ratio: float = 0.1, chunk: float = 0.005, cost: Cost | None = None
             ) -> Shape:
    """Global L1-norm ranking: drop the filters with the smallest mean |weight| first.

    `teacher_state` is the state dict of the full network (`build_model(full)`).
    Each conv keeps at least `min_ratio` of its channels. Filters are removed in
    chunks of `chunk` of all filters, then one at a time near the target, until
    the FLOPs are at or below `flops_ratio` of the full network's.
    """
    floor = _min_widths(full, min_ratio)
    price, target = _check_ratio(full, flops_ratio, full.replace(widths=floor), "l1", cost)
    scores = []  # (score, slot) for every filter
    for slot, name in enumerate(_slot_weight_names(full)):
        if name not in teacher_state:
            raise ValueError(f"teacher state has no {name!r}: not a state dict of "
                             f"{full.describe()}")
        weight = teacher_state[name].float()
        if weight.shape[0] != full.full_widths[slot]:
            raise ValueError(f"teacher {name} has {weight.shape[0]} filters, the full "
                             f"network {full.full_widths[slot]}: a checkpoint of another model?")
        per_filter = weight.abs().flatten(1).mean(1)
        scores.extend((float(s), slot) for s in per_filter)
    scores.sort()
    widths = list(full.full_widths)
    step = max(1, int(chunk * len(scores)))
    i = 0
    flops = price(full)
    while flops > target and i < len(scores):
        n = step if flops > 1.05 * target else 1  # coarse steps far from the target
        taken = 0
        while taken < n and i < len(scores):
            _, slot = scores[i]
            i += 1
            if widths[slot] > floor[slot]:
                widths[slot] -= 1
                taken += 1
        flops = price(full.replace(widths=tuple(widths)))
    return full.replace(widths=tuple(widths))


def _slot_weight_names(full: Shape) -> list[str]:
    """State-dict key of the conv weight of every slot of the full network."""
    names = ["conv1.weight"]
    for s, stage in enumerate(full.skeleton.stages):
        for blk in stage:
            names.extend(f"layer{s + 1}.{blk.index}.conv{j + 1}.weight"
                         for j in range(len(blk.convs)))
    return names


def random_shape(full: Shape, flops_ratio: float, samples: int = 1000, seed: int = 0,
                 ratios: Sequence[float] = DEFAULT_RATIOS, multiple_of: int = 1,
                 coupled: bool = False, cost: Cost | None = None) -> Shape:
    """The best of `samples` shapes drawn uniformly from the TAS search space.

    Every conv slot draws one of its width choices and every stage one of its
    depth choices, each uniformly (`ratios`/`multiple_of`/`coupled` as in
    `SearchSpace.from_shape`: with `coupled` a residual stream draws once). Of the
    draws at or below `flops_ratio` of the full FLOPs, the one with the most FLOPs is
    kept; draws above the budget are never chosen. Slots of dropped blocks are set to
    their full width (they are unused).
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
    space = SearchSpace.from_shape(full, ratios, multiple_of, coupled)
    price, target = _check_ratio(full, flops_ratio, space.smallest(), "random", cost)
    gen = torch.Generator().manual_seed(seed)
    n_widths = torch.tensor([len(c) for c in space.widths])
    n_depths = torch.tensor([len(c) for c in space.depths])
    width_idx = (torch.rand(samples, space.num_slots, generator=gen) * n_widths).long()
    depth_idx = (torch.rand(samples, space.num_stages, generator=gen) * n_depths).long()
    best: tuple[float, Shape] | None = None
    for w, d in zip(width_idx.tolist(), depth_idx.tolist(), strict=True):
        shape = _tidy(space.shape(w, d))
        flops = price(shape)
        if flops <= target and (best is None or flops > best[0]):
            best = (flops, shape)
    if best is None:
        raise ValueError(
            f"none of {samples} random shapes has at most {flops_ratio} of the FLOPs (the "
            f"smallest shape of the space has {space.min_flops_ratio():.4f}); draw more "
            "samples or use a larger ratio")
    return best[1]


def _tidy(shape: Shape) -> Shape:
    """`shape` with the widths of dropped blocks' slots reset to full (they are unused)."""
    used = used_slots(shape)
    widths = tuple(w if s in used else f
                   for s, (w, f) in enumerate(zip(shape.widths, shape.full_widths, strict=True)))
    return shape.replace(widths=widths)
