"""Coupled residual widths (traced without free shortcuts): one group per residual stream,
so a shape never grows a stride-1 projection; and the free space of the paper, where it
does."""

import itertools
import math

import pytest
import torch

from helpers import network, space_of
from tasprune.net.surgery import build_pruned
from tasprune.tas.cost import expected_cost, supernet_expected_flops
from tasprune.tas.derive import derive_in_band
from tasprune.tas.sampling import masked_softmax
from tasprune.tas.space import SearchSpace
from tasprune.tas.supernet import SuperNet

pytestmark = pytest.mark.usefixtures("one_thread")


def _stride1_projections(model) -> int:
    return sum(1 for stage in model.stage_modules() for b in stage
               if getattr(b, "downsample", None) is not None and b.conv1.stride == (1, 1)
               and b.conv2.stride == (1, 1))


def test_residual_streams_are_one_group():
    """resnet20: the stem and the outputs of stage 1 are one stream (stride 1, 16 -> 16);
    stage 2 and 3 start with a stride-2 block: streams of their own; the first conv of
    every block is a group of its own."""
    plan = network("resnet20", 10, 3, 32, free=False)[1]
    group = {layer.name: layer.writes for layer in plan.layers if layer.writes is not None}
    assert len({group["conv1"], group["layer1.0.conv2"], group["layer1.2.conv2"]}) == 1
    assert len({group["layer2.0.conv2"], group["layer2.0.downsample.conv"],
                group["layer2.2.conv2"]}) == 1
    assert group["layer2.0.conv2"] != group["conv1"] != group["layer3.0.conv2"]
    inner = {group[f"layer{s}.{b}.conv1"] for s in (1, 2, 3) for b in range(3)}
    assert len(inner) == 9 and len(plan.searched) == 12
    # a bottleneck's first block widens 64 -> 256 with a projection: the stem stays apart
    plan50 = network("resnet50", 10, 3, 32, free=False)[1]
    g50 = {layer.name: layer.writes for layer in plan50.layers if layer.writes is not None}
    assert g50["conv1"] != g50["layer1.0.conv3"] == g50["layer1.2.conv3"]
    # the free space: every conv of its own, a conditional projection for every identity
    free = network("resnet20", 10, 3, 32, free=True)[1]
    assert len(free.searched) == 19
    assert sum(1 for layer in free.layers if layer.when and layer.kind == "conv") == 7


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "resnet50",
                                  "cifar-resnet20-bottleneck"])
def test_coupled_shapes_never_add_a_stride1_projection(name):
    model, plan = network(name, 10, 3, 32, free=False)
    space = SearchSpace.from_plan(plan)
    dense = _stride1_projections(model)  # resnet50's widening first block
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        wi = [int(torch.randint(len(c), (1,), generator=gen)) for c in space.widths]
        di = [int(torch.randint(len(d), (1,), generator=gen)) for d in space.depths]
        shape = space.shape(wi, di)
        assert not any(layer.when for layer in plan.layers)
        assert _stride1_projections(build_pruned(model, shape)) == dense
    free_model, free_plan = network(name, 10, 3, 32, free=True)
    free = SearchSpace.from_plan(free_plan)
    grown = max(_stride1_projections(build_pruned(free_model, free.shape(
        [int(torch.randint(len(c), (1,), generator=gen)) for c in free.widths],
        [len(d) - 1 for d in free.depths]))) for _ in range(5))
    assert grown > dense  # the paper's space grows them


def test_expected_flops_of_a_stream_is_the_mean_over_coupled_shapes():
    """E[FLOPs] with one group per stream = the probability-weighted exact mean over the
    shapes the coupled space can give (the stream is one variable, not independent
    copies)."""
    space = space_of("cifar-resnet14", 10, 3, 8, free=False, ratios=(0.5, 1.0))
    gen = torch.Generator().manual_seed(0)
    wl = torch.randn(space.num_groups, 2, generator=gen, dtype=torch.float64)
    dl = torch.randn(space.num_stages, 2, generator=gen, dtype=torch.float64)
    wmask = torch.ones_like(wl, dtype=torch.bool)
    dmask = torch.ones_like(dl, dtype=torch.bool)
    wp, dp = masked_softmax(wl, wmask), masked_softmax(dl, dmask)
    mean = 0.0
    for wi in itertools.product(range(2), repeat=space.num_groups):
        for di in itertools.product(range(2), repeat=space.num_stages):
            prob = math.prod(float(wp[g, i]) for g, i in enumerate(wi))
            prob *= math.prod(float(dp[s, d]) for s, d in enumerate(di))
            mean += prob * space.shape(list(wi), list(di)).count("flops")
    got = expected_cost(space, wl, dl, wmask, dmask).item()
    assert got == pytest.approx(mean, rel=1e-9)


def test_the_supernet_of_a_stream_counts_and_computes_the_shape():
    model, plan = network("resnet20", 10, 3, 8, free=False)
    space = SearchSpace.from_plan(plan)
    gen = torch.Generator().manual_seed(1)
    net = SuperNet(space, model, gen)
    with torch.no_grad():
        net.width_logits.copy_(torch.randn(net.width_logits.shape, generator=gen) * 3)
    shape = net.derive()
    wi, _ = space.indices_of(shape)
    with torch.no_grad():
        net.width_logits.fill_(-1e4)
        net.width_logits[torch.arange(len(wi)), torch.tensor(wi)] = 1e4
        net.depth_logits.fill_(-1e4)
        net.depth_logits[:, 0] = 1e4
    shape = net.derive()
    assert supernet_expected_flops(net).item() == shape.count("flops")
    x = torch.randn(2, 3, 8, 8, generator=gen)
    net.eval()
    assert torch.allclose(net(x), net.subnet(shape).eval()(x), atol=1e-4, rtol=1e-4)
    assert net.width_logits.shape[0] == 12  # 3 streams + 9 inner convs


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
def test_derive_moves_whole_streams_and_lands_in_the_band(ratio):
    model, plan = network("resnet20", 10, 3, 8, free=False)
    space = SearchSpace.from_plan(plan)
    net = SuperNet(space, model)
    full = space.full.count("flops")
    gen = torch.Generator().manual_seed(2)
    for scale in (0.1, 3.0):
        with torch.no_grad():
            net.width_logits.copy_(torch.randn(net.width_logits.shape, generator=gen) * scale)
            net.depth_logits.copy_(torch.randn(net.depth_logits.shape, generator=gen) * scale)
        d = derive_in_band(space, net.width_logits, net.depth_logits, net.width_mask,
                           net.depth_mask, ratio, 0.05, fill=True)
        assert (ratio - 0.05) * full <= d.flops <= ratio * full
        assert _stride1_projections(build_pruned(model, d.shape)) == 0
