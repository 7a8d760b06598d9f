"""Gumbel sampling of widths and depths, and the temperature schedule.

All distributions of one kind are batched in one padded matrix of logits
`[rows, max_choices]` with a boolean `mask` of the real choices, so one call
samples every conv slot (or every stage) at once.

Widths (`gumbel_topk`): `z = (log_softmax(a) + g) / tau` with Gumbel noise
`g`; `k` distinct candidates are drawn without replacement from `softmax(z)`
(as a Gumbel top-k of `z` with fresh noise, which is exactly sequential
sampling without replacement; Kool et al., ICML 2019); their mixing weights
are the softmax of `z` restricted to the chosen ones, so gradients reach the
logits through the weights. `k = 1` is a hard sample (weight 1, no gradient).

Depths (`gumbel_softmax`): all choices kept with weights `softmax(z)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("cosine", "linear")


def masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise log-softmax over the real choices; padding gets -inf."""
    return torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=1)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise probabilities over the real choices; padding gets exactly 0."""
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=1)


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean (over rows) entropy in nats of the distributions softmax(logits), differentiable
    (0 for no rows: a network without a stage of skippable blocks has no depth row)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    logp = masked_log_softmax(logits, mask)
    return -(logp.exp() * logp.masked_fill(~mask, 0.0)).sum(dim=1).mean()


def mean_entropy(logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean (over rows) entropy in nats of the distributions softmax(logits)."""
    return float(entropy(logits.detach(), mask))


def gumbel_noise(shape: tuple[int, ...], like: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel noise -log(-log(u)), finite (u kept away from 0 and 1)."""
    u = torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)
    tiny = torch.finfo(like.dtype).tiny
    return -torch.log(-torch.log(u.clamp_(min=tiny, max=1.0 - 1e-7)))


@dataclass(frozen=True)
class TopK:
    """Sampled candidates per row: choice `index` [rows, k] and mixing `weight` [rows, k].

    A row with fewer than k real choices gets padding picks of weight exactly 0.
    """

    index: torch.Tensor
    weight: torch.Tensor


def gumbel_topk(logits: torch.Tensor, mask: torch.Tensor, tau: float, k: int = 2,
                generator: torch.Generator | None = None) -> TopK:
    """Draw k distinct candidates per row from softmax((log_softmax(a) + g) / tau)."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if k < 1:
        raise ValueError(f"the number of sampled candidates k must be >= 1, got {k}")
    z = (masked_log_softmax(logits, mask) + gumbel_noise(logits.shape, logits, generator)) / tau
    with torch.no_grad():
        keys = z + gumbel_noise(logits.shape, logits, generator)
        index = keys.masked_fill(~mask, float("-inf")).topk(min(k, logits.shape[1]), dim=1)[1]
    weight = torch.softmax(z.gather(1, index), dim=1)
    return TopK(index=index, weight=weight)


def gumbel_softmax(logits: torch.Tensor, mask: torch.Tensor, tau: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Soft Gumbel sample over every real choice: softmax((log_softmax(b) + g) / tau)."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    z = masked_log_softmax(logits, mask) + gumbel_noise(logits.shape, logits, generator)
    return torch.softmax(z / tau, dim=1)


def tau_at(epoch: int, epochs: int, tau_max: float = 5.0, tau_min: float = 0.1,
           schedule: str = "cosine") -> float:
    """Temperature of epoch `epoch` (0-based): tau_max at the first, tau_min at the last."""
    if schedule not in SCHEDULES:
        raise ValueError(f"tau schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    frac = epoch / (epochs - 1) if epochs > 1 else 0.0
    frac = min(max(frac, 0.0), 1.0)
    if schedule == "linear":
        return tau_max - (tau_max - tau_min) * frac
    return tau_min + 0.5 * (tau_max - tau_min) * (1.0 + math.cos(math.pi * frac))
