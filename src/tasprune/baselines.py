"""Hand-set pruned shapes to compare TAS against, at the same budget, for any planned
network.

* uniform: one width ratio for every searched channel group (round(r * C), at least
  1), found by bisection;
* l1: a global ranking of the teacher's channels by the mean absolute weight of the
  rows that write them (the L1 norm divided by the row's size, so layers of different
  fan-in compare; `tasprune.net.importance.l1_scores`), dropping the weakest channels
  until the budget is met;
* random: shapes sampled uniformly from the TAS search space (a width choice per group,
  a depth choice per stage); the one with the most FLOPs at or below the target is kept
  (never one above it, so every method meets the same budget).

Depths stay full for uniform and l1 (they prune channels only). All three return a
`PlanShape`; training it (with KD, weight inheritance for l1) is the same recipe as for
a searched shape.

Each method also takes another budget than the FLOPs: `cost` maps a shape to its
cost over the budget (at most 1 when it fits; several budgets: the largest such
ratio, `tasprune.tas.cost.normalized_cost`), and the method keeps the costliest
shape that fits, as it does with the FLOPs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from tasprune.net.importance import l1_scores
from tasprune.net.plan import PlanShape
from tasprune.tas.space import SearchSpace

METHODS = ("uniform", "l1", "random")


Cost = Callable[[PlanShape], float]


def _flops(shape: PlanShape) -> float:
    return shape.count("flops")


def _check_ratio(full: PlanShape, flops_ratio: float, floor: PlanShape, method: str = "",
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
    target = flops_ratio * full.count("flops")
    smallest = floor.count("flops")
    if smallest > target:
        low = smallest / full.count("flops")
        raise ValueError(
            f"flops ratio {flops_ratio} is below the smallest reachable {low:.4f} (of the "
            f"unpruned FLOPs) for {which}; choose a ratio in [{math.ceil(low * 1e4) / 1e4}, 1]"
        )
    return _flops, int(target)


def _sizes(full: PlanShape) -> list[int]:
    return [full.plan.groups[g].size for g in full.plan.searched]


def _scaled(full: PlanShape, ratio: float) -> PlanShape:
    return full.replace(widths=[max(1, int(round(ratio * c))) for c in _sizes(full)])


def _min_widths(full: PlanShape, min_ratio: float) -> list[int]:
    return [max(1, math.ceil(min_ratio * c)) for c in _sizes(full)]


def smallest_shape(method: str, space: SearchSpace, min_ratio: float = 0.1) -> PlanShape:
    """The smallest shape `method` can give: its cost bounds the budgets it can reach."""
    if method == "uniform":
        return _scaled(space.full, 0.0)
    if method == "l1":
        return space.full.replace(widths=_min_widths(space.full, min_ratio))
    if method == "random":
        return space.smallest()
    raise ValueError(f"unknown baseline method {method!r}; expected one of {', '.join(METHODS)}")


def check_method_ratio(method: str, space: SearchSpace, flops_ratio: float,
                       cost: Cost | None = None) -> None:
    """Refuse a budget `method` cannot reach (naming the reachable range), before any
    training."""
    _check_ratio(space.full, flops_ratio, smallest_shape(method, space), method, cost)


def uniform_shape(full: PlanShape, flops_ratio: float, tol: float = 1e-4,
                  cost: Cost | None = None) -> PlanShape:
    """Every group keeps round(r * C) channels; r is the largest with a cost <= target."""
    price, target = _check_ratio(full, flops_ratio, _scaled(full, 0.0), "uniform", cost)
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


def l1_shape(full: PlanShape, teacher: nn.Module, flops_ratio: float, min_ratio: float = 0.1,
             chunk: float = 0.005, cost: Cost | None = None) -> PlanShape:
    """Global L1 ranking: drop the channels whose writers' rows have the smallest mean
    |weight| first (see the module docstring).

    `teacher` is the unpruned network of `full`. Each group keeps at least `min_ratio` of
    its channels. Channels are removed in chunks of `chunk` of all channels, then one at a
    time near the target, until the cost is at or below the target."""
    plan = full.plan
    floor = _min_widths(full, min_ratio)
    price, target = _check_ratio(full, flops_ratio, full.replace(widths=floor), "l1", cost)
    try:
        raw = l1_scores(teacher, plan, normalise=False)
    except AttributeError as exc:
        raise ValueError(f"the teacher is not the unpruned network of this shape ({exc})"
                         ) from None
    scores = []  # (score, position of the group) for every channel
    for i, g in enumerate(plan.searched):
        if g not in raw:
            continue
        if len(raw[g]) != plan.groups[g].size:
            raise ValueError(f"the teacher's {plan.groups[g].name} has {len(raw[g])} "
                             f"channels, the unpruned network {plan.groups[g].size}: a "
                             "checkpoint of another model?")
        scores.extend((float(s), i) for s in raw[g])
    scores.sort()
    widths = list(full.widths)
    step = max(1, int(chunk * len(scores)))
    n_done = 0
    value = price(full)
    while value > target and n_done < len(scores):
        n = step if value > 1.05 * target else 1  # coarse steps far from the target
        taken = 0
        while taken < n and n_done < len(scores):
            _, i = scores[n_done]
            n_done += 1
            if widths[i] > floor[i]:
                widths[i] -= 1
                taken += 1
        value = price(full.replace(widths=widths))
    return full.replace(widths=widths)


def random_shape(space: SearchSpace, flops_ratio: float, samples: int = 1000, seed: int = 0,
                 cost: Cost | None = None) -> PlanShape:
    """The best of `samples` shapes drawn uniformly from the TAS search space.

    Every group draws one of its width choices and every stage one of its depth choices,
    each uniformly. Of the draws at or below `flops_ratio` of the full FLOPs, the one with
    the most FLOPs is kept; draws above the budget are never chosen. Groups the shape does
    not use are set to their full width."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
    price, target = _check_ratio(space.full, flops_ratio, space.smallest(), "random", cost)
    gen = torch.Generator().manual_seed(seed)
    n_widths = torch.tensor([len(c) for c in space.widths])
    n_depths = torch.tensor([len(c) for c in space.depths])
    width_idx = (torch.rand(samples, space.num_groups, generator=gen) * n_widths).long()
    depth_idx = (torch.rand(samples, space.num_stages, generator=gen) * n_depths).long()
    best: tuple[float, PlanShape] | None = None
    for w, d in zip(width_idx.tolist(), depth_idx.tolist(), strict=True):
        shape = _tidy(space.shape(w, d))
        value = price(shape)
        if value <= target and (best is None or value > best[0]):
            best = (value, shape)
    if best is None:
        raise ValueError(
            f"none of {samples} random shapes has at most {flops_ratio} of the FLOPs (the "
            f"smallest shape of the space has {space.min_flops_ratio():.4f}); draw more "
            "samples or use a larger ratio")
    return best[1]


def _tidy(shape: PlanShape) -> PlanShape:
    """`shape` with the widths of the groups it does not use reset to full."""
    used = shape.used_groups()
    full = shape.plan.full().widths
    return shape.replace(widths=[w if i in used else f
                                 for i, (w, f) in enumerate(zip(shape.widths, full,
                                                                strict=True))])
