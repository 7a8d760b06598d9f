import pytest
import torch

from helpers import network
from tasprune import count_flops
from tasprune.tas.derive import derive_in_band
from tasprune.tas.space import SearchSpace
from tasprune.tas.supernet import SuperNet


def _net(name: str) -> SuperNet:
    """The supernet of the paper's (free) space: one group per conv, in slot order."""
    model, plan = network(name, 10, 3, 8)
    return SuperNet(SearchSpace.from_plan(plan), model)


def _derive(net: SuperNet, ratio: float, tolerance: float = 0.05):
    return derive_in_band(net.space, net.width_logits, net.depth_logits, net.width_mask,
                          net.depth_mask, ratio, tolerance)


def test_an_argmax_inside_the_band_is_kept():
    net = _net("resnet14")
    full = count_flops(net.space.full)
    ratio = count_flops(net.derive()) / full + 0.01  # band [ratio - 0.05, ratio] holds it
    d = _derive(net, ratio)
    assert not d.adjusted and d.shape == d.argmax == net.derive()
    assert d.flops == d.argmax_flops == count_flops(net.derive())


@pytest.mark.parametrize("name", ["resnet14", "resnet20", "cifar-resnet11-bottleneck"])
def test_the_derived_shape_never_exceeds_the_target_and_lands_in_the_band(name):
    net = _net(name)
    full = count_flops(net.space.full)
    gen = torch.Generator().manual_seed(0)
    for trial in range(12):
        with torch.no_grad():
            scale = 0.1 if trial % 3 == 0 else 3.0  # nearly uniform, and peaked
            net.width_logits.copy_(torch.randn(net.width_logits.shape, generator=gen) * scale)
            net.depth_logits.copy_(torch.randn(net.depth_logits.shape, generator=gen) * scale)
        for ratio in (0.25, 0.5, 0.75):
            d = _derive(net, ratio)
            assert d.flops == count_flops(d.shape)
            assert d.flops <= ratio * full, (trial, ratio)
            assert d.flops >= (ratio - 0.05) * full, (trial, ratio, d.flops / full)
            assert d.adjusted == (d.shape != d.argmax)


def test_the_move_gives_up_the_least_likely_choices():
    # every slot's argmax is its widest choice, but one slot is nearly indifferent: that
    # slot (not the confident ones) is narrowed first
    net = _net("resnet14")
    with torch.no_grad():
        net.width_logits.zero_()
        net.depth_logits.zero_()
        last = net.width_mask.sum(1) - 1
        rows = torch.arange(len(last))
        net.width_logits[rows, last] = 10.0
        net.width_logits[5, last[5]] = 0.01  # slot 5: widest by a hair
        net.depth_logits[:, -1] = 10.0
    full = count_flops(net.space.full)
    d = _derive(net, 0.97, tolerance=0.1)
    assert d.adjusted and d.argmax == net.space.full
    changed = [s for s, (a, b) in enumerate(zip(d.shape.widths, d.argmax.widths)) if a != b]
    assert changed == [5] and d.flops <= 0.97 * full


def test_a_small_overshoot_is_undone_by_the_cheapest_sufficient_move():
    # Dropping a block of stage 3 saves the most FLOPs per log-probability, but narrowing
    # one conv of stage 3 by one choice is enough to get under the target, and cheaper.
    net = _net("resnet14")
    slot = 10  # layer3.0.conv2: stem, then 2 blocks x 2 convs per stage
    with torch.no_grad():
        net.width_logits.zero_()
        last = net.width_mask.sum(1) - 1
        net.width_logits[torch.arange(len(last)), last] = 10.0
        net.width_logits[slot, last[slot] - 1] = 9.9  # narrower by one: 0.1 less likely
        net.depth_logits.zero_()
        net.depth_logits[:, 1] = 10.0
        net.depth_logits[2, 0] = 9.8  # stage 3 at 1 block: 0.2 less likely, many FLOPs fewer
    full = count_flops(net.space.full)
    widths = list(net.space.full.widths)
    widths[slot] = net.space.widths[slot][-2]
    narrowed = count_flops(net.space.full.replace(widths=tuple(widths)))
    assert narrowed < full
    ratio = narrowed / full  # exactly reachable by that one move
    d = _derive(net, ratio, tolerance=0.1)
    changed = [s for s, (a, b) in enumerate(zip(d.shape.widths, d.argmax.widths)) if a != b]
    assert d.shape.blocks == d.argmax.blocks and changed == [slot]
    assert d.flops <= ratio * full


@pytest.mark.parametrize("name", ["resnet14", "resnet20"])
def test_filling_uses_the_budget_and_never_passes_it(name):
    net = _net(name)
    full = count_flops(net.space.full)
    gen = torch.Generator().manual_seed(3)
    for trial in range(6):
        with torch.no_grad():
            net.width_logits.copy_(torch.randn(net.width_logits.shape, generator=gen) * 3)
            net.depth_logits.copy_(torch.randn(net.depth_logits.shape, generator=gen) * 3)
        for ratio in (0.3, 0.6):
            plain = _derive(net, ratio)
            filled = derive_in_band(net.space, net.width_logits, net.depth_logits,
                                    net.width_mask, net.depth_mask, ratio, 0.05, fill=True)
            assert plain.flops <= filled.flops <= ratio * full
            # no single widening move still fits under the target
            wi, di = net.space.indices_of(filled.shape)
            used = filled.shape.used_groups()
            for s in used:
                if wi[s] + 1 < len(net.space.widths[s]):
                    w = [*wi[:s], wi[s] + 1, *wi[s + 1:]]
                    bigger = count_flops(net.space.shape(w, di))
                    assert bigger > ratio * full or bigger <= filled.flops, (trial, s)
