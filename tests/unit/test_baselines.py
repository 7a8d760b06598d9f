import pytest
import torch

from tasprune import Shape, build_model, count_flops
from tasprune.baselines import l1_shape, random_shape, uniform_shape


@pytest.mark.parametrize("name", ["resnet20", "resnet164", "resnet18"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_uniform_hits_budget(name, ratio):
    full = Shape.full(name, resolution=32)
    shape = uniform_shape(full, ratio)
    flops, target = count_flops(shape), ratio * count_flops(full)
    assert flops <= target
    assert flops > 0.9 * target  # bisection gets close from below
    assert shape.blocks == full.depths
    ratios = {w / f for w, f in zip(shape.widths, shape.full_widths) if f >= 64}
    assert max(ratios) - min(ratios) < 0.05  # one ratio for every conv (up to rounding)


def test_uniform_full_budget_is_full():
    full = Shape.full("resnet8")
    assert uniform_shape(full, 1.0) == full


def test_l1_drops_the_weakest_filters():
    full = Shape.full("resnet20")
    state = build_model(full).state_dict()
    # make layer1.0.conv1 (slot 1) nearly dead: the ranking must prune it hardest
    state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"] * 1e-3
    shape = l1_shape(full, state, 0.5)
    assert count_flops(shape) <= 0.5 * count_flops(full)
    assert count_flops(shape) > 0.45 * count_flops(full)
    assert shape.widths[1] == 2  # clamped at ceil(0.1 * 16)
    assert shape.blocks == full.depths


def test_errors():
    full = Shape.full("resnet8")
    with pytest.raises(ValueError, match="below the smallest reachable"):
        uniform_shape(full, 1e-6)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        uniform_shape(full, 1.5)
    other = build_model(Shape.full("resnet20")).state_dict()
    other["conv1.weight"] = torch.zeros(8, 3, 3, 3)
    with pytest.raises(ValueError, match="another model"):
        l1_shape(Shape.full("resnet20"), other, 0.5)


def test_random_is_in_the_search_space_and_meets_the_budget():
    from tasprune.tas.space import SearchSpace, used_slots

    full = Shape.full("resnet20")
    space = SearchSpace.from_shape(full)
    shape = random_shape(full, 0.5, samples=300, seed=3)
    flops, target = count_flops(shape), 0.5 * count_flops(full)
    assert 0.9 * target < flops <= target  # the best of 300 draws lands close below
    assert all(b in space.depths[s] for s, b in enumerate(shape.blocks))
    used = used_slots(shape)
    for slot, width in enumerate(shape.widths):
        assert width in space.widths[slot] if slot in used else width == full.widths[slot]
    assert shape != uniform_shape(full, 0.5)


def test_random_is_seeded_and_respects_the_space_options():
    full = Shape.full("resnet20")
    a = random_shape(full, 0.6, samples=50, seed=0)
    assert a == random_shape(full, 0.6, samples=50, seed=0)
    assert a != random_shape(full, 0.6, samples=50, seed=1)
    coarse = random_shape(full, 0.6, samples=50, ratios=(0.5, 1.0), multiple_of=8)
    assert all(w % 8 == 0 for w in coarse.widths)


def test_random_errors():
    full = Shape.full("resnet20")
    with pytest.raises(ValueError, match="samples must be"):
        random_shape(full, 0.5, samples=0)
    with pytest.raises(ValueError, match="below the smallest reachable"):
        random_shape(full, 0.01)
    # just above the smallest shape of the space: two uniform draws cannot reach it
    with pytest.raises(ValueError, match="none of 2 random shapes"):
        random_shape(full, 0.1, samples=2)
