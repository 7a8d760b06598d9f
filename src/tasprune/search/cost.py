"""Expected FLOPs of the searched distributions and the FLOP loss.

The expectation is `tasprune.flops.expected_flops`, the same layer walk as the
exact count, fed with `WidthDist(choices, softmax(a_l))` per conv slot and
`DepthDist(choices, softmax(b_s))` per stage: it depends on the logits only
(no forward pass) and is differentiable. Computed in float64 so that one-hot
logits reproduce the integer count exactly.

FLOP loss (the paper's): with F_cur the exact FLOPs of the current argmax shape,
F_tgt = ratio * F_full and t = tolerance * F_full, the loss is log E[F] when
F_cur > F_tgt (push the cost down), -log E[F] when F_cur < F_tgt - t (push it
up), and 0 inside the band [F_tgt - t, F_tgt]. The default search compares E[F]
itself with the band instead of F_cur (`by="expected"`): the argmax jumps while
the distributions are wide, and with it the sign of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tasprune.flops import DepthDist, WidthDist, count_flops, expected_flops
from tasprune.search.sampling import masked_softmax
from tasprune.search.space import SearchSpace
from tasprune.search.supernet import SuperNet


def expected_cost(space: SearchSpace, width_logits: torch.Tensor, depth_logits: torch.Tensor,
                  width_mask: torch.Tensor, depth_mask: torch.Tensor) -> torch.Tensor:
    """E[FLOPs] (float64 tensor, differentiable w.r.t. the logits)."""
    wp = masked_softmax(width_logits.double(), width_mask)
    dp = masked_softmax(depth_logits.double(), depth_mask)
    dists = [WidthDist(values=wp.new_tensor(c), probs=wp[s, : len(c)])
             for s, c in enumerate(space.widths)]
    # tied slots share one distribution object: `flops` sees they are one variable
    widths = [dists[t] for t in space.ties]
    depths = [DepthDist(choices=c, probs=dp[s, : len(c)]) for s, c in enumerate(space.depths)]
    return expected_flops(space.full.skeleton, widths, depths)


def supernet_expected_flops(net: SuperNet) -> torch.Tensor:
    """E[FLOPs] of a supernet's current distributions."""
    return expected_cost(net.space, net.width_logits, net.depth_logits, net.width_mask,
                         net.depth_mask)


@dataclass(frozen=True)
class FlopLoss:
    """The FLOP loss and what it was computed from (FLOPs as multiply-accumulates)."""

    loss: torch.Tensor  # 0-dim, differentiable
    expected: float  # E[F] under the current distributions
    current: int  # exact FLOPs of the argmax shape
    target: float  # ratio * F_full
    tolerance: float  # tolerance * F_full
    direction: int  # +1: above target (shrink), -1: below the band (grow), 0: inside


def flop_loss(expected: torch.Tensor, current: int, full: int, ratio: float,
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


def supernet_flop_loss(net: SuperNet, ratio: float, tolerance: float = 0.05,
                       full_flops: int | None = None, argmax_weight: float = 1.0
                       ) -> FlopLoss:
    """FLOP loss of a supernet on E[F], its direction from the argmax shape's exact FLOPs
    and E[F] (see `flop_loss`)."""
    full = count_flops(net.space.full) if full_flops is None else full_flops
    return flop_loss(supernet_expected_flops(net), count_flops(net.derive()), full, ratio,
                     tolerance, argmax_weight)
