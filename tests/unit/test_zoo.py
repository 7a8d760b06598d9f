"""The model zoo: every model builds, runs and traces; torchvision's parameter counts, key
names and MACs; and the FlopCounterMode-based MAC counter of tests/helpers.py."""

import pytest
import torch
from torch import nn

from helpers import counter_macs, hook_flops
from tasprune.models.zoo import ZOO, mobilenet_v2, resnet18, resnet50


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_builds_runs_and_traces(name):
    torch.manual_seed(0)
    model = ZOO[name](num_classes=7, in_channels=1).eval()
    x = _x(2, 1, 28, 28)
    with torch.no_grad():
        out = model(x)
        traced = torch.fx.symbolic_trace(model)
        assert torch.equal(traced(x), out)
    assert out.shape == (2, 7)


def test_pinned_parameter_counts():
    assert _params(resnet18(num_classes=1000)) == 11_689_512
    assert _params(resnet50(num_classes=1000)) == 25_557_032
    assert _params(mobilenet_v2(num_classes=1000, small_input=False)) == 3_504_872


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
    macs = counter_macs(ZOO[name](num_classes=1000), _x(1, 3, 224, 224))
    print(name, macs)
    assert abs(macs - published) <= 0.001 * published
    assert macs == exact


def test_mobilenet_v2_macs():
    macs = counter_macs(mobilenet_v2(num_classes=1000, small_input=False), _x(1, 3, 224, 224))
    print("mobilenet_v2", macs)  # 300,775,272
    assert abs(macs - 300_800_000) <= 0.01 * 300_800_000
