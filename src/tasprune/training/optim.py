"""SGD with Nesterov momentum and a per-step warm-up + cosine learning-rate schedule.

The TAS recipe (training the searched shape, and the weights during search):
SGD lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4, a linear warm-up then
a cosine decay to 0, stepped after every optimiser step (not every epoch), so
short runs and large batches get a smooth schedule.

Weight decay: by default it applies to conv and linear weights only, not to
BatchNorm affine parameters or biases (`decay_norm_and_bias=False`); decaying
those only shrinks a scale the next layer undoes. Pass `True` for the paper
code's behaviour (decay on every parameter).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler


def param_groups(
    model: nn.Module, weight_decay: float, decay_norm_and_bias: bool = False
) -> list[dict[str, object]]:
    """Parameters split into a decayed group (weights of >= 2 dims) and an undecayed one.

    1-D parameters are BatchNorm weights/biases and layer biases. With
    `decay_norm_and_bias` everything is decayed (one group).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_norm_and_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def check_sgd_settings(lr: float, momentum: float, nesterov: bool, weight_decay: float) -> None:
    """Raise a ValueError that says what to change for settings SGD cannot use."""
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"learning rate must be a finite number > 0, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if nesterov and momentum == 0:
        raise ValueError("Nesterov momentum needs momentum > 0; set momentum or nesterov=False")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight decay must be a finite number >= 0, got {weight_decay}")


def make_sgd(
    params: nn.Module | Iterable[torch.Tensor] | list[dict[str, object]],
    lr: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    decay_norm_and_bias: bool = False,
) -> torch.optim.SGD:
    """SGD for a module (weight decay split as in `param_groups`) or explicit params/groups."""
    check_sgd_settings(lr, momentum, nesterov, weight_decay)
    groups = (param_groups(params, weight_decay, decay_norm_and_bias)
              if isinstance(params, nn.Module) else params)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov,
                           weight_decay=weight_decay)


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base lr used by optimiser step `step` (0-based).

    Linear warm-up over the first `warmup_steps` steps (reaching 1 at the last
    warm-up step), then a cosine from 1 down to 0 at `total_steps`.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine(LRScheduler):
    """Per-step linear warm-up then cosine to 0; call `step()` after every optimiser step.

    Its state_dict holds only numbers, so it checkpoints with `weights_only=True`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int,
                 warmup_steps: int = 0) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(
                f"warm-up ({warmup_steps} steps) must be shorter than the run ({total_steps} "
                "steps); use fewer warm-up epochs or more epochs"
            )
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        factor = warmup_cosine_factor(self.last_epoch, self.total_steps, self.warmup_steps)
        return [base * factor for base in self.base_lrs]
