"""The model zoo: every model builds, runs and traces; torchvision's parameter counts, key
names and MACs; and the FlopCounterMode-based MAC counter of tests/helpers.py."""

import math

import pytest
import torch
from torch import nn

from helpers import counter_macs, hook_flops
from tasprune.models.zoo import (
    ZOO,
    BasicBlock,
    StochasticDepth,
    channel_shuffle,
    densenet121,
    efficientnet_b0,
    mobilenet_v2,
    regnet_x_400mf,
    regnet_y_400mf,
    resnet18,
    resnet50,
    resnext50_32x4d,
    shufflenet_v2_x1_0,
    stochastic_depth,
)

# one intra-op thread (conftest.py): these small forwards gain nothing from more, and on a
# busy machine the threads' synchronisation can cost ten times the arithmetic
pytestmark = pytest.mark.usefixtures("one_thread")

# the torchvision copies with a `small_input` switch (torchvision's network when False)
TORCHVISION = ("resnext50_32x4d", "regnet_x_400mf", "regnet_y_400mf", "efficientnet_b0",
               "densenet121", "shufflenet_v2_x1_0")


# every zoo network, the refused ShuffleNetV2 (not registered) included
NETS = {**ZOO, "shufflenet_v2_x1_0": shufflenet_v2_x1_0}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("name", sorted(NETS))
def test_builds_runs_and_traces(name, size):
    torch.manual_seed(0)
    model = NETS[name](num_classes=7, in_channels=1).eval()
    x = _x(2, 1, size, size)
    with torch.no_grad():
        out = model(x)
        traced = torch.fx.symbolic_trace(model)
        assert torch.equal(traced(x), out)
    assert out.shape == (2, 7)


def test_pinned_parameter_counts():
    assert _params(resnet18(num_classes=1000)) == 11_689_512
    assert _params(resnet50(num_classes=1000)) == 25_557_032
    assert _params(mobilenet_v2(num_classes=1000, small_input=False)) == 3_504_872


@pytest.mark.parametrize("name,count", [
    ("resnext50_32x4d", 25_028_904),
    ("regnet_x_400mf", 5_495_976),
    ("regnet_y_400mf", 4_344_144),
    ("efficientnet_b0", 5_288_548),
    ("densenet121", 7_978_856),
    ("shufflenet_v2_x1_0", 2_278_604),
])
def test_torchvision_parameter_counts(name, count):
    assert _params(NETS[name](num_classes=1000, small_input=False)) == count


@pytest.mark.parametrize("name,keys", [
    ("resnext50_32x4d", {"conv1.weight": (64, 3, 7, 7), "layer1.0.conv1.weight": (128, 64, 1, 1),
                         "layer1.0.conv2.weight": (128, 4, 3, 3),
                         "layer1.0.downsample.0.weight": (256, 64, 1, 1),
                         "layer4.2.conv3.weight": (2048, 1024, 1, 1), "fc.weight": (1000, 2048)}),
    ("regnet_x_400mf", {"stem.0.weight": (32, 3, 3, 3), "stem.1.running_mean": (32,),
                        "trunk_output.block1.block1-0.proj.0.weight": (32, 32, 1, 1),
                        "trunk_output.block1.block1-0.f.a.0.weight": (32, 32, 1, 1),
                        "trunk_output.block1.block1-0.f.b.0.weight": (32, 16, 3, 3),
                        "trunk_output.block1.block1-0.f.c.1.weight": (32,),
                        "trunk_output.block4.block4-11.f.b.0.weight": (400, 16, 3, 3),
                        "fc.weight": (1000, 400)}),
    ("regnet_y_400mf", {"trunk_output.block1.block1-0.proj.0.weight": (48, 32, 1, 1),
                        "trunk_output.block1.block1-0.f.b.0.weight": (48, 8, 3, 3),
                        "trunk_output.block1.block1-0.f.se.fc1.weight": (8, 48, 1, 1),
                        "trunk_output.block1.block1-0.f.se.fc1.bias": (8,),
                        "trunk_output.block2.block2-1.f.se.fc2.weight": (104, 26, 1, 1),
                        "trunk_output.block4.block4-5.f.c.0.weight": (440, 440, 1, 1),
                        "fc.weight": (1000, 440)}),
    ("efficientnet_b0", {"features.0.0.weight": (32, 3, 3, 3),
                         "features.1.0.block.0.0.weight": (32, 1, 3, 3),
                         "features.1.0.block.1.fc1.weight": (8, 32, 1, 1),
                         "features.1.0.block.2.0.weight": (16, 32, 1, 1),
                         "features.2.0.block.0.0.weight": (96, 16, 1, 1),
                         "features.2.0.block.2.fc2.weight": (96, 4, 1, 1),
                         "features.6.3.block.1.0.weight": (1152, 1, 5, 5),
                         "features.8.0.weight": (1280, 320, 1, 1),
                         "classifier.1.weight": (1000, 1280)}),
    ("densenet121", {"features.conv0.weight": (64, 3, 7, 7), "features.norm0.weight": (64,),
                     "features.denseblock1.denselayer1.norm1.weight": (64,),
                     "features.denseblock1.denselayer1.conv1.weight": (128, 64, 1, 1),
                     "features.denseblock1.denselayer6.conv2.weight": (32, 128, 3, 3),
                     "features.transition1.conv.weight": (128, 256, 1, 1),
                     "features.denseblock4.denselayer16.norm1.running_var": (992,),
                     "features.norm5.weight": (1024,), "classifier.weight": (1000, 1024)}),
    ("shufflenet_v2_x1_0", {"conv1.0.weight": (24, 3, 3, 3),
                            "stage2.0.branch1.0.weight": (24, 1, 3, 3),
                            "stage2.0.branch1.2.weight": (58, 24, 1, 1),
                            "stage2.0.branch2.0.weight": (58, 24, 1, 1),
                            "stage2.1.branch2.0.weight": (58, 58, 1, 1),
                            "stage4.3.branch2.3.weight": (232, 1, 3, 3),
                            "stage4.3.branch2.6.running_mean": (232,),
                            "conv5.0.weight": (1024, 464, 1, 1), "fc.weight": (1000, 1024)}),
])
def test_torchvision_key_layouts(name, keys):
    state = NETS[name](num_classes=1000, small_input=False).state_dict()
    assert {k: tuple(state[k].shape) for k in keys if k in state} == keys
    fresh = NETS[name](num_classes=1000, small_input=False)
    fresh.load_state_dict(state, strict=True)


def test_resnet_key_layout():
    keys = set(resnet18(num_classes=1000).state_dict())
    assert {"layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_mean",
            "fc.weight"} <= keys
    assert not any("downsample.conv" in k for k in keys)
    state = resnet50().state_dict()
    assert {"layer1.0.conv3.weight", "layer1.0.downsample.0.weight"} <= set(state)
    fresh = resnet50()
    fresh.load_state_dict(state, strict=True)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())


def test_small_input_stems():
    small = resnet18(small_input=True)
    assert small.conv1.weight.shape == (64, 3, 3, 3) and isinstance(small.maxpool, nn.Identity)
    assert set(small.state_dict()) == set(resnet18().state_dict())
    assert mobilenet_v2().features[0][0].stride == (1, 1)
    assert mobilenet_v2(small_input=False).features[0][0].stride == (2, 2)


@pytest.mark.parametrize("name", TORCHVISION)
def test_small_input_keeps_the_key_names_and_downsamples_8x(name):
    small, full = NETS[name](in_channels=1), NETS[name](in_channels=1, small_input=False)
    assert set(small.state_dict()) == set(full.state_dict())
    model = small.eval()
    grid = {}
    last = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    last.register_forward_hook(lambda m, i, o: grid.update(size=o.shape[-1]))
    with torch.no_grad():
        model(_x(1, 1, 32, 32))
    assert grid["size"] == 4  # 32 px ends at 4x4 (ResNet-style 8x), not 1x1


def test_resnext_groups():
    model = resnext50_32x4d(small_input=False)
    assert model.layer1[0].conv2.groups == 32 and model.layer4[0].conv2.groups == 32
    assert model.layer4[0].conv2.weight.shape == (1024, 32, 3, 3)
    assert resnet50().layer1[0].conv2.groups == 1
    with pytest.raises(ValueError):
        BasicBlock(64, 64, groups=32)


def _regnet_stages(depth, w_0, w_a, w_m, group_width):
    """The RegNet paper's quantised linear widths, as torchvision's BlockParams derives them:
    (stage depths, stage widths made divisible by the group width, group width)."""
    widths = [round(w_0 * w_m ** round(math.log((i * w_a + w_0) / w_0) / math.log(w_m)) / 8) * 8
              for i in range(depth)]
    stages = [w for i, w in enumerate(widths) if i == 0 or w != widths[i - 1]]
    depths = [widths.count(w) for w in stages]
    group_width = min(group_width, min(stages))
    divisible = [max(group_width, int(w + group_width / 2) // group_width * group_width)
                 for w in stages]
    assert all(d >= 0.9 * w for d, w in zip(divisible, stages))
    return depths, divisible, group_width


@pytest.mark.parametrize("factory,init", [
    (regnet_x_400mf, (22, 24, 24.48, 2.54, 16)),
    (regnet_y_400mf, (16, 48, 27.89, 2.09, 8)),
])
def test_regnet_stages_follow_the_published_init_params(factory, init):
    depths, widths, group_width = _regnet_stages(*init)
    model = factory(small_input=False)
    stages = list(model.trunk_output.children())
    assert [len(stage) for stage in stages] == depths
    assert [stage[0].f.c[0].out_channels for stage in stages] == widths
    assert all(stage[-1].f.b[0].weight.shape[1] == group_width for stage in stages)
    assert all(stage[0].proj is not None and stage[0].f.b[0].stride == (2, 2)
               and all(block.proj is None for block in list(stage)[1:]) for stage in stages)
    assert ("se" in dict(stages[0][0].f.named_children())) == (factory is regnet_y_400mf)


def test_stochastic_depth():
    x = torch.ones(64, 3, 2, 2)
    assert stochastic_depth(x, 0.5, "row", training=False) is x
    torch.manual_seed(0)
    out = stochastic_depth(x, 0.5, "row")
    rows = out.flatten(1)
    assert set(rows[:, 0].tolist()) == {0.0, 2.0} and bool((rows == rows[:, :1]).all())
    assert set(stochastic_depth(x, 0.5, "batch").unique().tolist()) <= {0.0, 2.0}
    with pytest.raises(ValueError):
        stochastic_depth(x, 1.5, "row")
    module = StochasticDepth(0.2, "row").eval()
    assert module(x) is x
    model = efficientnet_b0()
    nodes = [n for n in torch.fx.symbolic_trace(model).graph.nodes
             if n.op == "call_function" and n.target is stochastic_depth]
    residual = [m for m in model.modules() if getattr(m, "use_res_connect", False)]
    assert len(nodes) == len(residual) == 9
    probs = [m.stochastic_depth.p for m in model.modules() if hasattr(m, "stochastic_depth")]
    assert probs == [0.2 * i / 16 for i in range(16)]


def test_densenet_concatenates():
    model = densenet121(small_input=False)
    block = model.features.denseblock4
    assert [layer.norm1.num_features for layer in block.values()] == list(range(512, 1024, 32))
    assert model.features.norm5.num_features == 1024
    cats = [n for n in torch.fx.symbolic_trace(model).graph.nodes
            if n.op == "call_function" and n.target is torch.cat]
    assert len(cats) == 6 + 12 + 24 + 16 + 4  # one per layer and one per block


def test_channel_shuffle():
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    model = shufflenet_v2_x1_0(small_input=False)
    assert [len(s) for s in (model.stage2, model.stage3, model.stage4)] == [4, 8, 4]
    assert len(model.stage2[1].branch1) == 0 and len(model.stage2[0].branch1) == 5


def test_counter_macs_convention():
    assert counter_macs(nn.Linear(4, 3), _x(1, 4)) == 4 * 3 + 3
    assert counter_macs(nn.Linear(4, 3, bias=False), _x(5, 4)) == 4 * 3  # per sample
    conv = nn.Conv2d(2, 5, 3, padding=1, bias=False)
    assert counter_macs(conv, _x(2, 2, 6, 6)) == 2 * 5 * 9 * 6 * 6
    net = ZOO["concat_net"](num_classes=7, in_channels=1)
    assert counter_macs(net, _x(1, 1, 28, 28)) == hook_flops(net, _x(1, 1, 28, 28))


@pytest.mark.parametrize("name,published,exact", [
    ("resnet18", 1_814_083_944, 1_814_074_344),
    ("resnet50", 4_089_184_256, 4_089_185_256),
])
def test_resnet_macs(name, published, exact):
    macs = counter_macs(NETS[name](num_classes=1000), _x(1, 3, 224, 224))
    print(name, macs)
    assert abs(macs - published) <= 0.001 * published
    assert macs == exact


def test_mobilenet_v2_macs():
    macs = counter_macs(mobilenet_v2(num_classes=1000, small_input=False), _x(1, 3, 224, 224))
    print("mobilenet_v2", macs)  # 300,775,272
    assert abs(macs - 300_800_000) <= 0.01 * 300_800_000


@pytest.mark.parametrize("name", ["regnet_y_400mf", "efficientnet_b0", "shufflenet_v2_x1_0"])
def test_counter_macs_agrees_with_hooks_on_se_and_shuffle_nets(name):
    net = NETS[name](num_classes=7, in_channels=1)
    assert counter_macs(net, _x(1, 1, 32, 32)) == hook_flops(net, _x(1, 1, 32, 32))


@pytest.mark.parametrize("name,published,exact", [
    ("resnext50_32x4d", 4.23, 4_230_480_872),
    ("regnet_x_400mf", 0.41, 413_813_608),
    ("regnet_y_400mf", 0.40, 401_843_848),
    ("efficientnet_b0", 0.39, 385_815_752),
    ("densenet121", 2.83, 2_834_162_664),
    ("shufflenet_v2_x1_0", 0.14, 144_908_992),
])
def test_torchvision_macs(name, published, exact):
    # torchvision's "GFLOPS" (multiply-adds, two decimals) at 224 px; counted on the meta
    # device, which has the shapes and no arithmetic
    with torch.device("meta"):
        model = NETS[name](num_classes=1000, small_input=False)
        macs = counter_macs(model, torch.empty(1, 3, 224, 224))
    print(name, macs)
    assert round(macs / 1e9, 2) == published
    assert macs == exact
