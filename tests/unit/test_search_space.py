import math

import pytest
import torch

from helpers import space_of
from tasprune.tas.layers import channel_interp, interp_matrix
from tasprune.tas.sampling import gumbel_softmax, gumbel_topk, mean_entropy, tau_at
from tasprune.tas.space import depth_choices, width_choices


def test_width_choices_floor_ratios_dedup_sorted():
    assert width_choices(16) == (4, 6, 8, 9, 11, 12, 14, 16)
    assert width_choices(64) == (19, 25, 32, 38, 44, 51, 57, 64)
    assert width_choices(10) == (3, 4, 5, 6, 7, 8, 9, 10)  # 0.7 * 10 is not 6.99...
    assert width_choices(3) == (1, 2, 3)  # floor(0.9) -> at least 1; duplicates removed
    assert width_choices(16, ratios=(1.0, 0.5)) == (8, 16)


def test_width_choices_multiple_of_8():
    assert width_choices(64, multiple_of=8) == (16, 24, 32, 40, 48, 56, 64)
    assert width_choices(20, multiple_of=8) == (8, 16, 20)  # never above C
    assert width_choices(4, multiple_of=8) == (4,)  # at least 8, but C = 4 caps it
    with pytest.raises(ValueError, match="multiple_of"):
        width_choices(16, multiple_of=0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        width_choices(16, ratios=(0.0, 1.0))


def test_depth_choices():
    assert depth_choices(1) == (1,)
    assert depth_choices(2) == (1, 2)
    assert depth_choices(3) == (1, 2, 3)
    assert depth_choices(4) == (1, 3, 4)
    assert depth_choices(9) == (1, 3, 5, 7, 9)
    assert depth_choices(18) == (1, 3, 5, 7, 9, 11, 13, 15, 17, 18)


@pytest.mark.parametrize("free", [True, False])
def test_space_of_a_model_and_its_extremes(free):
    space = space_of("resnet20", 10, 3, 32, free=free)
    full = space.full
    # free: the stem and every conv a group of its own; coupled: one per residual stream
    assert space.num_groups == (19 if free else 12) and space.num_stages == 3
    assert space.depths == ((1, 2, 3),) * 3
    assert space.smallest().blocks == (1, 1, 1)
    assert all(w == c[0] for w, c in zip(space.smallest().widths, space.widths, strict=True))
    low = space.min_flops_ratio()
    assert 0 < low < 0.1
    assert math.isclose(low, space.smallest().count("flops") / full.count("flops"))
    shape = space.shape([len(c) - 1 for c in space.widths], [2, 2, 2])
    assert shape == full
    assert space.indices_of(shape) == ([len(c) - 1 for c in space.widths], [2, 2, 2])
    with pytest.raises(ValueError, match="not in the search space"):
        space.width_index(0, 5)
    with pytest.raises(ValueError, match="not of this search space"):
        space.indices_of(space_of("resnet20", 10, 3, 32, free=not free).full)


def _padded_logits(rows, cols, gen):
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        mask[r, : 1 + r % cols] = True
    return torch.randn(rows, cols, generator=gen), mask


def test_gumbel_topk_two_distinct_weights_sum_to_one_and_carry_gradients():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 8, generator=gen).requires_grad_()
    mask = torch.ones(50, 8, dtype=torch.bool)
    top = gumbel_topk(logits, mask, tau=5.0, k=2, generator=gen)
    assert top.index.shape == (50, 2)
    assert (top.index[:, 0] != top.index[:, 1]).all()
    assert (top.weight > 0).all()
    assert torch.allclose(top.weight.sum(1), torch.ones(50))
    (top.weight[:, 0] * torch.arange(50.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    hard = gumbel_topk(logits.detach(), mask, tau=1.0, k=1, generator=gen)
    assert hard.index.shape == (50, 1) and torch.equal(hard.weight, torch.ones(50, 1))


def test_gumbel_topk_never_picks_padding_with_weight():
    gen = torch.Generator().manual_seed(1)
    logits, mask = _padded_logits(30, 4, gen)
    for _ in range(5):
        top = gumbel_topk(logits, mask, tau=2.0, k=2, generator=gen)
        picked_real = mask.gather(1, top.index)
        assert ((top.weight > 0) == picked_real).all()  # padding picks have weight 0
        assert torch.allclose(top.weight.sum(1), torch.ones(30))


def test_low_tau_argmax_dominates():
    gen = torch.Generator().manual_seed(2)
    logits = torch.tensor([[0.0, 2.0, 0.5, -1.0]]).repeat(2000, 1)
    mask = torch.ones_like(logits, dtype=torch.bool)
    top = gumbel_topk(logits, mask, tau=0.1, k=2, generator=gen)
    first = top.index.gather(1, top.weight.argmax(1, keepdim=True)).squeeze(1)
    # the heavier candidate is a Gumbel-max sample: choice 1 with prob softmax(logits)[1]
    share = (first == 1).float().mean().item()
    assert abs(share - torch.softmax(logits[0], 0)[1].item()) < 0.05
    assert top.weight.max(1).values.mean() > 0.95  # weights are near one-hot at low tau
    soft = gumbel_softmax(logits, mask, tau=0.1, generator=gen)
    assert soft.max(1).values.mean() > 0.95


def test_tau_schedules():
    assert tau_at(0, 10) == pytest.approx(5.0) and tau_at(9, 10) == pytest.approx(0.1)
    cos = [tau_at(e, 10) for e in range(10)]
    assert all(a > b for a, b in zip(cos, cos[1:], strict=False))
    assert tau_at(5, 11, schedule="linear") == pytest.approx(2.55)
    assert tau_at(5, 11) == pytest.approx(2.55)  # cosine and linear meet half-way
    assert tau_at(2, 11) > tau_at(2, 11, schedule="linear")
    assert tau_at(0, 1) == 5.0
    with pytest.raises(ValueError, match="schedule"):
        tau_at(0, 10, schedule="step")


def test_entropy_of_uniform_and_one_hot():
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    logits = torch.tensor([[0.0, 0, 0, 0], [50.0, -50.0, 7.0, 7.0]])
    assert mean_entropy(logits, mask) == pytest.approx(math.log(4) / 2, abs=1e-6)


def test_cwi_exact_values():
    x = torch.arange(1.0, 4.0).view(1, 3, 1, 1)
    assert torch.equal(channel_interp(x, 3), x)  # c -> c is the identity
    two = torch.tensor([1.0, 5.0]).view(1, 2, 1, 1)
    assert channel_interp(two, 4).flatten().tolist() == [1.0, 1.0, 5.0, 5.0]  # duplicates
    assert channel_interp(x, 2).flatten().tolist() == [1.5, 2.5]  # overlapping ranges 0-1, 1-2
    assert interp_matrix(3, 5).tolist()[1] == [0.5, 0.5, 0.0]  # 1*3/5=0.6 .. 2*3/5=1.2 -> 0, 1


@pytest.mark.parametrize("c_in, c_out", [(5, 13), (13, 5), (7, 7), (1, 4), (11, 16)])
def test_cwi_is_adaptive_average_pooling_along_channels(c_in, c_out):
    x = torch.randn(2, c_in, 3, 3, generator=torch.Generator().manual_seed(c_in))
    ref = torch.nn.functional.adaptive_avg_pool1d(
        x.permute(0, 2, 3, 1).reshape(-1, 1, c_in), c_out
    ).reshape(2, 3, 3, c_out).permute(0, 3, 1, 2)
    assert torch.allclose(channel_interp(x, c_out), ref, atol=1e-6)
