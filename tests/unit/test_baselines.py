"""The hand-set shapes TAS is compared against, on any planned network."""

import pytest
import torch

from helpers import network, space_of
from tasprune.baselines import l1_shape, random_shape, uniform_shape


@pytest.mark.parametrize("name", ["resnet20", "resnet164", "resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_uniform_hits_budget(name, ratio):
    full = space_of(name, 10, 3, 32).full
    shape = uniform_shape(full, ratio)
    flops, target = shape.count("flops"), ratio * full.count("flops")
    assert flops <= target
    assert flops > 0.9 * target  # bisection gets close from below
    assert shape.blocks == full.blocks
    sizes = [full.plan.groups[g].size for g in full.plan.searched]
    ratios = {w / f for w, f in zip(shape.widths, sizes, strict=True) if f >= 64}
    assert max(ratios) - min(ratios) < 0.05  # one ratio for every group (up to rounding)


def test_uniform_full_budget_is_full():
    full = space_of("resnet8").full
    assert uniform_shape(full, 1.0) == full


def test_l1_drops_the_weakest_filters():
    teacher, plan = network("resnet20", 10, 3, 32)
    full = plan.full()
    with torch.no_grad():  # layer1.0.conv1 nearly dead: the ranking must prune it hardest
        teacher.layer1[0].conv1.weight.mul_(1e-3)
    shape = l1_shape(full, teacher, 0.5)
    assert shape.count("flops") <= 0.5 * full.count("flops")
    assert shape.count("flops") > 0.45 * full.count("flops")
    position = plan.searched.index(plan.layer("layer1.0.conv1").writes)
    assert shape.widths[position] == 2  # clamped at ceil(0.1 * 16)
    assert shape.blocks == full.blocks


def test_errors():
    full = space_of("resnet8").full
    with pytest.raises(ValueError, match="below the smallest reachable"):
        uniform_shape(full, 1e-6)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        uniform_shape(full, 1.5)
    teacher, plan = network("resnet20", 10, 3, 32)
    teacher.conv1 = torch.nn.Conv2d(3, 8, 3)
    with pytest.raises(ValueError, match="another model"):
        l1_shape(plan.full(), teacher, 0.5)


def test_random_is_in_the_search_space_and_meets_the_budget():
    space = space_of("resnet20", 10, 3, 32)
    full = space.full
    shape = random_shape(space, 0.5, samples=300, seed=3)
    flops, target = shape.count("flops"), 0.5 * full.count("flops")
    assert 0.9 * target < flops <= target  # the best of 300 draws lands close below
    assert all(b in space.depths[s] for s, b in enumerate(shape.blocks))
    used = shape.used_groups()
    for i, width in enumerate(shape.widths):
        assert width in space.widths[i] if i in used else width == full.widths[i]
    assert shape != uniform_shape(full, 0.5)


def test_random_is_seeded_and_respects_the_space_options():
    space = space_of("resnet20", 10, 3, 32)
    a = random_shape(space, 0.6, samples=50, seed=0)
    assert a == random_shape(space, 0.6, samples=50, seed=0)
    assert a != random_shape(space, 0.6, samples=50, seed=1)
    coarse = space_of("resnet20", 10, 3, 32, ratios=(0.5, 1.0), multiple_of=8)
    assert all(w % 8 == 0 for w in random_shape(coarse, 0.6, samples=50).widths)


def test_random_errors():
    space = space_of("resnet20", 10, 3, 32)
    with pytest.raises(ValueError, match="samples must be"):
        random_shape(space, 0.5, samples=0)
    with pytest.raises(ValueError, match="below the smallest reachable"):
        random_shape(space, 0.01)
    # just above the smallest shape of the space: two uniform draws cannot reach it
    with pytest.raises(ValueError, match="none of 2 random shapes"):
        random_shape(space, 0.1, samples=2)
