"""The layer plan of any traced CNN: exact costs against FlopCounterMode and the built-in
counter, expected costs at one-hot distributions, the supernet against the pruned module,
the channel reorder, refusals, and a torchvision-layout state dict as the teacher."""

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import counter_macs
from tasprune import PlanError, Shape, count_flops, count_params, create_model
from tasprune.custom import build, load_weights, plan_of, uniform_shape
from tasprune.flops import DepthDist, WidthDist
from tasprune.models.zoo import ZOO
from tasprune.plan import PlanShape, expected_plan_cost
from tasprune.surgery import importance, reorder, shrink
from tasprune.tas.plan_supernet import PlanSuperNet
from tasprune.tas.space import PlanSpace
from tasprune.tas.supernet import Arch
from tasprune.trace import trace_plan

SMALL = ("mobilenet_v2", "vgg11_bn", "concat_net", "resnet18")


def _model(name: str) -> nn.Module:
    if name in ZOO:
        return ZOO[name](num_classes=7, in_channels=1)
    return create_model(name, num_classes=7, in_channels=1, resolution=28)


def _settled(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Non-trivial weights and BatchNorm statistics, eval mode."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        model.train()
        model(x)
    return model.eval()


def _random_shape(space: PlanSpace, seed: int) -> PlanShape:
    rng = random.Random(seed)
    return space.shape([rng.randrange(len(c)) for c in space.widths],
                       [rng.randrange(len(d)) for d in space.depths])


@pytest.mark.parametrize("name", [*ZOO, "resnet20", "resnet50"])
def test_exact_cost_matches_flop_counter_and_parameters(name):
    model = _model(name).eval()
    x = torch.zeros(1, 1, 28, 28)
    full = plan_of(model, [1, 28, 28]).full()
    assert full.count("flops") == counter_macs(model, x)
    assert full.count("params") == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "cifar-resnet164", "resnet18",
                                  "resnet50"])
def test_builtin_resnets_count_the_same_from_their_plan(name):
    resolution = 32 if "resnet1" not in name or name == "cifar-resnet164" else 64
    shape = Shape.full(name, num_classes=10, in_channels=3, resolution=resolution)
    plan = plan_of(create_model(name, num_classes=10, in_channels=3, resolution=resolution),
                   [3, resolution, resolution])
    assert plan.full().count("flops") == count_flops(shape)
    assert plan.full().count("params") == count_params(shape)


@pytest.mark.parametrize("name", SMALL)
def test_expected_cost_at_one_hot_is_the_exact_count(name):
    plan = plan_of(_model(name), [1, 28, 28])
    space = PlanSpace.from_plan(plan)
    for seed in range(3):
        shape = _random_shape(space, seed)
        wi, di = space.indices_of(shape)
        widths = [WidthDist(torch.tensor(c, dtype=torch.float64),
                            F.one_hot(torch.tensor(i), len(c)).double())
                  for c, i in zip(space.widths, wi, strict=True)]
        depths = [DepthDist(d, F.one_hot(torch.tensor(i), len(d)).double())
                  for d, i in zip(space.depths, di, strict=True)]
        for what in ("flops", "params"):
            expected = expected_plan_cost(plan, widths, depths, what)
            assert float(expected) == pytest.approx(shape.count(what), abs=1e-6)


@pytest.mark.parametrize("name", SMALL)
def test_one_hot_supernet_computes_the_pruned_module(name):
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model = _settled(_model(name), x)
    plan = plan_of(model, [1, 28, 28])
    space = PlanSpace.from_plan(plan)
    net = PlanSuperNet(space, model).eval()
    with torch.no_grad():
        assert torch.allclose(net(x, Arch.fixed(space, plan.full())), model(x), atol=1e-5)
        for seed in range(2):
            shape = _random_shape(space, seed)
            pruned = net.subnet(shape).eval()
            assert torch.allclose(net(x, Arch.fixed(space, shape)), pruned(x), atol=1e-5)
            assert sum(p.numel() for p in pruned.parameters()) == shape.count("params")
            assert counter_macs(pruned, x[:1]) == shape.count("flops")


def test_sampled_and_expected_forwards_are_differentiable():
    x = torch.randn(4, 1, 28, 28)
    model = _model("mobilenet_v2")
    space = PlanSpace.from_plan(plan_of(model, [1, 28, 28]))
    net = PlanSuperNet(space, model).train()
    for arch in (net.sample(1.0, 2), net.expected()):
        net.zero_grad()
        net(x, arch).logsumexp(1).sum().backward()
        assert net.net.features[0][0].weight.grad.abs().sum() > 0
    loss = expected_plan_cost(space.full.plan, [
        WidthDist(torch.tensor(c, dtype=torch.float64), torch.softmax(
            net.width_logits[i, : len(c)].double(), 0)) for i, c in enumerate(space.widths)],
        [DepthDist(d, torch.softmax(net.depth_logits[s, : len(d)].double(), 0))
         for s, d in enumerate(space.depths)])
    loss.backward()
    assert net.width_logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", SMALL)
def test_reorder_keeps_the_function_and_puts_important_channels_first(name):
    x = torch.randn(3, 1, 28, 28)
    model = _settled(_model(name), x)
    plan = plan_of(model, [1, 28, 28])
    sorted_model = reorder(model, plan)
    with torch.no_grad():
        want = model(x)
        assert torch.allclose(sorted_model(x), want, atol=1e-4 * float(want.abs().max()))
    scores = importance(sorted_model, plan)
    assert set(scores) == set(plan.searched)
    for s in scores.values():
        assert bool((s[:-1] >= s[1:]).all())
    assert any(not bool((s[:-1] >= s[1:]).all()) for s in importance(model, plan).values())


def test_skipped_blocks_become_identities_and_stages_are_sibling_runs():
    plan = plan_of(_model("resnet18"), [1, 28, 28])
    assert [plan.stage_name(s) for s in range(len(plan.stages))] == [
        "layer1.0..1", "layer2.1", "layer3.1", "layer4.1"]
    space = PlanSpace.from_plan(plan)
    assert space.depths == ((0, 1, 2), (0, 1), (0, 1), (0, 1))
    shape = plan.full().replace(blocks=(1, 0, 1, 0))
    pruned = shrink(_model("resnet18"), shape)
    assert isinstance(pruned.layer1[1], nn.Identity) and isinstance(pruned.layer2[1],
                                                                     nn.Identity)
    assert not isinstance(pruned.layer1[0], nn.Identity)
    assert shape.skipped() == ["layer1.1", "layer2.1", "layer4.1"]


def test_depthwise_convs_and_residual_adds_tie_groups():
    plan = plan_of(_model("mobilenet_v2"), [1, 28, 28])
    by_name = {layer.name: layer for layer in plan.layers}
    expand, depthwise = by_name["features.2.conv.0.0"], by_name["features.2.conv.1.0"]
    assert depthwise.depthwise and depthwise.reads == (expand.writes,)
    # the residual of features.3 ties its output to features.2's projection
    assert by_name["features.3.conv.2"].writes == by_name["features.2.conv.2"].writes


def test_concatenation_reads_several_groups():
    plan = plan_of(_model("concat_net"), [1, 28, 28])
    readers = [layer for layer in plan.layers if len(layer.reads) > 1]
    assert readers, "a layer after torch.cat reads the groups of both branches"


def test_uniform_shape_meets_the_budget():
    plan = plan_of(_model("mobilenet_v2"), [1, 28, 28])
    shape = uniform_shape(plan, 0.5)
    ratio = shape.count("flops") / plan.full().count("flops")
    assert 0.45 < ratio <= 0.5
    assert len(set(round(w / plan.groups[g].size, 1) for g, w in zip(
        plan.searched, shape.widths, strict=True))) <= 3  # one ratio, up to rounding


class _Dynamic(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return x


class _Viewed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).view(-1, 8))


class _Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.norm(self.conv(x)), 1), 1))


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.stem = nn.Conv2d(1, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(self.conv(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


@pytest.mark.parametrize("model, words", [
    (_Dynamic(), ["cannot be traced"]),
    (_Viewed(), ["forward", "view", "torch.flatten"]),
    (_Normed(), ["norm", "GroupNorm", "weights"]),
    (_Shared(), ["conv", "called twice"]),
])
def test_what_cannot_be_pruned_is_refused_in_one_line(model, words):
    with pytest.raises(PlanError) as err:
        trace_plan(model, torch.zeros(2, 1, 8, 8))
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_a_torchvision_layout_resnet50_state_dict_is_a_teacher_as_it_is(tmp_path):
    source = ZOO["resnet50"](num_classes=5, in_channels=3)
    _settled(source, torch.randn(2, 3, 32, 32))
    state = source.state_dict()
    assert "layer1.0.downsample.0.weight" in state  # torchvision's key names
    torch.save(state, tmp_path / "resnet50.pth")
    model = load_weights(build(ZOO["resnet50"], 5, 3), tmp_path / "resnet50.pth").eval()
    plan = plan_of(model, [3, 32, 32])
    space = PlanSpace.from_plan(plan)
    net = PlanSuperNet(space, model).eval()  # takes the weights with no conversion
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x, Arch.fixed(space, plan.full())), source.eval()(x),
                              atol=1e-4)


def test_weights_of_another_network_are_refused(tmp_path):
    torch.save(ZOO["resnet18"](num_classes=5).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(Exception, match="r18.pth"):
        load_weights(build(ZOO["resnet50"], 5, 3), tmp_path / "r18.pth")
