import itertools
import math

import pytest
import torch

from helpers import hook_flops, random_shape
from tasprune import Shape, build_model, count_flops, count_params, layer_table
from tasprune.flops import DepthDist, WidthDist, expected_flops


@pytest.mark.parametrize(
    "name, classes, res, flops, params",
    [
        ("resnet20", 10, 32, 40_813_194, 272_282),
        ("resnet56", 10, 32, 125_747_850, None),
        ("resnet110", 10, 32, 253_149_834, 1_730_522),
        ("resnet164", 10, 32, 247_646_730, None),
        ("resnet18", 1000, 224, 1_814_074_344, 11_689_512),
        ("resnet50", 1000, 224, 4_089_185_256, 25_557_032),
    ],
)
def test_pinned_counts(name, classes, res, flops, params):
    shape = Shape.full(name, num_classes=classes, resolution=res)
    assert count_flops(shape) == flops
    if params is not None:
        assert count_params(shape) == params


@pytest.mark.parametrize("name", ["resnet20", "resnet164", "resnet18", "resnet50"])
def test_params_match_built_module(name):
    shape = Shape.full(name)
    model = build_model(shape)
    assert count_params(shape) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, res, in_ch",
    [("resnet20", 32, 3), ("resnet8", 28, 1), ("cifar-resnet29-bottleneck", 16, 3),
     ("resnet18", 40, 3), ("resnet50", 32, 3)],
)
def test_pure_count_equals_hook_count_on_random_shapes(name, res, in_ch):
    gen = torch.Generator().manual_seed(0)
    base = Shape.full(name, resolution=res, in_channels=in_ch, num_classes=7)
    for _ in range(3):
        shape = random_shape(base, gen)
        model = build_model(shape)
        x = torch.randn(2, in_ch, res, res)
        assert count_flops(shape) == hook_flops(model, x), shape
        assert count_params(shape) == sum(p.numel() for p in model.parameters())


def test_layer_names_are_module_names():
    shape = random_shape(Shape.full("resnet20"), torch.Generator().manual_seed(3))
    modules = dict(build_model(shape).named_modules())
    for layer in layer_table(shape):
        assert layer.name in modules


def test_odd_resolution_counts_match():
    shape = Shape.full("resnet8", resolution=27)
    assert count_flops(shape) == hook_flops(build_model(shape), torch.randn(1, 3, 27, 27))


def _one_hot_dists(shape: Shape, dtype=torch.float64):
    """Width/depth distributions that put all mass on `shape`, among decoy candidates."""
    widths = []
    for w, full in zip(shape.widths, shape.full_widths):
        values = torch.tensor(sorted({w, full, max(1, full // 2)}), dtype=dtype)
        widths.append(WidthDist(values, (values == w).to(dtype)))
    depths = []
    for kept, full in zip(shape.blocks, shape.depths):
        choices = tuple(sorted({1, kept, full}))
        depths.append(DepthDist(choices, torch.tensor([float(c == kept) for c in choices],
                                                      dtype=dtype)))
    return widths, depths


@pytest.mark.parametrize("name", ["resnet20", "cifar-resnet29-bottleneck", "resnet18"])
def test_expected_flops_of_one_hot_equals_exact(name):
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        shape = random_shape(Shape.full(name, resolution=32), gen)
        widths, depths = _one_hot_dists(shape)
        exp = expected_flops(shape.skeleton, widths, depths)
        assert exp.item() == pytest.approx(count_flops(shape), rel=1e-12)


def test_expected_flops_equals_average_over_enumerated_shapes():
    """E[FLOPs] under independent slots and depths = the probability-weighted exact mean."""
    base = Shape.full("cifar-resnet14", resolution=8)  # two blocks a stage, depth choices {1, 2}
    gen = torch.Generator().manual_seed(0)
    free_slots = [0, 1, 2, 5, 6, 9]  # slots with two candidates; the rest stay full
    widths, options = [], []
    for slot, full in enumerate(base.full_widths):
        if slot in free_slots:
            values = [full // 4 + 1, full]
            probs = torch.rand(2, generator=gen, dtype=torch.float64)
            probs = probs / probs.sum()
        else:
            values, probs = [full], torch.ones(1, dtype=torch.float64)
        widths.append(WidthDist(torch.tensor(values, dtype=torch.float64), probs))
        options.append(list(zip(values, probs.tolist())))
    depths = []
    for _ in base.depths:
        p = torch.rand(2, generator=gen, dtype=torch.float64)
        depths.append(DepthDist((1, 2), p / p.sum()))
    depth_options = [list(zip(d.choices, d.probs.tolist())) for d in depths]

    mean = 0.0
    for ws in itertools.product(*options):
        for ds in itertools.product(*depth_options):
            prob = math.prod([p for _, p in ws] + [p for _, p in ds])
            shape = base.replace(widths=tuple(w for w, _ in ws), blocks=tuple(d for d, _ in ds))
            mean += prob * count_flops(shape)
    got = expected_flops(base.skeleton, widths, depths).item()
    assert got == pytest.approx(mean, rel=1e-9)


def test_expected_flops_is_differentiable():
    base = Shape.full("resnet8")
    logits = [torch.zeros(3, requires_grad=True) for _ in base.full_widths]
    widths = [
        WidthDist(torch.tensor([max(1, f // 2), (3 * f) // 4, f], dtype=torch.float32),
                  torch.softmax(a, 0))
        for a, f in zip(logits, base.full_widths)
    ]
    depths = [DepthDist((1,), torch.ones(1)) for _ in base.depths]
    expected_flops(base.skeleton, widths, depths).backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in logits)
