"""The costs of the searched distributions and the cost (FLOP) loss.

A cost's expectation is the same count as its exact value (`tasprune.net.plan.plan_cost`
for FLOPs and parameters, a latency table's sum for latency), fed with
`WidthDist(choices, softmax(a_g))` per searched group and `DepthDist(choices,
softmax(b_s))` per stage: it depends on the logits only (no forward pass) and is
differentiable. Computed in float64 so that one-hot logits reproduce the integer count
exactly.

FLOP loss (the paper's): with F_cur the exact FLOPs of the current argmax shape,
F_tgt = ratio * F_full and t = tolerance * F_full, the loss is log E[F] when
F_cur > F_tgt (push the cost down), -log E[F] when F_cur < F_tgt - t (push it
up), and 0 inside the band [F_tgt - t, F_tgt]. The default search compares E[F]
itself with the band instead of F_cur (`by="expected"`): the argmax jumps while
the distributions are wide, and with it the sign of the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tasprune.net.plan import (
    DepthDist,
    LayerPlan,
    PlanShape,
    WidthDist,
    expected_plan_flops,
    expected_plan_params,
)
from tasprune.tas.sampling import masked_softmax
from tasprune.tas.space import SearchSpace
from tasprune.tas.supernet import Distributions

Expectation = Callable[[LayerPlan, Sequence[WidthDist], Sequence[DepthDist]], torch.Tensor]


def distributions_of(space: SearchSpace, width_logits: torch.Tensor,
                     depth_logits: torch.Tensor, width_mask: torch.Tensor,
                     depth_mask: torch.Tensor) -> tuple[list[WidthDist], list[DepthDist]]:
    """The width and depth distributions of the logits, in float64."""
    wp = masked_softmax(width_logits.double(), width_mask)
    dp = masked_softmax(depth_logits.double(), depth_mask)
    widths = [WidthDist(values=wp.new_tensor(c), probs=wp[g, : len(c)])
              for g, c in enumerate(space.widths)]
    depths = [DepthDist(choices=c, probs=dp[s, : len(c)]) for s, c in enumerate(space.depths)]
    return widths, depths


def expected_cost(space: SearchSpace, width_logits: torch.Tensor, depth_logits: torch.Tensor,
                  width_mask: torch.Tensor, depth_mask: torch.Tensor,
                  expectation: Expectation | None = None) -> torch.Tensor:
    """E[cost] (float64 tensor, differentiable w.r.t. the logits); the cost is FLOPs unless
    another `expectation` (e.g. `Budget.expected`) is given."""
    widths, depths = distributions_of(space, width_logits, depth_logits, width_mask,
                                      depth_mask)
    return (expectation or expected_plan_flops)(space.plan, widths, depths)


def supernet_expected_flops(net: Distributions) -> torch.Tensor:
    """E[FLOPs] of a supernet's current distributions."""
    return expected_cost(net.space, net.width_logits, net.depth_logits, net.width_mask,
                         net.depth_mask)


@dataclass(frozen=True)
class FlopLoss:
    """The FLOP loss and what it was computed from (FLOPs as multiply-accumulates)."""

    loss: torch.Tensor  # 0-dim, differentiable
    expected: float  # E[F] under the current distributions
    current: float  # exact cost (FLOPs) of the argmax shape
    target: float  # ratio * F_full
    tolerance: float  # tolerance * F_full
    direction: int  # +1: above target (shrink), -1: below the band (grow), 0: inside


def flop_loss(expected: torch.Tensor, current: float, full: float, ratio: float,
              tolerance: float = 0.05, argmax_weight: float = 1.0) -> FlopLoss:
    """The FLOP loss from E[F] (tensor) and the argmax shape's exact FLOPs `current`.

    Its direction comes from `argmax_weight * current + (1 - argmax_weight) * E[F]`: 1
    is the paper's rule (the argmax, which jumps while the distributions are flat and
    flips the loss's sign from step to step around the band), 0 the expected FLOPs
    (smooth in the logits, but below the argmax's while the distributions have tails)."""
    target, tol = ratio * full, tolerance * full
    if not 0 <= argmax_weight <= 1:
        raise ValueError(f"argmax_weight must be in [0, 1], got {argmax_weight}")
    where = argmax_weight * current + (1 - argmax_weight) * float(expected.detach())
    if where > target:
        direction, loss = 1, torch.log(expected)
    elif where < target - tol:
        direction, loss = -1, -torch.log(expected)
    else:
        direction, loss = 0, expected.new_zeros(())
    return FlopLoss(loss=loss, expected=float(expected.detach()), current=current,
                    target=target, tolerance=tol, direction=direction)


def supernet_flop_loss(net: Distributions, ratio: float, tolerance: float = 0.05,
                       full_flops: int | None = None, argmax_weight: float = 1.0
                       ) -> FlopLoss:
    """FLOP loss of a supernet on E[F], its direction from the argmax shape's exact FLOPs
    and E[F] (see `flop_loss`)."""
    full = net.space.full.count("flops") if full_flops is None else full_flops
    return flop_loss(supernet_expected_flops(net), net.derive().count("flops"), full, ratio,
                     tolerance, argmax_weight)


@dataclass(frozen=True)
class Budget:
    """One budget of the search: a cost (`exact` of a shape, `expected` under the width
    and depth distributions, in the same unit), the unpruned network's cost `full`, and
    the fraction `ratio` of it the derived shape may cost."""

    name: str  # "flops", "params", "latency@<batch>"
    ratio: float
    full: float
    exact: Callable[[PlanShape], float]
    expected: Expectation

    @property
    def target(self) -> float:
        return self.ratio * self.full

    def fraction(self, shape: PlanShape) -> float:
        """The shape's cost as a fraction of the unpruned network's."""
        return self.exact(shape) / self.full


def _flops(shape: PlanShape) -> float:
    return shape.count("flops")


def _params(shape: PlanShape) -> float:
    return shape.count("params")


def flops_budget(full: PlanShape, ratio: float) -> Budget:
    return Budget("flops", ratio, full.count("flops"), _flops, expected_plan_flops)


def params_budget(full: PlanShape, ratio: float) -> Budget:
    return Budget("params", ratio, full.count("params"), _params, expected_plan_params)


def normalized_cost(budgets: Sequence[Budget]) -> Callable[[PlanShape], float]:
    """The largest of a shape's costs over their targets: at most 1 when the shape meets
    every budget."""
    return lambda shape: max(b.exact(shape) / b.target for b in budgets)


def band_floor(budgets: Sequence[Budget], tolerance: float) -> float:
    """The normalized cost above which a shape is in the band of its loosest budget:
    [ratio - tolerance, ratio] of the unpruned cost, divided by ratio."""
    return min(1 - tolerance / b.ratio for b in budgets)


@dataclass(frozen=True)
class BudgetLoss:
    """The summed loss of every budget, each budget's `FlopLoss`, and the direction of the
    most violated one (+1 one is over its target, -1 one is below its band, else 0)."""

    loss: torch.Tensor
    parts: dict[str, FlopLoss]

    @property
    def direction(self) -> int:
        directions = [p.direction for p in self.parts.values()]
        return 1 if 1 in directions else -1 if -1 in directions else 0


def supernet_budget_loss(net: Distributions, budgets: Sequence[Budget],
                         tolerance: float = 0.05, argmax_weight: float = 1.0) -> BudgetLoss:
    """The loss of `flop_loss` for every budget (its cost in place of the FLOPs), summed."""
    shape = net.derive()
    parts = {}
    for b in budgets:
        expected = expected_cost(net.space, net.width_logits, net.depth_logits, net.width_mask,
                                 net.depth_mask, b.expected)
        parts[b.name] = flop_loss(expected, b.exact(shape), b.full, b.ratio, tolerance,
                                  argmax_weight)
    loss = sum((p.loss for p in parts.values()), start=torch.zeros((), dtype=torch.float64,
                                                                  device=net.width_logits.device))
    return BudgetLoss(loss=loss, parts=parts)
