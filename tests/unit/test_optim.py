import math

import pytest
import torch

from tasprune import create_model
from tasprune.checkpoint import load_checkpoint, save_checkpoint
from tasprune.training.optim import WarmupCosine, make_sgd, param_groups, warmup_cosine_factor


def _lrs(total, warmup, base=0.1):
    model = torch.nn.Linear(2, 2)
    opt = make_sgd(model, lr=base)
    sched = WarmupCosine(opt, total_steps=total, warmup_steps=warmup)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_warmup_is_linear_then_cosine_to_zero():
    lrs = _lrs(total=20, warmup=4)
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    # cosine: 1 at the first step after warm-up, half way at the middle, to 0 at the end
    assert lrs[4] == pytest.approx(0.1)
    assert lrs[4 + 8] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert warmup_cosine_factor(20, 20, 4) == pytest.approx(0.0)


def test_no_warmup_starts_at_base_lr():
    assert _lrs(total=5, warmup=0)[0] == pytest.approx(0.1)


def test_scheduler_state_survives_a_weights_only_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = make_sgd(model)
    sched = WarmupCosine(opt, total_steps=10, warmup_steps=3)
    for _ in range(4):
        opt.step()
        sched.step()
    save_checkpoint(tmp_path / "s.pt", {"s": sched.state_dict(), "o": opt.state_dict()})
    state = load_checkpoint(tmp_path / "s.pt")
    opt2 = make_sgd(torch.nn.Linear(2, 2))
    sched2 = WarmupCosine(opt2, total_steps=10, warmup_steps=3)
    opt2.load_state_dict(state["o"])
    sched2.load_state_dict(state["s"])
    opt.step()
    sched.step()
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_param_groups_skip_decay_on_bn_and_bias():
    model = create_model("resnet8", num_classes=3, in_channels=1, resolution=8)
    decay, no_decay = param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() > 1 for p in decay["params"])
    assert any(p is model.bn1.weight for p in no_decay["params"])
    assert any(p is model.fc.bias for p in no_decay["params"])
    n = sum(1 for _ in model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n
    (everything,) = param_groups(model, 5e-4, decay_norm_and_bias=True)
    assert len(everything["params"]) == n


def test_sgd_settings_and_validation():
    opt = make_sgd(torch.nn.Linear(2, 2))
    group = opt.param_groups[0]
    assert group["momentum"] == 0.9 and group["nesterov"] and group["lr"] == 0.1
    with pytest.raises(ValueError, match="learning rate"):
        make_sgd(torch.nn.Linear(2, 2), lr=0)
    with pytest.raises(ValueError, match="Nesterov"):
        make_sgd(torch.nn.Linear(2, 2), momentum=0.0)
    with pytest.raises(ValueError, match="warm-up"):
        WarmupCosine(opt, total_steps=5, warmup_steps=5)
