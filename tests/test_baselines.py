import pytest
import torch

from tasprune import Shape, build_model, count_flops
from tasprune.baselines import l1_shape, uniform_shape


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
