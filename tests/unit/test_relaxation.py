"""The default search's relaxation: zero-padded mixing, the noise-free expected
architecture, the nested depth relaxation, and the schedule around them."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import network
from tasprune.tas.cost import flop_loss
from tasprune.tas.layers import Choice, ChoiceBN, resize_matrix
from tasprune.tas.sampling import entropy
from tasprune.tas.searcher import SearchConfig, SearchLoop, arch_lr, warmup_steps
from tasprune.tas.space import SearchSpace
from tasprune.tas.step import weight_loss
from tasprune.tas.supernet import SuperNet
from tasprune.training.distill import DistillConfig, distill_loss

pytestmark = pytest.mark.usefixtures("one_thread")

HUGE = 1e4


def test_padding_keeps_every_channel_in_place():
    assert torch.equal(resize_matrix(3, 5, pad=True), torch.eye(5, 3))
    assert not torch.equal(resize_matrix(3, 5, pad=False), torch.eye(5, 3))


@pytest.mark.parametrize("training", [True, False])
def test_padded_mixing_matches_the_naive_definition(training):
    gen = torch.Generator().manual_seed(0)
    bn = ChoiceBN((4, 6, 9), 9).double().train(training)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.normal_(0, 0.3, generator=gen)
        bn.running_var.uniform_(0.5, 1.5, generator=gen)
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    y = torch.randn(5, 9, 3, 3, generator=gen, dtype=torch.float64).to(
        memory_format=torch.channels_last)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    out = bn(y, Choice(values=(4, 6, 9), rows=(0, 1, 2), weights=w, pad=True))
    ref = sum(w[j] * F.pad(F.batch_norm(y[:, :c], stats[0][j, :c], stats[1][j, :c],
                                        bn.weight[j, :c], bn.bias[j, :c], training, 0.1, 1e-5),
                           (0, 0, 0, 0, 0, 9 - c))
              for j, c in enumerate((4, 6, 9)))
    assert torch.allclose(out, ref, atol=1e-10)


def test_the_expected_width_scales_channel_i_by_the_probability_it_is_kept():
    # with the same BN for every choice, channel i of the mixture is P(c > i) * BN(y)_i
    bn = ChoiceBN((2, 3, 5), 5).double().eval()
    y = torch.randn(2, 5, 2, 2, dtype=torch.float64)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    out = bn(y, Choice(values=(2, 3, 5), rows=(0, 1, 2), weights=p, pad=True))
    keep = torch.tensor([1.0, 1.0, 0.5, 0.2, 0.2], dtype=torch.float64)
    plain = y / math.sqrt(1 + 1e-5)
    assert torch.allclose(out, plain * keep[None, :, None, None], atol=1e-12)


def _net(name="resnet14", res=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model, plan = network(name, 4, 3, res)
    return SuperNet(SearchSpace.from_plan(plan), model, gen), gen


@pytest.mark.parametrize("name", ["resnet20", "resnet32"])
def test_the_one_hot_expected_architecture_is_the_pruned_network(name):
    net, gen = _net(name)
    space = net.space
    for _ in range(3):
        shape = space.shape([int(torch.randint(len(c), (1,), generator=gen))
                             for c in space.widths],
                            [int(torch.randint(len(d), (1,), generator=gen))
                             for d in space.depths])
        wi, di = space.indices_of(shape)
        with torch.no_grad():
            net.width_logits.zero_()
            net.depth_logits.zero_()
            net.width_logits[torch.arange(len(wi)), torch.tensor(wi)] = HUGE
            net.depth_logits[torch.arange(len(di)), torch.tensor(di)] = HUGE
        model = net.subnet(shape)
        x = torch.randn(3, 3, 8, 8, generator=gen)
        net.eval()
        model.eval()
        assert torch.allclose(net(x, net.expected()), model(x), atol=1e-4, rtol=1e-4)


def test_the_nested_depth_relaxation():
    # one stage of 3 blocks, choices (1, 2, 3): y1 = B1(x); y2 = y1 + q1 (B2(y1) - y1);
    # y3 = y2 + q2 (B3(y2) - y2), with q1 = P(d >= 2), q2 = P(d >= 3) / P(d >= 2)
    net, gen = _net("resnet20")
    net.eval()
    p = torch.tensor([0.2, 0.5, 0.3])
    with torch.no_grad():
        net.width_logits.zero_()
        net.width_logits[:, 7] = HUGE  # every slot at its widest: no padding in play
        net.depth_logits.copy_(p.log().expand(3, 3))
    arch = net.expected()
    assert all(c.gate for c in arch.depths) and not any(c.gate for c in arch.widths)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    with torch.no_grad():
        net.ctx.set(arch)  # where the swapped layers read the architecture
        m = net.net
        h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        for lead, first, second in m.stage_modules():  # the gated blocks run themselves
            y = lead(h)
            y = y + 0.8 * (first.block(y) - y)
            h = y + (0.3 / 0.8) * (second.block(y) - y)
        ref = m.fc(torch.flatten(m.avgpool(h), 1))
        assert torch.allclose(net(x, arch), ref, atol=1e-5)


def test_entropy_is_differentiable_and_exact():
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    logits = torch.zeros(2, 4, requires_grad=True)
    h = entropy(logits, mask)
    assert h.item() == pytest.approx((math.log(4) + math.log(2)) / 2)
    h.backward()
    assert torch.allclose(logits.grad, torch.zeros(2, 4), atol=1e-7)  # uniform: maximal
    peaked = torch.tensor([[HUGE, 0, 0, 0], [0, HUGE, 0, 0]])
    assert entropy(peaked, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_the_flop_loss_direction_from_the_expected_flops_the_argmax_or_between():
    expected = torch.tensor(470.0, dtype=torch.float64, requires_grad=True)
    # argmax far above the target, but E[F] inside the band [450, 500]: no loss
    assert flop_loss(expected, 900, 1000, 0.5, 0.05, argmax_weight=0).direction == 0
    assert flop_loss(expected, 900, 1000, 0.5, 0.05, argmax_weight=1).direction == 1
    # 470 + 0.1 * (900 - 470) = 513 > 500; 470 + 0.05 * 430 = 491.5: inside
    assert flop_loss(expected, 900, 1000, 0.5, 0.05, argmax_weight=0.1).direction == 1
    assert flop_loss(expected, 900, 1000, 0.5, 0.05, argmax_weight=0.05).direction == 0
    low = torch.tensor(300.0, dtype=torch.float64)
    assert flop_loss(low, 480, 1000, 0.5, 0.05, argmax_weight=0).direction == -1
    with pytest.raises(ValueError, match="argmax_weight"):
        flop_loss(low, 480, 1000, 0.5, argmax_weight=2)


def test_the_flop_loss_direction_moves_to_the_argmax_over_the_search():
    loop = _loop(SearchConfig(epochs=5, weight_warmup=0.2), steps=10)
    assert loop.argmax_weight(0, 5) == 0 and loop.argmax_weight(1, 0) == 0
    assert loop.argmax_weight(4, 9) == 1 and 0 < loop.argmax_weight(3, 0) < 1
    assert _loop(SearchConfig(flop_loss="expected"), steps=10).argmax_weight(9, 9) == 0
    assert _loop(SearchConfig(flop_loss="argmax"), steps=10).argmax_weight(0, 0) == 1


def test_the_weight_step_distils_from_the_teacher():
    teacher = network("resnet8", 4, 3, 8)[0].eval()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 8, 8, generator=gen), torch.arange(6) % 4
    logits = torch.randn(6, 4, generator=gen)
    cfg = SearchConfig(kd_alpha=0.7, kd_temperature=3.0)
    with torch.no_grad():
        soft = teacher(x)
    expected = distill_loss(logits, y, soft, DistillConfig(0.7, 3.0)).total
    assert torch.allclose(weight_loss(logits, y, x, teacher, cfg), expected)
    plain = F.cross_entropy(logits, y)
    assert torch.allclose(weight_loss(logits, y, x, None, cfg), plain)
    assert torch.allclose(weight_loss(logits, y, x, teacher, SearchConfig(kd_alpha=0)), plain)


def _loop(config: SearchConfig, steps: int) -> SearchLoop:
    unused = dict.fromkeys(("net", "data", "train_idx", "valid_idx", "w_opt", "a_opt",
                            "w_sched", "run", "shape_full"))
    return SearchLoop(config=config, full_flops=1, steps=steps, **unused)


def test_warm_up_then_tau_annealed_over_the_architecture_steps():
    cfg = SearchConfig(epochs=5, weight_warmup=0.2, tau_max=5.0, tau_min=0.1)
    loop = _loop(cfg, steps=10)
    assert warmup_steps(cfg, 10) == loop.warmup_steps == 10
    assert all(loop.tau(0, s) == 5.0 for s in range(10))  # the warm-up epoch
    assert loop.tau(1, 0) == 5.0 and loop.tau(4, 9) == pytest.approx(0.1)
    taus = [loop.tau(e, s) for e in range(1, 5) for s in range(10)]
    assert all(a > b for a, b in zip(taus, taus[1:]))
    assert loop.entropy_weight(0, 9) == 0 and loop.entropy_weight(4, 9) == cfg.entropy_weight
    paper = _loop(SearchConfig(epochs=5, tau_per="epoch"), steps=10)
    assert paper.tau(0, 7) == 5.0 and paper.tau(4, 0) == pytest.approx(0.1)


def test_the_architecture_learning_rate_follows_the_number_of_steps():
    cfg = SearchConfig(epochs=10, weight_warmup=0.2, arch_lr=0.05, arch_lr_steps=150)
    assert arch_lr(cfg, 100) == pytest.approx(0.05 * 150 / 800)
    assert arch_lr(cfg, 10) == pytest.approx(0.05 * 150 / 80)
    assert arch_lr(SearchConfig(arch_lr=1e-3, arch_lr_steps=0), 10) == 1e-3


def test_settings_are_checked():
    for key, value, words in (("relaxation", "soft", "gumbel"), ("tau_per", "batch", "step"),
                              ("flop_loss", "mean", "argmax"), ("kd_alpha", 1.5, "[0, 1]"),
                              ("weight_warmup", 1.0, "[0, 1)"), ("entropy_weight", -1, ">= 0"),
                              ("arch_lr_steps", -5, ">= 0"), ("health_images", 1.5, ">= 0")):
        with pytest.raises(ValueError, match=key) as err:
            SearchConfig(**{key: value})
        assert words in str(err.value)
