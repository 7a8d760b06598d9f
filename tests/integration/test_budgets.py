"""Parameter and latency budgets: the per-layer latency table keyed on the layers of any
plan, and the budget losses."""

import itertools
import json
import math

import pytest
import torch

from helpers import brightness_bundle, network, space_of
from tasprune._io import read_jsonl
from tasprune.commands.run import _prune_flags, budget_alone
from tasprune.latency_table import LatencyTable, operation
from tasprune.tas.budgets import latency_budget
from tasprune.tas.cost import (
    band_floor,
    expected_cost,
    flops_budget,
    normalized_cost,
    params_budget,
    supernet_budget_loss,
)
from tasprune.tas.derive import derive_in_band
from tasprune.tas.sampling import masked_softmax
from tasprune.tas.searcher import SearchConfig, search
from tasprune.tas.space import SearchSpace
from tasprune.tas.supernet import SuperNet

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeTimer:
    """A deterministic 'time' per operation and widths, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, op, cin, cout, batch, device) -> float:
        self.calls += 1
        kinds = {"conv": 1, "dwconv": 2, "linear": 7, "bn": 3}
        return kinds[op[0]] + 0.01 * cin * cout + 0.001 * cin + 0.1 * len(op)


def _table(tmp_path=None) -> LatencyTable:
    return LatencyTable(64, "cpu", 1, None if tmp_path is None else tmp_path / "t.json",
                        timer=FakeTimer())


def test_prediction_is_the_sum_of_the_layers_times():
    shape = space_of("resnet8", 10, 3, 8).full
    table = _table()
    timer = table.timer
    got = table.predict(shape)
    # every conv (with its BatchNorm) and the classifier, at their widths; BatchNorms
    # that follow a conv are timed with it
    expect = 0.0
    for layer in shape.plan.layers:
        op = operation(layer)
        if op is None or not shape.active(layer):
            continue
        assert layer.kind != "bn"
        cin = sum(shape.read_width(layer, i) for i in range(len(layer.reads)))
        cout = cin if layer.writes is None else shape.group_widths()[layer.writes]
        expect += timer(op, cin, cout, 0, 0)
    # stem, three blocks of two convs and a (free, here absent) projection each, the classifier
    assert len([layer for layer in shape.plan.layers if operation(layer)]) == 11
    assert got == pytest.approx(expect)


@pytest.mark.parametrize("free", [True, False])
def test_expected_latency_is_the_mean_over_enumerated_shapes(free):
    """Independent widths and depths: E[latency] = sum over shapes of P * latency,
    stride-1 projections counted only where the widths differ, a stage's output read at
    the width of the last block it keeps."""
    space = space_of("cifar-resnet14", 10, 3, 8, free=free, ratios=(0.5, 1.0))
    table = _table()
    gen = torch.Generator().manual_seed(3)
    wl = torch.randn(space.num_groups, 2, generator=gen, dtype=torch.float64)
    dl = torch.randn(space.num_stages, 2, generator=gen, dtype=torch.float64)
    wm, dm = torch.ones_like(wl, dtype=torch.bool), torch.ones_like(dl, dtype=torch.bool)
    wp, dp = masked_softmax(wl, wm), masked_softmax(dl, dm)
    searched = [0, 1, 2, 4, 5]  # the rest at index 1 (full width)
    mean = 0.0
    for picks in itertools.product(range(2), repeat=len(searched)):
        wi = [1] * space.num_groups
        for g, pick in zip(searched, picks, strict=True):
            wi[g] = pick
        for di in itertools.product(range(2), repeat=space.num_stages):
            prob = math.prod(float(wp[g, wi[g]]) for g in searched)
            prob *= math.prod(float(dp[s, d]) for s, d in enumerate(di))
            mean += prob * table.predict(space.shape(wi, list(di)))
    wl2 = wl.clone()  # groups outside `searched` one-hot on their full width
    for g in range(space.num_groups):
        if g not in searched:
            wl2[g] = torch.tensor([-1e4, 1e4], dtype=torch.float64)
    got = expected_cost(space, wl2, dl, wm, dm, table.expected).item()
    assert got == pytest.approx(mean, rel=1e-9)


@pytest.mark.parametrize("name", ["mobilenet_v2", "concat_net"])
def test_expected_latency_of_zoo_networks_at_one_hot_is_the_prediction(name):
    """Depthwise convs (one width in, the same out) and concatenations (the input width
    is a sum) price like the exact prediction at one-hot logits."""
    space = space_of(name, 10, 3, 16, free=False)
    table = _table()
    gen = torch.Generator().manual_seed(5)
    wi = [int(torch.randint(len(c), (1,), generator=gen)) for c in space.widths]
    di = [len(d) - 1 for d in space.depths]
    wl = torch.full((space.num_groups, max(map(len, space.widths))), -1e4,
                    dtype=torch.float64)
    wl[torch.arange(len(wi)), torch.tensor(wi)] = 1e4
    dl = torch.full((space.num_stages, max(map(len, space.depths), default=1)), -1e4,
                    dtype=torch.float64)
    dl[torch.arange(len(di)), torch.tensor(di, dtype=torch.long)] = 1e4
    wm = torch.zeros_like(wl, dtype=torch.bool)
    for g, c in enumerate(space.widths):
        wm[g, : len(c)] = True
    dm = torch.zeros_like(dl, dtype=torch.bool)
    for s, c in enumerate(space.depths):
        dm[s, : len(c)] = True
    got = expected_cost(space, wl, dl, wm, dm, table.expected).item()
    assert got == pytest.approx(table.predict(space.shape(wi, di)), rel=1e-9)


def test_the_table_is_cached_on_disk_and_a_damaged_cache_is_timed_again(tmp_path):
    space = space_of("resnet8", 10, 3, 8)
    table = _table(tmp_path)
    keys = table.keys_of_space(space)
    assert table.fill(keys) == len(keys) == table.timer.calls
    again = _table(tmp_path)
    assert again.fill(keys) == 0 and again.timer.calls == 0
    assert again.predict(space.full) == table.predict(space.full)
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["batch"] == 64 and data["threads"] == 1 and len(data["entries"]) == len(keys)
    # entries that cannot be times are dropped when read, and timed again
    key = next(iter(data["entries"]))
    for bad in ("NaN", 0.0, -1.0):
        data["entries"][key] = float(bad)
        (tmp_path / "t.json").write_text(json.dumps(data))
        damaged = _table(tmp_path)
        assert damaged.dropped == 1 and damaged.fill(keys) == 1
    (tmp_path / "t.json").write_text("{not json")
    damaged = _table(tmp_path)
    assert damaged.fill(keys) == len(keys)
    # the cache key names the device, threads, torch version and batch
    cached = LatencyTable.cached(8, "cpu", 1, directory=tmp_path)
    assert cached.path.parent == tmp_path and "t1-b8" in cached.path.name


def test_budget_losses_add_up_and_the_most_violated_sets_the_direction():
    model, plan = network("resnet14", 10, 3, 8)
    space = SearchSpace.from_plan(plan)
    net = SuperNet(space, model)
    full = space.full
    budgets = [flops_budget(full, 0.9), params_budget(full, 0.2),
               latency_budget(full, 0.9, _table())]
    out = supernet_budget_loss(net, budgets, 0.05, argmax_weight=0.0)
    assert set(out.parts) == {"flops", "params", "latency@64"}
    assert out.loss.item() == pytest.approx(sum(p.loss.item() for p in out.parts.values()))
    assert out.parts["params"].direction == 1 and out.direction == 1
    out.loss.backward()
    assert net.width_logits.grad is not None and net.width_logits.grad.abs().sum() > 0


@pytest.mark.parametrize("ratios", [(0.5, None), (None, 0.5), (0.6, 0.4), (0.35, 0.7)])
def test_derive_meets_every_budget(ratios):
    model, plan = network("resnet20", 10, 3, 8, free=False)
    space = SearchSpace.from_plan(plan)
    full = space.full
    budgets = []
    if ratios[0] is not None:
        budgets.append(params_budget(full, ratios[0]))
    if ratios[1] is not None:
        budgets.append(latency_budget(full, ratios[1], _table()))
    net = SuperNet(space, model)
    gen = torch.Generator().manual_seed(4)
    for scale in (0.1, 3.0):
        with torch.no_grad():
            net.width_logits.copy_(torch.randn(net.width_logits.shape, generator=gen) * scale)
            net.depth_logits.copy_(torch.randn(net.depth_logits.shape, generator=gen) * scale)
        floor = band_floor(budgets, 0.05)
        d = derive_in_band(space, net.width_logits, net.depth_logits, net.width_mask,
                           net.depth_mask, 1.0, 0.05, fill=True,
                           cost=(normalized_cost(budgets), 1.0, floor))
        worst = max(b.exact(d.shape) / b.target for b in budgets)
        assert floor <= worst <= 1.0
        assert d.flops == d.shape.count("flops")


def test_config_budgets_are_validated():
    with pytest.raises(ValueError, match="at least one budget"):
        SearchConfig(flops_ratio=None)
    with pytest.raises(ValueError, match="latency_ratio"):
        SearchConfig(latency_ratio=1.5)
    with pytest.raises(ValueError, match="params_ratio"):
        SearchConfig(params_ratio=0)
    with pytest.raises(ValueError, match="latency_batch_sizes"):
        SearchConfig(latency_ratio=0.5, latency_batch_sizes=(0,))
    with pytest.raises(ValueError, match="latency_device"):
        SearchConfig(latency_ratio=0.5, latency_device="tpu")
    assert SearchConfig(flops_ratio=None, params_ratio=0.5).params_ratio == 0.5


@pytest.mark.parametrize("name", ["resnet8", "tv_resnet18"])
def test_a_search_under_a_params_and_a_latency_budget(tmp_path, monkeypatch, name):
    monkeypatch.setenv("TASPRUNE_CACHE", str(tmp_path / "cache"))
    # real timings of layers at 8x8 pixels and batch 2 are mostly overhead and noise (the
    # smallest shape measured 0.8 to 0.98 of the dense time): time them deterministically
    cached = LatencyTable.cached.__func__

    def fake_timed(cls, *args, **kwargs):
        table = cached(cls, *args, **kwargs)
        table.timer = FakeTimer()
        return table

    monkeypatch.setattr(LatencyTable, "cached", classmethod(fake_timed))
    cfg = SearchConfig(flops_ratio=None, params_ratio=0.6, latency_ratio=0.95,
                       latency_batch_sizes=(2,), epochs=2, batch_size=16, device="cpu",
                       health_images=0)
    result = search(name, brightness_bundle(96), cfg, tmp_path / "run", quiet=True)
    assert set(result.budgets) == {"params", "latency@2"}
    for got, want in result.budgets.values():
        assert got <= want + 1e-9
    assert result.in_band
    assert list((tmp_path / "cache" / "latency").glob("cpu-t1-b2-*.json"))
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert "expected_latency@2_ratio" in records[0] and "params_ratio" in records[0]
    assert records[-1]["budgets"]["params"]["target"] == 0.6
    with pytest.raises(ValueError, match="params ratio 0.01 cannot be reached"):
        search(name, brightness_bundle(96), SearchConfig(
            flops_ratio=None, params_ratio=0.01, epochs=1, batch_size=16, device="cpu"),
               tmp_path / "never", quiet=True)


def test_budget_flags_reach_the_config(tmp_path):
    from tasprune.cli import build_parser
    from tasprune.flags import config_values
    from tasprune.pipeline import load_prune_config

    args = build_parser().parse_args(["prune", "--out", str(tmp_path / "r"), "--latency-ratio",
                                      "0.5", "--params-ratio", "0.6", "--couple-residual",
                                      "--channel-multiple", "8"])
    config = load_prune_config(None, flags=_prune_flags(args))
    search_cfg = config.search
    assert search_cfg.flops_ratio is None  # another budget alone: no FLOP budget
    assert (search_cfg.latency_ratio, search_cfg.params_ratio) == (0.5, 0.6)
    assert search_cfg.couple_residual is True and search_cfg.channel_multiple == 8
    both = build_parser().parse_args(["prune", "--out", "x", "--latency-ratio", "0.5",
                                      "--flops-ratio", "0.4", "--no-couple-residual"])
    config = load_prune_config(None, flags=_prune_flags(both))
    assert config.search.flops_ratio == 0.4 and config.search.couple_residual is False
    search_args = ["search", "--model", "resnet20", "--data", "demo", "--epochs", "1", "--out",
                   "x"]
    alone = build_parser().parse_args([*search_args, "--params-ratio", "0.5"])
    assert budget_alone(config_values(alone), "") == {"epochs": 1, "params_ratio": 0.5,
                                                      "flops_ratio": None}
    default = build_parser().parse_args(search_args)
    assert budget_alone(config_values(default), "") == {"epochs": 1}  # SearchConfig's 0.5


def test_a_table_checks_itself_against_the_network_and_can_forget(tmp_path):
    table = _table(tmp_path)
    model, plan = network("resnet8", 10, 3, 8)
    full = plan.full()
    predicted, measured = table.check(model, full, passes=1)
    assert predicted == table.predict(full) and measured > 0
    assert (tmp_path / "t.json").is_file()
    some = list(table.entries)[:3]
    table.forget(some)
    assert not set(some) & set(table.entries) and table.entries
    assert len(json.loads((tmp_path / "t.json").read_text())["entries"]) == len(table.entries)
    table.forget()
    assert not table.entries
