"""Parameter and latency budgets: the per-layer latency table and the budget losses."""

import itertools
import json
import math

import pytest
import torch

from helpers import brightness_bundle
from tasprune import Shape, count_flops, count_params
from tasprune._io import read_jsonl
from tasprune.flops import DepthDist, WidthDist, expected_params
from tasprune.latency_table import LatencyTable
from tasprune.tas.cost import (
    band_floor,
    expected_cost,
    flops_budget,
    latency_budget,
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
        roles = {"stem": 5, "conv": 1, "conv_add": 2, "shortcut": 3, "fc": 7}
        return roles[op[0]] + 0.01 * cin * cout + 0.001 * cin + 0.1 * len(op)


def _table(tmp_path=None) -> LatencyTable:
    return LatencyTable(64, "cpu", 1, None if tmp_path is None else tmp_path / "t.json",
                        timer=FakeTimer())


def test_prediction_is_the_sum_of_the_layers_times():
    shape = Shape.full("resnet8", resolution=8)
    table = _table()
    timer = table.timer
    got = table.predict(shape)
    # resnet8: stem, 3 blocks of two convs, 2 strided shortcuts, the classifier
    expect = (timer(("stem", 3, 1, 8, False), 3, 16, 0, 0)
              + timer(("conv", 3, 1, 8), 16, 16, 0, 0) + timer(("conv_add", 3, 1, 8), 16, 16, 0, 0)
              + timer(("conv", 3, 2, 8), 16, 32, 0, 0) + timer(("conv_add", 3, 1, 4), 32, 32, 0, 0)
              + timer(("shortcut", 2, 8, False), 16, 32, 0, 0)
              + timer(("conv", 3, 2, 4), 32, 64, 0, 0) + timer(("conv_add", 3, 1, 2), 64, 64, 0, 0)
              + timer(("shortcut", 2, 4, False), 32, 64, 0, 0) + timer(("fc", 2), 64, 10, 0, 0))
    assert got == pytest.approx(expect)


@pytest.mark.parametrize("coupled", [False, True])
def test_expected_latency_is_the_mean_over_enumerated_shapes(coupled):
    """Independent (or tied) widths and depths: E[latency] = sum over shapes of P * latency,
    stride-1 projections counted only where the widths differ."""
    base = Shape.full("cifar-resnet14", resolution=8)
    space = SearchSpace.from_shape(base, ratios=(0.5, 1.0), coupled=coupled)
    table = _table()
    gen = torch.Generator().manual_seed(3)
    wl = torch.randn(space.num_slots, 2, generator=gen, dtype=torch.float64)
    dl = torch.randn(space.num_stages, 2, generator=gen, dtype=torch.float64)
    wm, dm = torch.ones_like(wl, dtype=torch.bool), torch.ones_like(dl, dtype=torch.bool)
    wp, dp = masked_softmax(wl, wm), masked_softmax(dl, dm)
    reps = sorted(set(space.ties))
    free = [0, 1, 2, 5] if not coupled else reps[:4]  # the rest at index 1 (full width)
    mean = 0.0
    for picks in itertools.product(range(2), repeat=len(free)):
        wi = [1] * space.num_slots
        for slot, pick in zip(free, picks, strict=True):
            wi[slot] = pick
        for di in itertools.product(range(2), repeat=space.num_stages):
            prob = math.prod(float(wp[s, wi[s]]) for s in free)
            prob *= math.prod(float(dp[s, d]) for s, d in enumerate(di))
            mean += prob * table.predict(space.shape(wi, list(di)))
    # slots outside `free` one-hot on their full width
    wl2 = wl.clone()
    for s in range(space.num_slots):
        if s not in free:
            wl2[s] = torch.tensor([-1e4, 1e4], dtype=torch.float64)
    got = expected_cost(space, wl2, dl, wm, dm, table.expected).item()
    assert got == pytest.approx(mean, rel=1e-9)


def test_expected_params_at_one_hot_is_the_exact_count():
    shape = Shape.full("resnet20").replace(widths=tuple(
        max(1, w // 2) if i % 3 else w for i, w in enumerate(Shape.full("resnet20").widths)))
    widths = [WidthDist(torch.tensor([float(w), float(f)], dtype=torch.float64),
                        torch.tensor([1.0, 0.0], dtype=torch.float64))
              for w, f in zip(shape.widths, shape.full_widths, strict=True)]
    depths = [DepthDist((d,), torch.ones(1, dtype=torch.float64)) for d in shape.blocks]
    assert expected_params(shape.skeleton, widths, depths).item() == count_params(shape)


def test_the_table_is_cached_on_disk_and_a_damaged_cache_is_timed_again(tmp_path):
    space = SearchSpace.from_shape(Shape.full("resnet8", resolution=8))
    table = _table(tmp_path)
    keys = table.keys_of_space(space)
    assert table.fill(keys) == len(keys) == table.timer.calls
    again = _table(tmp_path)
    assert again.fill(keys) == 0 and again.timer.calls == 0
    assert again.predict(space.full) == table.predict(space.full)
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["batch"] == 64 and data["threads"] == 1 and len(data["entries"]) == len(keys)
    (tmp_path / "t.json").write_text("{not json")
    damaged = _table(tmp_path)
    assert damaged.fill(keys) == len(keys)
    # the cache key names the device, threads, torch version and batch
    cached = LatencyTable.cached(8, "cpu", 1, directory=tmp_path)
    assert cached.path.parent == tmp_path and "t1-b8" in cached.path.name


def test_budget_losses_add_up_and_the_most_violated_sets_the_direction():
    space = SearchSpace.from_shape(Shape.full("resnet14", resolution=8))
    net = SuperNet(space)
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
    space = SearchSpace.from_shape(Shape.full("resnet20", resolution=8), coupled=True)
    full = space.full
    budgets = []
    if ratios[0] is not None:
        budgets.append(params_budget(full, ratios[0]))
    if ratios[1] is not None:
        budgets.append(latency_budget(full, ratios[1], _table()))
    net = SuperNet(space)
    gen = torch.Generator().manual_seed(4)
    for scale in (0.1, 3.0):
        with torch.no_grad():
            net.width_logits.copy_(torch.randn(net.width_logits.shape, generator=gen) * scale)
            net.depth_logits.copy_(torch.randn(net.depth_logits.shape, generator=gen) * scale)
        floor = band_floor(budgets, 0.05)
        d = derive_in_band(space, net.slot_width_logits(), net.depth_logits, net.width_mask,
                           net.depth_mask, 1.0, 0.05, fill=True,
                           cost=(normalized_cost(budgets), 1.0, floor))
        worst = max(b.exact(d.shape) / b.target for b in budgets)
        assert floor <= worst <= 1.0
        assert d.flops == count_flops(d.shape)


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


def test_a_search_under_a_params_and_a_latency_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("TASPRUNE_CACHE", str(tmp_path / "cache"))
    # at 8x8 pixels and batch 2 the smallest shape still takes ~0.8 of the dense time
    cfg = SearchConfig(flops_ratio=None, params_ratio=0.6, latency_ratio=0.95,
                       latency_batch_sizes=(2,), epochs=2, batch_size=16, device="cpu",
                       health_images=0)
    full = Shape.full("resnet8", num_classes=4, resolution=8)
    result = search(full, brightness_bundle(96), cfg, tmp_path / "run", quiet=True)
    assert set(result.budgets) == {"params", "latency@2"}
    for got, want in result.budgets.values():
        assert got <= want + 1e-9
    assert result.in_band
    assert list((tmp_path / "cache" / "latency").glob("cpu-t1-b2-*.json"))
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert "expected_latency@2_ratio" in records[0] and "params_ratio" in records[0]
    assert records[-1]["budgets"]["params"]["target"] == 0.6
    with pytest.raises(ValueError, match="params ratio 0.01 cannot be reached"):
        search(full, brightness_bundle(96), SearchConfig(
            flops_ratio=None, params_ratio=0.01, epochs=1, batch_size=16, device="cpu"),
               tmp_path / "never", quiet=True)


def test_budget_flags_reach_the_config(tmp_path):
    from tasprune.cli import _budget_alone, _prune_flags, build_parser
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
    search = ["search", "--model", "resnet20", "--data", "demo", "--epochs", "1", "--out", "x"]
    alone = build_parser().parse_args([*search, "--params-ratio", "0.5"])
    assert _budget_alone(config_values(alone), "") == {"epochs": 1, "params_ratio": 0.5,
                                                       "flops_ratio": None}
    default = build_parser().parse_args(search)
    assert _budget_alone(config_values(default), "") == {"epochs": 1}  # SearchConfig's 0.5


def test_a_table_checks_itself_against_the_network_and_can_forget(tmp_path):
    table = _table(tmp_path)
    full = Shape.full("resnet8", resolution=8)
    predicted, measured = table.check(full, passes=1)
    assert predicted == table.predict(full) and measured > 0
    assert (tmp_path / "t.json").is_file()
    some = list(table.entries)[:3]
    table.forget(some)
    assert not set(some) & set(table.entries) and table.entries
    assert len(json.loads((tmp_path / "t.json").read_text())["entries"]) == len(table.entries)
    table.forget()
    assert not table.entries
