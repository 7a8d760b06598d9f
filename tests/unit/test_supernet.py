"""The supernet of a planned network: exact at one-hot logits (the pruned network, free
shortcut projections included), the per-choice BatchNorm against its naive definition,
and the paper's sampled forward of a built-in ResNet against the literal relaxation."""

import pytest
import torch
import torch.nn.functional as F

from helpers import network
from tasprune import Shape
from tasprune.tas.cost import supernet_expected_flops
from tasprune.tas.layers import Arch, Choice, ChoiceBN, _NormMix
from tasprune.tas.space import SearchSpace
from tasprune.tas.step import _grad_only
from tasprune.tas.supernet import SuperNet

pytestmark = pytest.mark.usefixtures("one_thread")

HUGE = 1e4  # a logit this far ahead makes every other probability exactly 0 in float32


def _supernet(name, res, classes=5, free=True, seed=0):
    torch.manual_seed(seed)
    model, plan = network(name, classes, 3, res, free)
    return SuperNet(SearchSpace.from_plan(plan), model), model


def _randomise_bn(net: SuperNet, gen: torch.Generator) -> None:
    """BN parameters and running stats that differ per width choice (so a wrong pick shows)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, ChoiceBN):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def _one_hot(net: SuperNet, shape) -> None:
    wi, di = net.space.indices_of(shape)
    with torch.no_grad():
        net.width_logits.zero_()
        net.depth_logits.zero_()
        net.width_logits[torch.arange(len(wi)), torch.tensor(wi)] = HUGE
        net.depth_logits[torch.arange(len(di)), torch.tensor(di)] = HUGE


def _projections(shape) -> int:
    """Free shortcuts whose projection the pruned network has."""
    return sum(1 for layer in shape.plan.layers
               if layer.when is not None and layer.kind == "conv" and shape.active(layer))


def _random_shape(space, gen):
    return space.shape([int(torch.randint(len(c), (1,), generator=gen)) for c in space.widths],
                       [int(torch.randint(len(d), (1,), generator=gen)) for d in space.depths])


CASES = [  # (model, resolution, seed): basic, bottleneck, ImageNet basic and bottleneck
    ("resnet20", 16, 0),
    ("cifar-resnet20-bottleneck", 16, 1),
    ("resnet18", 32, 2),
    ("resnet50", 32, 3),
]


@pytest.mark.parametrize("name, res, seed", CASES)
def test_one_hot_supernet_equals_the_pruned_network(name, res, seed):
    gen = torch.Generator().manual_seed(seed)
    net, _ = _supernet(name, res, seed=seed)
    _randomise_bn(net, gen)
    space = net.space
    for _ in range(20):  # a shape whose blocks differ in width (stride-1 projections)
        shape = _random_shape(space, gen)
        if _projections(shape) > 0:
            break
    assert _projections(shape) > 0
    model = net.subnet(shape)
    _one_hot(net, shape)
    assert net.derive() == shape
    assert supernet_expected_flops(net).item() == shape.count("flops")
    # float64: train-mode BN over 4 images of 1x1 pixels amplifies float32 rounding
    net.double()
    model.double()
    x = torch.randn(4, 3, res, res, generator=gen, dtype=torch.float64)
    for train in (False, True):
        net.train(train)
        model.train(train)
        arch = net.sample(tau=5.0, k=2, generator=gen)
        # zero-weight candidates are dropped: one candidate per group and stage
        assert all(c.weights is None for c in arch.widths + arch.depths)
        assert torch.allclose(net(x, arch), model(x), atol=1e-9, rtol=1e-9)
    # a train-mode forward updates exactly the chosen BN's running stats like the pruned net's
    after = net.subnet(shape).state_dict()
    for key, value in model.state_dict().items():
        if "running" in key:
            assert torch.allclose(after[key].to(value), value, rtol=1e-4, atol=1e-5), key
    model.eval()
    net.eval()
    assert torch.allclose(net(x, Arch.fixed(space, shape)), model(x), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", ["mobilenet_v2", "concat_net", "vgg11_bn"])
def test_one_hot_supernet_of_zoo_networks(name):
    gen = torch.Generator().manual_seed(4)
    net, _ = _supernet(name, 16, free=False)
    _randomise_bn(net, gen)
    net.eval()
    x = torch.randn(3, 3, 16, 16, generator=gen)
    for _ in range(3):
        shape = _random_shape(net.space, gen)
        with torch.no_grad():
            assert torch.allclose(net(x, Arch.fixed(net.space, shape)),
                                  net.subnet(shape).eval()(x), atol=1e-4, rtol=1e-4)


def _naive_choice_bn(bn: ChoiceBN, y: torch.Tensor, choice: Choice, training: bool,
                     stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-candidate BN on the first c_j channels, resized by adaptive pooling, mixed."""
    c_max = y.shape[1]
    total = 0
    for n, (j, c) in enumerate(zip(choice.rows, choice.values, strict=True)):
        out = F.batch_norm(y[:, :c], stats[0][j, :c], stats[1][j, :c], bn.weight[j, :c],
                           bn.bias[j, :c], training, 0.1, 1e-5)
        total = total + choice.weights[n] * _pool_channels(out, c_max)
    return total


@pytest.mark.parametrize("training", [True, False])
def test_two_candidate_mixing_matches_the_naive_definition(training):
    gen = torch.Generator().manual_seed(3)
    choices = (5, 8, 11, 16)
    bn = ChoiceBN(choices, 16).double().train(training)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.normal_(0, 0.3, generator=gen)
        bn.running_mean.normal_(0, 0.3, generator=gen)
        bn.running_var.uniform_(0.5, 1.5, generator=gen)
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    y = (torch.randn(6, 11, 4, 4, generator=gen, dtype=torch.float64) * 2 + 1).to(
        memory_format=torch.channels_last).requires_grad_()
    w = torch.tensor([0.3, 0.7], dtype=torch.float64, requires_grad=True)
    choice = Choice(values=(5, 11), rows=(0, 2), weights=w)
    out = bn(y, choice)
    ref = _naive_choice_bn(bn, y, choice, training, stats)
    assert torch.allclose(out, ref, atol=1e-10)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(out, (y, w, bn.weight, bn.bias), g)
    ref_grads = torch.autograd.grad(ref, (y, w, bn.weight, bn.bias), g)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-9)
    if training:  # each candidate's running stats moved by its own channels, others untouched
        assert torch.allclose(bn.running_mean, stats[0], atol=1e-12)
        assert torch.allclose(bn.running_var, stats[1], atol=1e-12)
        assert not torch.equal(bn.running_mean[0, :5], bn.running_mean.new_zeros(5))


def test_fused_normalise_and_mix_gradcheck():
    gen = torch.Generator().manual_seed(4)
    y = torch.randn(3, 4, 3, 2, generator=gen, dtype=torch.float64).requires_grad_()
    mix = torch.randn(4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: _NormMix.apply(a, b, c)[0], (y, mix, bias))


def test_samples_keep_two_candidates_and_all_depths_while_logits_are_soft():
    net, _ = _supernet("resnet20", 8, classes=10)
    arch = net.sample(tau=5.0, k=2, generator=torch.Generator().manual_seed(0))
    assert all(len(c.values) == 2 and c.weights is not None for c in arch.widths)
    assert all(c.values == (1, 2, 3) for c in arch.depths)
    out = net(torch.randn(2, 3, 8, 8), arch)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_each_step_computes_only_its_own_gradients():
    net, _ = _supernet("resnet14", 8, classes=3)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    weights, arch = net.weight_parameters(), net.arch_parameters()
    with _grad_only(weights, arch):
        F.cross_entropy(net(x, net.sample(5.0)), y).backward()
    assert all(p.grad is None for p in arch)
    assert all(net.layers[n].weight.grad is not None for n in ("conv1", "fc"))
    net.zero_grad(set_to_none=True)
    with _grad_only(arch, weights):
        F.cross_entropy(net(x, net.sample(5.0)), y).backward()
    assert all(p.grad is None for p in weights)
    assert net.width_logits.grad.abs().sum() > 0 and net.depth_logits.grad.abs().sum() > 0
    assert all(p.requires_grad for p in net.parameters())  # restored


def test_teacher_initialisation():
    gen = torch.Generator().manual_seed(5)
    teacher, plan = network("resnet20", 4, 3, 8)
    with torch.no_grad():
        for name, t in teacher.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5 if "var" in name
                        else torch.randn(t.shape, generator=gen) * 0.3)
    teacher.eval()
    net = SuperNet(SearchSpace.from_plan(plan), teacher).eval()
    full = plan.full()
    _one_hot(net, full)
    x = torch.randn(3, 3, 8, 8, generator=gen)
    assert torch.allclose(net(x, net.sample(1.0)), teacher(x), atol=1e-4)
    # narrower choices start from the first channels of the teacher's BN
    smaller = full.replace(widths=tuple(c[-2] for c in net.space.widths))
    cut = net.full_state(smaller)
    sub = net.subnet(smaller).state_dict()
    c = smaller.group_widths()[plan.layer("layer1.0.conv1").writes]
    c0 = smaller.group_widths()[plan.layer("conv1").writes]
    assert torch.equal(sub["layer1.0.bn1.weight"], teacher.layer1[0].bn1.weight[:c])
    assert torch.equal(sub["layer1.0.conv1.weight"], teacher.layer1[0].conv1.weight[:c, :c0])
    assert torch.equal(cut["layer1.0.bn1.weight"][:c], teacher.layer1[0].bn1.weight[:c])
    wrong, _ = network("resnet20", 7, 3, 8)
    with pytest.raises(ValueError, match="fc.weight"):
        net.load_teacher(wrong.state_dict())
    with pytest.raises(ValueError, match="does not fit"):
        net.load_teacher({k: v for k, v in teacher.state_dict().items() if "layer3" not in k})


def _pool_channels(x: torch.Tensor, c: int) -> torch.Tensor:
    n, k, h, w = x.shape
    rows = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(-1, 1, k), c)
    return rows.reshape(n, h, w, c).permute(0, 3, 1, 2)


def _naive_forward(net: SuperNet, view: Shape, x: torch.Tensor, arch: Arch,
                   training: bool) -> torch.Tensor:
    """The paper's relaxation written out on a built-in ResNet: every conv at c_max of its
    group's candidates, each candidate's own BN on its first c_j channels, adaptive average
    pooling along channels to c_max, weighted sum; a projection where the block strides or
    its widths differ; a stage's output mixed over its depth candidates, pooled to the
    widest."""
    plan = net.plan
    choice = dict(zip(plan.searched, arch.widths, strict=True))

    def slot(conv: str, x: torch.Tensor, stride: int = 1, pool: bool = False):
        layer = plan.layer(conv)
        ch = choice[layer.writes]
        if pool:
            x = F.avg_pool2d(x, 2, 2, ceil_mode=True)
        weight = net.layers[conv].weight
        k = weight.shape[-1]
        y = F.conv2d(x, weight[:ch.max, : x.shape[1]], None, stride, k // 2)
        parts = []
        for j, c in zip(ch.rows, ch.values, strict=True):
            part = y[:, :c]
            if layer.norm is not None:
                bn = net.layers[layer.norm].parts[0]
                part = F.batch_norm(part, bn.running_mean[j, :c].clone(),
                                    bn.running_var[j, :c].clone(), bn.weight[j, :c],
                                    bn.bias[j, :c], training, 0.1, 1e-5)
            parts.append(_pool_channels(part, ch.max))
        if ch.weights is None:
            return parts[0]
        return sum(w * p for w, p in zip(ch.weights, parts, strict=True))

    skel = view.skeleton
    x = F.relu(slot("conv1", x, skel.stem.stride))
    if skel.family.stem_pool:
        x = F.max_pool2d(x, 3, 2, 1)
    stage_of = {int(plan.blocks[s[0]].name.split(".")[0][5:]) - 1: i
                for i, s in enumerate(plan.stages)}
    for s, stage in enumerate(skel.stages):
        depth = arch.depths[stage_of[s]] if s in stage_of else Choice((1,), (0,))
        outs = {}
        for b in range(max(depth.values)):
            spec, h = stage[b], x
            for j, conv in enumerate(spec.convs):
                h = slot(f"layer{s + 1}.{b}.conv{j + 1}", h, conv.stride)
                h = F.relu(h) if j < len(spec.convs) - 1 else h
            if spec.stride > 1 or x.shape[1] != h.shape[1]:
                x = F.relu(h + slot(f"layer{s + 1}.{b}.downsample.conv", x,
                                    pool=spec.stride > 1))
            else:
                x = F.relu(h + x)
            outs[b + 1] = x
        if depth.weights is not None:
            widest = max(o.shape[1] for o in outs.values())
            x = sum(p * _pool_channels(outs[d], widest)
                    for p, d in zip(depth.weights, depth.values, strict=True))
    x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    fc = net.layers["fc"]
    return F.linear(x, fc.weight[:, : x.shape[1]], fc.bias)


@pytest.mark.parametrize("name, res", [("resnet20", 8), ("cifar-resnet20-bottleneck", 8),
                                       ("resnet18", 32)])
def test_sampled_forward_matches_the_literal_definition(name, res):
    gen = torch.Generator().manual_seed(7)
    net, _ = _supernet(name, res, classes=3)
    with torch.no_grad():  # free shortcuts with weights of their own, not the identity
        for name_, layer in net.layers.items():
            if name_.endswith("downsample.conv"):
                layer.weight.normal_(0, 0.3, generator=gen)
    _randomise_bn(net, gen)
    view = Shape.full(name, num_classes=3, resolution=res)
    x = torch.randn(4, 3, res, res, generator=gen)
    for training in (True, False):
        net.train(training)
        arch = net.sample(tau=2.0, k=2, generator=gen)
        assert any(c.weights is not None for c in arch.depths)
        ref = _naive_forward(net, view, x, arch, training)
        assert torch.allclose(net(x, arch), ref, atol=1e-4, rtol=1e-4)
