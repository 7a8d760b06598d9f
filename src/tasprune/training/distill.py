"""Knowledge distillation (Hinton et al., 2015), as used by TAS to train the searched shape.

    loss = (1 - alpha) * CE(y, s) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

`s` are the student's logits, `t` the teacher's. The T^2 factor keeps the KD
gradient's magnitude independent of T (the softened softmax scales gradients by
1/T^2); it is applied here and nowhere else. Without a teacher the loss is the
plain (optionally label-smoothed) cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DistillConfig:
    """KD weight `alpha` in [0, 1], temperature `temperature` > 0, CE label smoothing."""

    alpha: float = 0.9
    temperature: float = 4.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"KD alpha must be in [0, 1] (0 = no distillation), got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"KD temperature must be > 0 (4 is the TAS default), "
                             f"got {self.temperature}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass(frozen=True)
class LossParts:
    """The named parts of a training loss; `total` is what gets back-propagated."""

    task: torch.Tensor
    kd: torch.Tensor
    total: torch.Tensor


def kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
    return kl * temperature**2


def distill_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    config: DistillConfig,
) -> LossParts:
    """(1 - alpha) * CE + alpha * KD with a teacher; plain CE (alpha ignored) without."""
    task = F.cross_entropy(student_logits.float(), labels,
                           label_smoothing=config.label_smoothing)
    if teacher_logits is None:
        return LossParts(task=task, kd=task.new_zeros(()), total=task)
    kd = kd_term(student_logits, teacher_logits.detach(), config.temperature)
    total = (1.0 - config.alpha) * task + config.alpha * kd
    return LossParts(task=task, kd=kd, total=total)


def teacher_logits(teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The teacher's logits, in eval mode (BN running stats untouched) and without grad."""
    if teacher.training:
        teacher.eval()
    with torch.no_grad():
        return teacher(images)
