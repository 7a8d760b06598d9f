"""FLOPs and parameters from the layer plan: pinned counts of the built-in networks, the
exact count against independent counters on random shapes, and the expected count."""

import itertools
import math

import pytest
import torch

from helpers import counter_macs, hook_flops, random_shape
from tasprune import Shape, build_model, count_flops, count_params, layer_table
from tasprune.models.network import from_view
from tasprune.net.plan import DepthDist, WidthDist, expected_plan_cost


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
    assert count_params(shape) == count_params(model) == sum(p.numel()
                                                             for p in model.parameters())


@pytest.mark.parametrize(
    "name, res, in_ch",
    [("resnet20", 32, 3), ("resnet8", 28, 1), ("cifar-resnet29-bottleneck", 16, 3),
     ("resnet18", 40, 3), ("resnet50", 32, 3)],
)
def test_exact_count_equals_two_counters_on_random_shapes(name, res, in_ch, one_thread):
    gen = torch.Generator().manual_seed(0)
    base = Shape.full(name, resolution=res, in_channels=in_ch, num_classes=7)
    for _ in range(3):
        shape = random_shape(base, gen)  # widths differ: stride-1 projections appear
        model = build_model(shape)
        x = torch.randn(2, in_ch, res, res)
        assert count_flops(shape) == hook_flops(model, x) == counter_macs(model, x), shape
        assert count_params(shape) == sum(p.numel() for p in model.parameters())


def test_layer_table_names_modules_and_sums_to_the_count():
    shape = random_shape(Shape.full("resnet20"), torch.Generator().manual_seed(3))
    model = build_model(shape)
    modules = dict(model.named_modules())
    rows = layer_table(shape)
    assert all(row.name in modules for row in rows)
    assert sum(row.flops for row in rows) == count_flops(shape)
    assert sum(row.params for row in rows) == count_params(shape)
    assert any(".downsample.conv" in row.name and row.block for row in rows)  # a grown one


def test_odd_resolution_counts_match():
    shape = Shape.full("resnet8", resolution=27)
    assert count_flops(shape) == hook_flops(build_model(shape), torch.randn(1, 3, 27, 27))


def _one_hot_dists(shape, dtype=torch.float64):
    """Width/depth distributions that put all mass on `shape`, among decoy candidates."""
    plan = shape.plan
    widths = []
    for g, w in zip(plan.searched, shape.widths, strict=True):
        full = plan.groups[g].size
        values = torch.tensor(sorted({w, full, max(1, full // 2)}), dtype=dtype)
        widths.append(WidthDist(values, (values == w).to(dtype)))
    depths = []
    for kept, stage in zip(shape.blocks, plan.stages, strict=True):
        choices = tuple(sorted({1, kept, len(stage) + 1}))
        depths.append(DepthDist(choices, torch.tensor([float(c == kept) for c in choices],
                                                      dtype=dtype)))
    return widths, depths


@pytest.mark.parametrize("name", ["resnet20", "cifar-resnet29-bottleneck", "resnet18"])
@pytest.mark.parametrize("what", ["flops", "params"])
def test_expected_cost_of_one_hot_equals_exact(name, what):
    gen = torch.Generator().manual_seed(1)
    base = Shape.full(name, resolution=32)
    for _ in range(3):
        shape = from_view(random_shape(base, gen))
        widths, depths = _one_hot_dists(shape)
        exp = expected_plan_cost(shape.plan, widths, depths, what)
        assert exp.item() == pytest.approx(shape.count(what), rel=1e-12)


@pytest.mark.parametrize("what", ["flops", "params"])
def test_expected_cost_equals_average_over_enumerated_shapes(what):
    """E[cost] under independent groups and depths = the probability-weighted exact mean,
    free shortcuts (projections that exist only where widths differ) and the output of a
    stage that depends on its depth included."""
    full = from_view(Shape.full("cifar-resnet14", resolution=8))  # 2 blocks a stage
    plan = full.plan
    gen = torch.Generator().manual_seed(0)
    searched = [0, 1, 2, 4, 5, 7]  # positions with two candidates; the rest stay full
    widths, options = [], []
    for i, g in enumerate(plan.searched):
        size = plan.groups[g].size
        if i in searched:
            values = [size // 4 + 1, size]
            probs = torch.rand(2, generator=gen, dtype=torch.float64)
            probs = probs / probs.sum()
        else:
            values, probs = [size], torch.ones(1, dtype=torch.float64)
        widths.append(WidthDist(torch.tensor(values, dtype=torch.float64), probs))
        options.append(list(zip(values, probs.tolist(), strict=True)))
    depths = []
    for _ in plan.stages:
        p = torch.rand(2, generator=gen, dtype=torch.float64)
        depths.append(DepthDist((1, 2), p / p.sum()))
    depth_options = [list(zip(d.choices, d.probs.tolist(), strict=True)) for d in depths]

    mean = 0.0
    for ws in itertools.product(*options):
        for ds in itertools.product(*depth_options):
            prob = math.prod([p for _, p in ws] + [p for _, p in ds])
            shape = full.replace(widths=[w for w, _ in ws], blocks=[d for d, _ in ds])
            mean += prob * shape.count(what)
    got = expected_plan_cost(plan, widths, depths, what).item()
    assert got == pytest.approx(mean, rel=1e-9)


def test_expected_cost_is_differentiable():
    plan = from_view(Shape.full("resnet8")).plan
    logits = [torch.zeros(3, requires_grad=True) for _ in plan.searched]
    widths = [
        WidthDist(torch.tensor([max(1, f // 2), (3 * f) // 4, f], dtype=torch.float32),
                  torch.softmax(a, 0))
        for a, f in zip(logits, [plan.groups[g].size for g in plan.searched], strict=True)
    ]
    depths = [DepthDist((1,), torch.ones(1)) for _ in plan.stages]
    expected_plan_cost(plan, widths, depths).backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in logits)
