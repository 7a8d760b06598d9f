"""Channel importance on the layer plan, the function-preserving reorder, and weight
inheritance (the teacher's channels of largest L1 norm, grown projections as identities)."""

import pytest
import torch

from helpers import network
from tasprune.net.importance import inherit, l1_scores, linked, orders, reorder, taylor_scores

pytestmark = pytest.mark.usefixtures("one_thread")


def _teacher(name: str, res: int, seed: int, free: bool = True, classes: int = 5,
             channels: int = 3):
    torch.manual_seed(seed)
    model, plan = network(name, classes, channels, res, free)
    with torch.no_grad():  # non-trivial BN parameters and statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval(), plan


@pytest.mark.parametrize("name, res", [("resnet14", 8), ("cifar-resnet11-bottleneck", 8),
                                       ("resnet18", 32), ("resnet50", 32),
                                       ("mobilenet_v2", 16), ("concat_net", 16),
                                       ("regnet_y_400mf", 16), ("efficientnet_b0", 16)])
@pytest.mark.parametrize("by", ["l1", "taylor"])
def test_reordering_keeps_the_function(name, res, by):
    teacher, plan = _teacher(name, res, seed=0)
    x, y = torch.randn(4, 3, res, res), torch.arange(4) % 5
    scores = taylor_scores(teacher, plan, [(x, y)]) if by == "taylor" else l1_scores(teacher,
                                                                                    plan)
    moved = reorder(teacher, plan, scores)
    with torch.no_grad():
        assert torch.allclose(moved(x), teacher(x), atol=1e-5)
    changed = [k for k, v in teacher.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, moved.state_dict()[k])]
    assert len(changed) > 10  # the weights really were permuted


def test_the_first_channels_are_the_most_important():
    teacher, plan = _teacher("resnet14", 8, seed=1, free=False)
    # float64: a Taylor score |sum a * dL/da| cancels, float32 rounding moves it by ~1%
    teacher = teacher.double()
    x, y = torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.arange(8) % 5
    moved = reorder(teacher, plan, taylor_scores(teacher, plan, [(x, y)]))
    again = taylor_scores(moved, plan, [(x, y)])
    inner = again[plan.layer("layer1.0.conv1").writes]  # one writer: sorted exactly
    assert torch.all(inner[:-1] >= inner[1:] - 1e-6 * inner.max())
    # a residual stream is one group, sorted by the sum of its writers' normalised scores
    stream = again[plan.layer("conv1").writes]
    assert plan.layer("layer1.1.conv2").writes == plan.layer("conv1").writes
    assert torch.all(stream[:-1] >= stream[1:] - 1e-6)


def test_free_shortcuts_link_the_groups_of_a_stream():
    """In the paper's space a stream's convs are groups of their own, but the unpruned
    network adds them as one tensor: they share one permutation, from their summed
    scores, and the reordered network computes the same function."""
    teacher, plan = _teacher("resnet14", 8, seed=1, free=True)
    root = linked(plan)
    stem, out10, out11 = (plan.layer(n).writes for n in ("conv1", "layer1.0.conv2",
                                                         "layer1.1.conv2"))
    assert stem != out10 != out11 and root[stem] == root[out10] == root[out11]
    assert root[plan.layer("layer1.0.conv1").writes] != root[stem]
    order = orders(plan, l1_scores(teacher, plan))
    assert torch.equal(order[stem], order[out11])


def test_taylor_importance_of_a_dead_channel_is_zero():
    teacher, plan = _teacher("resnet14", 8, seed=2)
    with torch.no_grad():
        teacher.layer2[0].bn1.weight[3] = 0
        teacher.layer2[0].bn1.bias[3] = 0
    scores = taylor_scores(teacher, plan, [(torch.randn(4, 3, 8, 8), torch.arange(4) % 5)])
    assert scores[plan.layer("layer2.0.conv1").writes][3] == 0
    assert set(scores) == set(plan.searched)
    assert teacher.conv1.weight.grad is None  # the teacher is left as it was


def _zero_out(model, names, channels):
    """Make output channels of these conv(+BN) layers exactly zero (in eval mode)."""
    sd = model.state_dict()
    with torch.no_grad():
        for name in names:
            sd[f"{name}.weight"][channels] = 0
            bn = name.replace("downsample.conv", "downsample.bn").replace("conv", "bn")
            if f"{bn}.weight" in sd:
                sd[f"{bn}.weight"][channels] = 0
                sd[f"{bn}.bias"][channels] = 0


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_full_shape_inherits_the_teacher_function():
    teacher, plan = _teacher("resnet14", 8, 0, classes=3, channels=1)
    student = inherit(teacher, plan.full())
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(_logits(student, x), _logits(teacher, x), atol=1e-5)


def test_pruned_net_equals_teacher_when_dropped_channels_are_dead():
    # Kill channels (in every conv writing a residual stream, and in inner convs) and the
    # residual of every second block; the pruned net must then compute the same function,
    # which only holds if every layer kept exactly the live channels, consistently.
    teacher, plan = _teacher("resnet14", 8, 0, classes=3, channels=1)
    gen = torch.Generator().manual_seed(1)
    streams = {  # residual stream -> (its width, the convs writing into it)
        0: (16, ["conv1", "layer1.0.conv2", "layer1.1.conv2"]),
        1: (32, ["layer2.0.conv2", "layer2.0.downsample.conv", "layer2.1.conv2"]),
        2: (64, ["layer3.0.conv2", "layer3.0.downsample.conv", "layer3.1.conv2"]),
    }
    for width, names in streams.values():
        _zero_out(teacher, names, torch.randperm(width, generator=gen)[: width // 4])
    for s, width in ((1, 16), (2, 32), (3, 64)):
        for b in (0, 1):
            _zero_out(teacher, [f"layer{s}.{b}.conv1"],
                      torch.randperm(width, generator=gen)[: width // 2])
    # block 1 of every stage adds nothing: its residual branch ends in a zero BN
    sd = teacher.state_dict()
    for s in (1, 2, 3):
        sd[f"layer{s}.1.bn2.weight"].zero_()
        sd[f"layer{s}.1.bn2.bias"].zero_()
    full = plan.full()
    # groups of the free plan in slot order: stem, then (conv1, conv2) of every block
    widths = [12, 8, 12, 8, 12, 16, 24, 16, 24, 32, 48, 32, 48]
    student = inherit(teacher, full.replace(widths=widths, blocks=(1, 1, 1)))
    x = torch.randn(5, 1, 8, 8, generator=gen)
    assert torch.allclose(_logits(student, x), _logits(teacher, x), atol=1e-5)
    assert student.layer1[0].conv1.weight.shape == (8, 12, 3, 3)

    # widths that differ inside one stream: block 1.1 widens 12 -> 16 (keeping the dead
    # channels too); the pruned net needs a projection the teacher did not have, which
    # must start as the teacher's identity shortcut restricted to the kept channels
    widths = [12, 8, 12, 8, 16, 16, 24, 16, 24, 32, 48, 32, 48]
    sd["layer1.1.bn2.weight"].fill_(1.0)
    sd["layer1.1.bn2.bias"].fill_(0.1)
    student = inherit(teacher, full.replace(widths=widths, blocks=(2, 1, 1)))
    proj = student.layer1[1].downsample.conv.weight[:, :, 0, 0]
    assert proj.shape == (16, 12) and torch.equal(proj.sum(1).unique().sort().values,
                                                  torch.tensor([0.0, 1.0]))
    assert torch.allclose(_logits(student, x), _logits(teacher, x), atol=1e-5)


def test_keeps_the_filters_with_largest_l1_norm():
    teacher, plan = _teacher("resnet14", 8, 0, classes=3, channels=1)
    with torch.no_grad():
        w = teacher.layer2[0].conv1.weight
        w.mul_(0.01)
        w[[3, 17, 30]] *= 1000  # clearly the largest
    full = plan.full()
    widths = list(full.widths)
    widths[plan.searched.index(plan.layer("layer2.0.conv1").writes)] = 3
    student = inherit(teacher, full.replace(widths=widths))
    # the input channels are permuted too (their stream is reordered), not dropped: the
    # L1 norm of a row tells which filter it is
    norms = teacher.layer2[0].conv1.weight.abs().sum((1, 2, 3))
    kept = [int((norms - row.abs().sum()).abs().argmin())
            for row in student.layer2[0].conv1.weight]
    assert sorted(kept) == [3, 17, 30]
    assert student.layer2[0].conv2.weight.shape[1] == 3


def test_errors_say_what_to_do():
    teacher, plan = _teacher("resnet14", 8, 0, classes=3, channels=1)
    _, other = network("resnet20", 3, 1, 8)
    with pytest.raises(ValueError, match="has no layer1.2.*drop --inherit"):
        inherit(teacher, other.full())
    _, wider = network("resnet14", 7, 1, 8)
    with pytest.raises(ValueError, match="fc has 3 outputs.*7"):
        inherit(teacher, wider.full())
    bottleneck, bplan = _teacher("cifar-resnet11-bottleneck", 8, 0, classes=3, channels=1)
    widths = list(bplan.full().widths)
    inner = [bplan.groups[g].name for g in bplan.searched].index("layer1.0.conv2")
    widths[inner] = 40  # a bottleneck's inner conv may grow to the block's outer 64
    with pytest.raises(ValueError, match="only 16 there.*from scratch"):
        inherit(bottleneck, bplan.full().replace(widths=widths))
