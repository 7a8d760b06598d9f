import pytest
import torch

from tasprune import Shape, build_model, create_model
from tasprune.training.inherit import inherit_weights


def _teacher(seed=0):
    torch.manual_seed(seed)
    model = create_model("resnet14", num_classes=3, in_channels=1, resolution=8)
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


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


def test_full_shape_inherits_the_teacher_exactly():
    teacher = _teacher()
    student = inherit_weights(teacher.shape, teacher)
    for (k, a), b in zip(teacher.state_dict().items(), student.state_dict().values()):
        assert torch.equal(a, b), k


def test_pruned_net_equals_teacher_when_dropped_channels_are_dead():
    # Kill channels (in every conv writing a residual stream, and in inner convs) and the
    # residual of every second block; the pruned net must then compute the same function,
    # which only holds if every layer kept exactly the live channels, consistently.
    teacher = _teacher()
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
    full = teacher.shape
    # slots: 0 stem, then (conv1, conv2) of blocks 1.0 1.1 2.0 2.1 3.0 3.1
    widths = [12, 8, 12, 8, 12, 16, 24, 16, 24, 32, 48, 32, 48]
    shape = full.replace(widths=tuple(widths), blocks=(1, 1, 1))
    student = inherit_weights(shape, teacher)
    x = torch.randn(5, 1, 8, 8, generator=gen)
    assert torch.allclose(_logits(student, x), _logits(teacher, x), atol=1e-5)
    assert student.layer1[0].conv1.weight.shape == (8, 12, 3, 3)

    # widths that differ inside one stream: block 1.1 widens 12 -> 16 (keeping the dead
    # channels too); the pruned net needs a projection the teacher did not have, which
    # must start as the teacher's identity shortcut restricted to the kept channels
    widths = [12, 8, 12, 8, 16, 16, 24, 16, 24, 32, 48, 32, 48]
    sd["layer1.1.bn2.weight"].fill_(1.0)
    sd["layer1.1.bn2.bias"].fill_(0.1)
    shape = full.replace(widths=tuple(widths), blocks=(2, 1, 1))
    student = inherit_weights(shape, teacher)
    proj = student.layer1[1].downsample.conv.weight[:, :, 0, 0]
    assert proj.shape == (16, 12) and torch.equal(proj.sum(1).unique().sort().values,
                                                  torch.tensor([0.0, 1.0]))
    assert torch.allclose(_logits(student, x), _logits(teacher, x), atol=1e-5)


def test_keeps_the_filters_with_largest_l1_norm():
    teacher = _teacher()
    with torch.no_grad():
        w = teacher.layer2[0].conv1.weight
        w.mul_(0.01)
        w[[3, 17, 30]] *= 1000  # clearly the largest
    shape = teacher.shape
    widths = list(shape.widths)
    slot = shape.skeleton.stages[1][0].convs[0].slot
    widths[slot] = 3
    student = inherit_weights(shape.replace(widths=tuple(widths)), teacher)
    assert torch.equal(student.layer2[0].conv1.weight, teacher.layer2[0].conv1.weight[[3, 17, 30]])
    assert torch.equal(student.layer2[0].conv2.weight,
                       teacher.layer2[0].conv2.weight[:, [3, 17, 30]])


def test_errors_say_what_to_do():
    teacher = _teacher()
    with pytest.raises(ValueError, match="another architecture.*drop --inherit"):
        inherit_weights(Shape.full("resnet20", num_classes=3, in_channels=1), teacher)
    pruned_teacher = build_model(teacher.shape.replace(blocks=(1, 2, 2)))
    with pytest.raises(ValueError, match="stage 1 keeps 2 blocks"):
        inherit_weights(teacher.shape, pruned_teacher)
    bottleneck = create_model("cifar-resnet11-bottleneck", num_classes=3, in_channels=1)
    widths = list(bottleneck.shape.widths)
    widths[1] = 40  # a bottleneck's inner conv may exceed the teacher's 16
    with pytest.raises(ValueError, match="only 16 there.*from scratch"):
        inherit_weights(bottleneck.shape.replace(widths=tuple(widths)), bottleneck)
