import math

import pytest
import torch
import torch.nn.functional as F

from tasprune import create_model
from tasprune.training.distill import DistillConfig, distill_loss, kd_term, teacher_logits


def _logits(seed, n=6, c=5):
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * 3


def test_alpha_zero_is_cross_entropy():
    s, t, y = _logits(0), _logits(1), torch.tensor([0, 1, 2, 3, 4, 0])
    parts = distill_loss(s, y, t, DistillConfig(alpha=0.0))
    assert torch.allclose(parts.total, F.cross_entropy(s, y))
    assert parts.kd > 0  # still reported


def test_no_teacher_is_cross_entropy_with_zero_kd():
    s, y = _logits(0), torch.tensor([0, 1, 2, 3, 4, 0])
    parts = distill_loss(s, y, None, DistillConfig())
    assert torch.allclose(parts.total, F.cross_entropy(s, y)) and parts.kd.item() == 0.0
    smooth = distill_loss(s, y, None, DistillConfig(label_smoothing=0.1))
    assert torch.allclose(smooth.task, F.cross_entropy(s, y, label_smoothing=0.1))


def test_identical_logits_give_zero_kd():
    s = _logits(0)
    assert kd_term(s, s.clone(), 4.0).abs().item() < 1e-6


def test_matches_hand_computation():
    s, t, y = _logits(0, n=2, c=3), _logits(1, n=2, c=3), torch.tensor([2, 0])
    T, alpha = 3.0, 0.7
    kl = 0.0
    for i in range(2):
        ps = [math.exp(v / T) for v in s[i].tolist()]
        pt = [math.exp(v / T) for v in t[i].tolist()]
        ps = [p / sum(ps) for p in ps]
        pt = [p / sum(pt) for p in pt]
        kl += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    kl /= 2
    ce = 0.0
    for i in range(2):
        row = s[i].tolist()
        ce -= row[y[i]] - math.log(sum(math.exp(v) for v in row))
    ce /= 2
    parts = distill_loss(s, y, t, DistillConfig(alpha=alpha, temperature=T))
    assert parts.kd.item() == pytest.approx(T * T * kl, rel=1e-5)
    assert parts.task.item() == pytest.approx(ce, rel=1e-5)
    assert parts.total.item() == pytest.approx((1 - alpha) * ce + alpha * T * T * kl, rel=1e-5)


@pytest.mark.parametrize("T", [1.0, 4.0, 10.0])
def test_kd_gradient_is_T_times_probability_gap(T):
    # d/ds [T^2 KL(p_t || p_s)] = T * (p_s - p_t) / batch: the T^2 factor keeps the
    # gradient's scale from collapsing as 1/T^2
    s, t = _logits(0).requires_grad_(True), _logits(1)
    kd_term(s, t, T).backward()
    expected = T * (F.softmax(s.detach() / T, 1) - F.softmax(t / T, 1)) / s.shape[0]
    assert torch.allclose(s.grad, expected, atol=1e-6)


def test_teacher_runs_in_eval_mode_without_grad():
    teacher = create_model("resnet8", num_classes=3, in_channels=1, resolution=8)
    teacher.train()
    before = teacher.bn1.running_mean.clone()
    out = teacher_logits(teacher, torch.randn(4, 1, 8, 8))
    assert not teacher.training and not out.requires_grad
    assert torch.equal(teacher.bn1.running_mean, before)


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": 1.5}, "alpha"), ({"temperature": 0.0}, "temperature"),
    ({"label_smoothing": 1.0}, "smoothing"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**kwargs)
