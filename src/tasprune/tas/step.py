"""What one search step computes: (1) SGD on the supernet's weights with a batch of the
"train" half, (2) Adam on the architecture logits with a batch of the "valid" half
(cross-entropy + lambda * the budgets' cost loss). docs/search.md explains the two
relaxations; the loop that runs the steps is `tasprune.tas.searcher`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tasprune.dist import Dist
from tasprune.net.plan import PlanShape, expected_plan_flops
from tasprune.phase import check_step
from tasprune.settings import SearchConfig
from tasprune.tas.cost import Budget, BudgetLoss, supernet_budget_loss
from tasprune.tas.layers import Arch
from tasprune.tas.sampling import entropy
from tasprune.tas.supernet import SuperNet
from tasprune.training.distill import DistillConfig, distill_loss, teacher_logits
from tasprune.training.loop import autocast_for


@contextmanager
def _grad_only(train: Sequence[torch.nn.Parameter], frozen: Sequence[torch.nn.Parameter]
               ) -> Iterator[None]:
    """Let autograd skip the gradients of `frozen` (they are not stepped here)."""
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)

def _backward(loss: torch.Tensor, opt: torch.optim.Optimizer,
              scaler: torch.amp.GradScaler | None, dist: Dist,
              params: Sequence[torch.nn.Parameter], at: tuple[int, int]) -> None:
    """Backward (scaled when `scaler`, then unscaled), gradients averaged over ranks; a
    NaN/inf loss on any rank raises `NonFiniteLoss` first."""
    check_step(loss, dist, "search", at)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    dist.average_gradients(params)


def _optimizer_step(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """The step (skipped by the scaler when fp16 gradients overflowed)."""
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()


@dataclass(frozen=True)
class StepOut:
    """What one search step reports: the FLOP loss (None for a weight-only step),
    [train loss sum, train correct, train images, valid loss sum, valid correct, valid
    images, FLOP loss, architecture steps] as a float64 tensor."""

    flop: BudgetLoss | None
    stats: torch.Tensor


STATS = 8  # entries of StepOut.stats


def weight_loss(logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor,
                teacher: nn.Module | None, config: SearchConfig) -> torch.Tensor:
    """The weight step's loss: KD from the teacher's logits on the same images (in-place
    distillation, `config.kd_alpha` > 0 and a teacher given), else cross-entropy."""
    if teacher is None or config.kd_alpha == 0:
        return F.cross_entropy(logits, labels)
    soft = teacher_logits(teacher, images)
    return distill_loss(logits, labels, soft,
                        DistillConfig(config.kd_alpha, config.kd_temperature)).total


def weight_step_arch(net: SuperNet, config: SearchConfig, tau: float,
                generator: torch.Generator | None) -> Arch:
    """The architecture of a weight step: a Gumbel sample; with the "expected" relaxation
    one width per group (a real sub-network's widths, channels kept in place), with
    "gumbel" (the paper) `topk` candidates mixed by channel-wise interpolation."""
    if config.relaxation == "expected":
        return net.sample(tau, 1, generator, pad=True)
    return net.sample(tau, config.topk, generator)


def arch_step_arch(net: SuperNet, config: SearchConfig, tau: float,
              generator: torch.Generator | None) -> Arch:
    """The architecture of an architecture step: with the "expected" relaxation every
    choice weighted by its probability, no noise (`SuperNet.expected`); with "gumbel"
    (the paper) a Gumbel sample as in the weight step."""
    if config.relaxation == "expected":
        return net.expected()
    return net.sample(tau, config.topk, generator)


def search_step(net: SuperNet, train: tuple[torch.Tensor, torch.Tensor],
                valid: tuple[torch.Tensor, torch.Tensor], w_opt: torch.optim.Optimizer,
                a_opt: torch.optim.Optimizer, config: SearchConfig, tau: float,
                generator: torch.Generator | None, budgets: Sequence[Budget] | int, *,
                teacher: nn.Module | None = None, arch_step: bool = True,
                entropy_weight: float = 0.0, argmax_weight: float = 1.0,
                dist: Dist | None = None, at: tuple[int, int] = (0, 0),
                amp: str = "off", scalers: Sequence[torch.amp.GradScaler] = ()
                ) -> StepOut:
    """(1) SGD on the weights with a train batch (`weight_loss`), then, when `arch_step`,
    (2) Adam on the logits with a valid batch (CE + lambda * the loss of every budget,
    `cost.supernet_budget_loss`; an int `budgets` is the unpruned FLOPs of a FLOP budget
    at `config.flops_ratio`); fresh Gumbel samples for each forward.

    Each step computes only the gradients it applies: the logits are frozen in (1),
    the weights in (2) (autograd then skips the weight gradients of every conv).
    Under `dist` the gradients are averaged over ranks before each optimiser step. A
    NaN/inf loss on any rank raises `NonFiniteLoss` (at = 1-based epoch and step) before
    its optimiser step.

    `amp` ("off", "bf16", "fp16") runs both forwards under autocast; the FLOP loss and
    the entropy stay in float32/float64 outside it. With fp16, `scalers` (one
    GradScaler per optimiser) scale each loss before its backward."""
    dist = dist or Dist()
    (xt, yt), (xv, yv) = train, valid
    weights, arch = net.weight_parameters(), net.arch_parameters()
    w_scaler, a_scaler = scalers if scalers else (None, None)
    with _grad_only(weights, arch):
        with autocast_for(amp, xt.device):
            out_t = net(xt, weight_step_arch(net, config, tau, generator))
            loss_t = weight_loss(out_t, yt, xt, teacher, config)
        w_opt.zero_grad(set_to_none=True)
        _backward(loss_t, w_opt, w_scaler, dist, weights, at)
        _optimizer_step(w_opt, w_scaler)
    fl = None
    zero = loss_t.new_zeros((), dtype=torch.float64)
    valid_stats = [zero] * 5
    if arch_step:
        with _grad_only(arch, weights):
            with autocast_for(amp, xv.device):
                out_v = net(xv, arch_step_arch(net, config, tau, generator))
                loss_v = F.cross_entropy(out_v, yv).float()
            if isinstance(budgets, int):  # the unpruned FLOPs: no count every step
                budgets = [Budget("flops", config.flops_ratio or 1.0, budgets, PlanShape.flops,
                                  expected_plan_flops)]
            fl = supernet_budget_loss(net, budgets, config.tolerance, argmax_weight)
            loss_a = loss_v + config.flop_weight * fl.loss
            if entropy_weight > 0:
                loss_a = loss_a + entropy_weight * (
                    entropy(net.width_logits, net.width_mask)
                    + entropy(net.depth_logits, net.depth_mask))
            a_opt.zero_grad(set_to_none=True)
            _backward(loss_a, a_opt, a_scaler, dist, arch, at)
            _optimizer_step(a_opt, a_scaler)
        with torch.no_grad():
            valid_stats = [loss_v.double() * len(yv), (out_v.argmax(1) == yv).sum().double(),
                           zero + len(yv), fl.loss.double().to(zero.device), zero + 1]
    with torch.no_grad():
        stats = torch.stack([loss_t.double() * len(yt), (out_t.argmax(1) == yt).sum().double(),
                             zero + len(yt), *valid_stats])
    return StepOut(flop=fl, stats=stats)
