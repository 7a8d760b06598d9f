"""The layer plan of any traced CNN: exact costs against FlopCounterMode, a cut to a random
shape, expected costs at one-hot distributions, the supernet against the pruned module,
stages, refusals, and a torchvision-layout state dict as the teacher."""

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import counter_macs
from tasprune import PlanError, channelwise, create_model, trace_plan
from tasprune.checkpoint import load_weights
from tasprune.models.zoo import ZOO, shufflenet_v2_x1_0
from tasprune.net import trace
from tasprune.net.plan import DepthDist, PlanShape, WidthDist, expected_plan_cost
from tasprune.net.surgery import build_pruned, shrink
from tasprune.tas.layers import Arch
from tasprune.tas.space import SearchSpace
from tasprune.tas.supernet import SuperNet

pytestmark = pytest.mark.usefixtures("one_thread")

PRUNABLE = list(ZOO)
SMALL = ("mobilenet_v2", "vgg11_bn", "concat_net", "resnet18", "resnext50_32x4d",
         "regnet_y_400mf", "efficientnet_b0", "densenet121")


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name in ZOO:
        return ZOO[name](num_classes=7, in_channels=1)
    return create_model(name, num_classes=7, in_channels=1, resolution=28)


def _plan(model: nn.Module):
    return trace_plan(model, torch.zeros(1, 1, 28, 28))[0]


def _settled(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Non-trivial weights and BatchNorm statistics, eval mode."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        model.train()
        model(x)
    return model.eval()


def _random_shape(space: SearchSpace, seed: int) -> PlanShape:
    rng = random.Random(seed)
    return space.shape([rng.randrange(len(c)) for c in space.widths],
                       [rng.randrange(len(d)) for d in space.depths])


@pytest.mark.parametrize("name", [*PRUNABLE, "resnet20", "resnet50"])
def test_exact_cost_matches_flop_counter_and_parameters(name):
    model = _model(name).eval()
    x = torch.zeros(1, 1, 28, 28)
    full = _plan(model).full()
    assert full.count("flops") == counter_macs(model, x)
    assert full.count("params") == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", PRUNABLE)
def test_a_cut_to_a_random_shape_runs_and_counts_its_own_cost(name):
    model = _model(name)
    space = SearchSpace.from_plan(_plan(model))
    shape = _random_shape(space, 3)
    pruned = build_pruned(model, shape).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert pruned(x).shape == (2, 7)
    assert counter_macs(pruned, x[:1]) == shape.count("flops")
    assert sum(p.numel() for p in pruned.parameters()) == shape.count("params")
    assert pruned.tasprune_shape == shape


@pytest.mark.parametrize("name", ["mobilenet_v2", "vgg11_bn", "concat_net", "resnet18"])
def test_expected_cost_at_one_hot_is_the_exact_count(name):
    plan = _plan(_model(name))
    space = SearchSpace.from_plan(plan)
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
    plan = _plan(model)
    space = SearchSpace.from_plan(plan)
    net = SuperNet(space, model).eval()
    with torch.no_grad():
        want = model(x)
        tol = 1e-5 * max(1.0, float(want.abs().max()))
        assert torch.allclose(net(x, Arch.fixed(space, plan.full())), want, atol=tol)
        for seed in range(2):
            shape = _random_shape(space, seed)
            pruned = net.subnet(shape).eval()
            assert torch.allclose(net(x, Arch.fixed(space, shape)), pruned(x), atol=tol)


def test_sampled_and_expected_forwards_are_differentiable():
    x = torch.randn(4, 1, 28, 28)
    model = _model("mobilenet_v2")
    space = SearchSpace.from_plan(_plan(model))
    net = SuperNet(space, model).train()
    for arch in (net.sample(1.0, 2), net.expected()):
        net.zero_grad()
        net(x, arch).logsumexp(1).sum().backward()
        assert net.net.features[0][0].weight.grad.abs().sum() > 0
    loss = expected_plan_cost(space.plan, [
        WidthDist(torch.tensor(c, dtype=torch.float64), torch.softmax(
            net.width_logits[i, : len(c)].double(), 0)) for i, c in enumerate(space.widths)],
        [DepthDist(d, torch.softmax(net.depth_logits[s, : len(d)].double(), 0))
         for s, d in enumerate(space.depths)])
    loss.backward()
    assert net.width_logits.grad.abs().sum() > 0


def test_skipped_blocks_become_identities_and_stages_are_sibling_runs():
    plan = _plan(_model("resnet18"))
    # the first child of a container opens its stage: layer1.0 is never skipped
    assert [plan.stage_name(s) for s in range(len(plan.stages))] == [
        "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    space = SearchSpace.from_plan(plan)
    assert space.depths == ((1, 2),) * 4
    shape = plan.full().replace(blocks=(1, 1, 2, 1))
    pruned = shrink(_model("resnet18"), shape)
    assert isinstance(pruned.layer1[1], nn.Identity) and isinstance(pruned.layer2[1],
                                                                     nn.Identity)
    assert not isinstance(pruned.layer1[0], nn.Identity)
    assert shape.skipped() == ["layer1.1", "layer2.1", "layer4.1"]
    # siblings named otherwise than by index (RegNet's block1-0) form one stage too
    regnet = _plan(_model("regnet_x_400mf"))
    assert [len(s) + 1 for s in regnet.stages] == [2, 7, 12]


def test_depthwise_convs_and_residual_adds_tie_groups():
    plan = _plan(_model("mobilenet_v2"))
    expand, depthwise = plan.layer("features.2.conv.0.0"), plan.layer("features.2.conv.1.0")
    assert depthwise.depthwise and depthwise.reads == (expand.writes,)
    # the residual of features.3 ties its output to features.2's projection
    assert plan.layer("features.3.conv.2").writes == plan.layer("features.2.conv.2").writes


def test_concatenation_reads_several_groups():
    plan = _plan(_model("concat_net"))
    readers = [layer for layer in plan.layers if len(layer.reads) > 1]
    assert readers, "a layer after torch.cat reads the groups of both branches"
    dense = _plan(_model("densenet121"))
    # block 3's last reader: its input and its 24 dense layers' outputs
    assert max(len(layer.reads) for layer in dense.layers) == 25


def test_grouped_convs_keep_their_channels_and_stochastic_depth_passes_them():
    plan = _plan(_model("resnext50_32x4d"))
    inner = plan.layer("layer1.0.conv2")
    assert inner.groups == 32 and plan.groups[inner.writes].fixed
    assert "grouped conv" in plan.groups[plan.layer("layer1.0.conv1").writes].fixed
    efficient = _plan(_model("efficientnet_b0"))
    assert len(efficient.stages) == 5  # MBConv blocks with a stochastic depth are skippable


class _DropPathish(nn.Module):
    """A channel-wise module tasprune does not know."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (torch.ones_like(x[:, :1]) if not self.training else 1.0)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.drop = _DropPathish()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.drop(self.conv(x)), 1), 1))


def test_a_declared_channelwise_module_passes_its_channels():
    with pytest.raises(PlanError, match="drop"):  # its slicing cannot be planned
        _plan(_Net())
    channelwise(_DropPathish)
    try:
        plan = _plan(_Net())
        assert len(plan.searched) == 1 and [layer.name for layer in plan.layers] == ["conv",
                                                                                     "fc"]
    finally:
        trace._PASS_MODULES.remove(_DropPathish)


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
    (shufflenet_v2_x1_0(num_classes=3, in_channels=1), ["stage2.0", "view",
                                                               "channel shuffle"]),
])
def test_what_cannot_be_pruned_is_refused_in_one_line(model, words):
    with pytest.raises(PlanError) as err:
        trace_plan(model, torch.zeros(2, 1, 28, 28))
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
    model = load_weights(ZOO["resnet50"](num_classes=5, in_channels=3),
                         tmp_path / "resnet50.pth").eval()
    plan, _ = trace_plan(model, torch.zeros(1, 3, 32, 32))
    space = SearchSpace.from_plan(plan)
    net = SuperNet(space, model).eval()  # takes the weights with no conversion
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = source.eval()(x)  # logits in the tens of thousands: float32 to 1e-5 of them
        assert torch.allclose(net(x, Arch.fixed(space, plan.full())), want,
                              atol=1e-5 * float(want.abs().max()))


def test_weights_of_another_network_are_refused(tmp_path):
    torch.save(ZOO["resnet18"](num_classes=5).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(Exception, match="r18.pth"):
        load_weights(ZOO["resnet50"](num_classes=5, in_channels=3), tmp_path / "r18.pth")
