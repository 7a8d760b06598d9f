"""Deriving the searched shape: the most probable shape, moved into the FLOP band.

The argmax of every distribution is the paper's derived shape. After a short
search its FLOPs can lie outside the band [target - tolerance, target]; then
`derive_in_band` walks from it to the in-band shape that stays closest to the
learned distributions, one choice at a time:

1. while above the target, take the narrowing move (one group one width choice
   down, or one stage one depth choice down) that gives up the least
   log-probability per FLOP saved, unless a move that reaches the target gives up
   no more log-probability than that one: then the cheapest such move;
2. while below the band, take the widening move that gives up the least
   log-probability per FLOP gained among those that stay at or under the target,
   then (also after step 1) any widening move that fits and makes the shape more
   probable, so an overshoot of step 1 is taken back;
3. if still below the band, take the widening move that adds the most FLOPs
   without passing the target, until in the band or no move fits.

4. with `fill` (the default search's), use the rest of the budget: take the widening
   move that gives up the least log-probability per FLOP gained, as long as one fits
   under the target (a user who asks for half the FLOPs gets a network of about half,
   not anywhere in the band).

Step 1 ends at or under the target whenever the space reaches it (if it gets
stuck it restarts from the smallest shape), and steps 2-4 never pass the target,
so the derived shape never exceeds the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tasprune.net.plan import PlanShape
from tasprune.tas.sampling import masked_log_softmax
from tasprune.tas.space import SearchSpace


@dataclass(frozen=True)
class Derived:
    """The derived shape, the argmax shape it came from, and whether it had to move."""

    shape: PlanShape
    argmax: PlanShape
    flops: int
    argmax_flops: int
    adjusted: bool


def _rows(logits: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    logp = masked_log_softmax(logits.detach().double().cpu(), mask.cpu())
    return [row[: int(m.sum())] for row, m in zip(logp.tolist(), mask.cpu(), strict=True)]


def derive_in_band(space: SearchSpace, width_logits: torch.Tensor, depth_logits: torch.Tensor,
                   width_mask: torch.Tensor, depth_mask: torch.Tensor, ratio: float,
                   tolerance: float, fill: bool = False,
                   cost: tuple[Callable[[PlanShape], float], float, float] | None = None
                   ) -> Derived:
    """The argmax shape, or the closest in-band shape when the argmax is outside the band
    [ratio - tolerance, ratio] (fractions of the unpruned FLOPs); with `fill`, then widened
    until no widening move fits under the target (see the module docstring).

    `cost` = (cost of a shape, target, band floor) walks on another cost than the FLOPs
    (several budgets: `cost.normalized_cost`); `ratio` and `tolerance` are then unused."""
    wlp, dlp = _rows(width_logits, width_mask), _rows(depth_logits, depth_mask)
    if cost is None:
        full = space.full.count("flops")
        price: Callable[[PlanShape], float] = _flops
        target, low = ratio * full, (ratio - tolerance) * full
    else:
        price, target, low = cost
    wi = [max(range(len(r)), key=r.__getitem__) for r in wlp]
    di = [max(range(len(r)), key=r.__getitem__) for r in dlp]

    argmax = space.shape(wi, di)
    argmax_cost = price(argmax)
    c = argmax_cost
    shape_moved = c > target
    if c > target:
        wi, di, c = _walk(space, price, wi, di, c, wlp, dlp, -1, lambda f: f > target,
                          lambda f: True)
        if c > target:  # stuck: start again from the smallest shape
            wi, di = [0] * len(wi), [0] * len(di)
            c = price(space.shape(wi, di))
    if c < low or shape_moved:
        wi, di, c = _walk(space, price, wi, di, c, wlp, dlp, +1, lambda f: f < low,
                          lambda f: f <= target)
    if c < low:
        wi, di, c = _walk(space, price, wi, di, c, wlp, dlp, +1, lambda f: f < low,
                          lambda f: f <= target, greedy_flops=True)
    if fill:
        wi, di, c = _walk(space, price, wi, di, c, wlp, dlp, +1, lambda f: True,
                          lambda f: f <= target)
    shape = space.shape(wi, di)
    return Derived(shape=shape, argmax=argmax, flops=shape.count("flops"),
                   argmax_flops=argmax.count("flops"), adjusted=shape != argmax)


def _flops(shape: PlanShape) -> float:
    return shape.count("flops")


def _walk(space: SearchSpace, price: Callable[[PlanShape], float], wi: list[int], di: list[int],
          flops: float, wlp: list[list[float]], dlp: list[list[float]], step: int,
          go_on: Callable[[float], bool], allowed: Callable[[float], bool],
          greedy_flops: bool = False) -> tuple[list[int], list[int], float]:
    """Move one choice at a time by `step` (-1 narrower, +1 wider) while `go_on(flops)`,
    each time the allowed move with the best log-probability per FLOP (or, with
    `greedy_flops`, the most FLOPs; `price` is the cost, FLOPs by default); then,
    widening, go on with the allowed moves that make the shape more probable (back towards
    the argmax after an overshoot); stop when no move is left."""
    wi, di = list(wi), list(di)
    while True:
        free_only = not go_on(flops)
        if free_only and (step < 0 or greedy_flops):
            break
        used = space.used(space.shape(wi, di))
        best: tuple[float, float, list[int], list[int], int] | None = None
        moves: list[tuple[list[int], list[int], float]] = []
        for s in sorted(used):
            j = wi[s] + step
            if 0 <= j < len(wlp[s]):
                moves.append(([*wi[:s], j, *wi[s + 1:]], di, wlp[s][wi[s]] - wlp[s][j]))
        for s in range(len(di)):
            j = di[s] + step
            if 0 <= j < len(dlp[s]):
                moves.append((wi, [*di[:s], j, *di[s + 1:]], dlp[s][di[s]] - dlp[s][j]))
        finish: tuple[float, list[int], list[int], int] | None = None
        for w, d, cost in moves:
            f = price(space.shape(w, d))
            gain = (f - flops) * step  # FLOPs moved in the wanted direction
            if gain <= 0 or not allowed(f) or (free_only and cost >= 0):
                continue
            key = (-gain, 0.0) if greedy_flops else (cost / gain, -gain)
            if best is None or key < best[:2]:
                best = (*key, w, d, f)
            if not free_only and not go_on(f) and (finish is None or cost < finish[0]):
                finish = (cost, w, d, f)
        if best is None:
            break
        if finish is not None and not greedy_flops and finish[0] <= best[0] * (
                (best[4] - flops) * step):
            # one move gets there and gives up no more than the best-ratio move: take it
            # (a small overshoot is undone by the cheapest sufficient move, not by the
            # move that saves the most per log-probability)
            wi, di, flops = finish[1], finish[2], finish[3]
            continue
        wi, di, flops = best[2], best[3], best[4]
    return wi, di, flops
