"""Coupled residual widths: one width distribution per residual stream."""

import itertools
import math

import pytest
import torch

from tasprune import Shape, build_model, count_flops
from tasprune.tas.cost import expected_cost, supernet_expected_flops
from tasprune.tas.derive import derive_in_band
from tasprune.tas.sampling import masked_softmax
from tasprune.tas.space import SearchSpace, residual_ties
from tasprune.tas.supernet import SuperNet

pytestmark = pytest.mark.usefixtures("one_thread")


def _stride1_projections(model) -> int:
    return sum(1 for stage in model.stage_modules() for b in stage
               if b.downsample is not None and b.conv1.stride == (1, 1)
               and b.conv2.stride == (1, 1))


def test_ties_follow_the_identity_shortcuts_of_the_full_network():
    # resnet20: slot 0 stem, then (conv1, conv2) per block; 3 blocks a stage
    ties = residual_ties(Shape.full("resnet20"))
    stream1 = [0, 2, 4, 6]  # the stem and the outputs of stage 1 (stride 1, 16 -> 16)
    stream2 = [8, 10, 12]  # stage 2 starts with a stride-2 block: a stream of its own
    stream3 = [14, 16, 18]
    for stream in (stream1, stream2, stream3):
        assert {ties[s] for s in stream} == {stream[0]}
    inner = [1, 3, 5, 7, 9, 11, 13, 15, 17]  # the first conv of every block is free
    assert all(ties[s] == s for s in inner)
    # a bottleneck's first block widens 64 -> 256 with a projection: the stem stays free
    ties50 = residual_ties(Shape.full("resnet50"))
    assert ties50[0] == 0 and ties50[3] == 3 and ties50[6] == 3 and ties50[9] == 3


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "resnet50",
                                  "cifar-resnet20-bottleneck"])
def test_coupled_shapes_never_add_a_stride1_projection(name):
    full = Shape.full(name, num_classes=10, resolution=32)
    space = SearchSpace.from_shape(full, coupled=True)
    assert space.coupled and not SearchSpace.from_shape(full).coupled
    dense = _stride1_projections(build_model(full))  # resnet50's widening first block
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        wi = [int(torch.randint(len(c), (1,), generator=gen)) for c in space.widths]
        di = [int(torch.randint(len(d), (1,), generator=gen)) for d in space.depths]
        shape = space.shape(wi, di)
        assert _stride1_projections(build_model(shape)) == dense
        assert [shape.widths[t] for t in space.ties] == list(shape.widths)


def test_expected_flops_of_tied_slots_is_the_mean_over_coupled_shapes():
    """E[FLOPs] with tied slots = the probability-weighted exact mean over the shapes the
    coupled space can give (tied slots are one variable, not independent copies)."""
    base = Shape.full("cifar-resnet14", resolution=8)
    space = SearchSpace.from_shape(base, ratios=(0.5, 1.0), coupled=True)
    gen = torch.Generator().manual_seed(0)
    wl = torch.randn(space.num_slots, 2, generator=gen, dtype=torch.float64)
    dl = torch.randn(space.num_stages, 2, generator=gen, dtype=torch.float64)
    wmask = torch.ones_like(wl, dtype=torch.bool)
    dmask = torch.ones_like(dl, dtype=torch.bool)
    wp, dp = masked_softmax(wl, wmask), masked_softmax(dl, dmask)
    reps = sorted(set(space.ties))
    mean = 0.0
    for picks in itertools.product(range(2), repeat=len(reps)):
        choice = dict(zip(reps, picks, strict=True))
        wi = [choice.get(s, 0) for s in range(space.num_slots)]
        for di in itertools.product(range(2), repeat=space.num_stages):
            prob = math.prod(float(wp[r, choice[r]]) for r in reps)
            prob *= math.prod(float(dp[s, d]) for s, d in enumerate(di))
            mean += prob * count_flops(space.shape(wi, list(di)))
    got = expected_cost(space, wl, dl, wmask, dmask).item()
    assert got == pytest.approx(mean, rel=1e-9)


def test_the_supernet_draws_one_width_per_stream_and_counts_the_tied_shape():
    space = SearchSpace.from_shape(Shape.full("resnet20", resolution=8), coupled=True)
    gen = torch.Generator().manual_seed(1)
    net = SuperNet(space, gen)
    with torch.no_grad():
        net.width_logits.copy_(torch.randn(net.width_logits.shape, generator=gen) * 3)
    for _ in range(5):
        arch = net.sample(tau=1.0, k=2, generator=gen)
        for s, t in enumerate(space.ties):
            assert arch.widths[s].values == arch.widths[t].values
    shape = net.derive()
    assert [shape.widths[t] for t in space.ties] == list(shape.widths)
    # one-hot on the stream rows: the expectation is the derived shape's exact count
    wi, _ = space.indices_of(shape)
    with torch.no_grad():
        net.width_logits.fill_(-1e4)
        net.width_logits[torch.arange(len(wi)), torch.tensor(wi)] = 1e4
        net.depth_logits.fill_(-1e4)
        net.depth_logits[:, 0] = 1e4
    shape = net.derive()
    assert supernet_expected_flops(net).item() == count_flops(shape)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    net.eval()
    model = build_model(shape).eval()
    model.load_state_dict(net.state_dict_for(shape))
    assert torch.allclose(net(x), model(x), atol=1e-4, rtol=1e-4)
    logits, mask = net.searched_width_logits()
    assert logits.shape[0] == len(set(space.ties)) == 12  # 3 streams + 9 inner convs


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
def test_derive_moves_whole_streams_and_lands_in_the_band(ratio):
    space = SearchSpace.from_shape(Shape.full("resnet20", resolution=8), coupled=True)
    net = SuperNet(space)
    full = count_flops(space.full)
    gen = torch.Generator().manual_seed(2)
    for scale in (0.1, 3.0):
        with torch.no_grad():
            net.width_logits.copy_(torch.randn(net.width_logits.shape, generator=gen) * scale)
            net.depth_logits.copy_(torch.randn(net.depth_logits.shape, generator=gen) * scale)
        d = derive_in_band(space, net.slot_width_logits(), net.depth_logits, net.width_mask,
                           net.depth_mask, ratio, 0.05, fill=True)
        assert (ratio - 0.05) * full <= d.flops <= ratio * full
        assert [d.shape.widths[t] for t in space.ties] == list(d.shape.widths)
        assert _stride1_projections(build_model(d.shape)) == 0
