import statistics

import pytest
import torch

from helpers import network
from tasprune import create_model
from tasprune.latency import LatencyConfig, Spread, measure_latency, paired_latency


def test_latency_by_batch_size():
    model = create_model("resnet8", num_classes=3, in_channels=1, resolution=8)
    model.train()
    result = measure_latency(model, (1, 8, 8), LatencyConfig(batch_sizes=(1, 4), warmup=1,
                                                              repeats=3, rounds=2))
    assert set(result) == {1, 4} and all(v > 0 for v in result.values())
    assert model.training  # mode restored


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_sizes": ()}, "batch sizes"), ({"batch_sizes": (0,)}, "batch sizes"),
    ({"repeats": 2, "min_repeats": 3}, "min_repeats"), ({"max_seconds": 0}, "max_seconds"),
    ({"rounds": 0}, "rounds must be >= 1"), ({"threads": 0}, "threads must be >= 1"),
])
def test_latency_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LatencyConfig(**kwargs)


class FakeClock:
    """Seconds that pass only when a fake model runs."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeTarget:
    """A model whose passes take `durations(round, pass)` seconds; logs every call."""

    def __init__(self, name, clock, log, duration):
        self.name, self.clock, self.log, self.duration = name, clock, log, duration

    def prepare(self, batch, input_shape, threads, device):
        self.threads = torch.get_num_threads()

        def forward():
            self.log.append((self.name, batch))
            self.clock.now += self.duration(batch, sum(1 for n, _ in self.log
                                                       if n == self.name))
        return forward


def _config(**kwargs):
    base = {"batch_sizes": (1,), "warmup": 1, "repeats": 3, "min_repeats": 3,
            "max_seconds": 1e9, "rounds": 4}
    return LatencyConfig(**{**base, **kwargs})


def test_models_alternate_within_and_between_rounds():
    clock, log = FakeClock(), []
    models = {n: FakeTarget(n, clock, log, lambda b, i: 1.0) for n in ("a", "b", "c")}
    paired_latency(models, (1, 2, 2), _config(batch_sizes=(1, 2), rounds=3), clock=clock)
    turns = [n for i, (n, _) in enumerate(log) if i % 4 == 0]  # 1 warm-up + 3 timed each
    assert turns == ["a", "b", "c", "c", "b", "a", "a", "b", "c"] * 2
    assert [b for _, b in log] == [1] * 36 + [2] * 36


def test_round_medians_spread_and_speedup_is_median_of_round_ratios():
    clock, log = FakeClock(), []
    # per round (4 passes each: 1 warm-up, 3 timed) the dense net takes these seconds...
    dense_rounds = [10.0, 30.0, 10.0, 12.0]
    # ... and the pruned net these: ratios 2, 3, 1, 4 (median 2.5); a ratio of medians
    # would be median(dense) 11 / median(pruned) 7.5 = 1.47
    pruned_rounds = [5.0, 10.0, 10.0, 3.0]

    def per_round(values):
        return lambda batch, i: values[(i - 1) // 4]

    models = {"dense": FakeTarget("dense", clock, log, per_round(dense_rounds)),
              "pruned": FakeTarget("pruned", clock, log, per_round(pruned_rounds))}
    result = paired_latency(models, (1, 2, 2), _config(), clock=clock)
    assert result.round_ms["dense"][1] == pytest.approx([1000 * v for v in dense_rounds])
    assert result.ms("dense")[1] == Spread(11000.0, 10000.0, 30000.0)
    assert result.ms("pruned")[1] == Spread(7500.0, 3000.0, 10000.0)
    assert result.speedup("dense", "pruned")[1] == Spread(2.5, 1.0, 4.0)
    record = result.to_dict(baseline="dense")
    assert record["speedup"] == {"pruned": {"1": {"median": 2.5, "min": 1.0, "max": 4.0}}}
    assert record["ms"]["pruned"]["1"] == {"median": 7500.0, "min": 3000.0, "max": 10000.0}
    assert record["rounds"] == 4 and record["threads"] == torch.get_num_threads()


def test_round_median_is_of_the_timed_passes_only():
    clock, log = FakeClock(), []
    durations = {1: 100.0, 2: 1.0, 3: 2.0, 4: 9.0}  # the warm-up pass (100 s) is not timed
    model = FakeTarget("m", clock, log, lambda b, i: durations[i])
    result = paired_latency({"m": model}, (1, 2, 2), _config(rounds=1), clock=clock)
    assert result.round_ms["m"][1] == (2000.0,)


def test_time_cap_stops_repeats_after_min_repeats():
    clock, log = FakeClock(), []
    model = FakeTarget("m", clock, log, lambda b, i: 1.0)
    # 2 models x 2 rounds share 8 s: 2 s a turn, so 3 timed passes (min_repeats 3), not 50
    other = FakeTarget("o", clock, log, lambda b, i: 1.0)
    paired_latency({"m": model, "o": other}, (1, 2, 2),
                   _config(rounds=2, repeats=50, min_repeats=3, max_seconds=8.0, warmup=0),
                   clock=clock)
    assert len(log) == 2 * 2 * 3


def test_threads_are_fixed_while_timing_and_restored():
    before = torch.get_num_threads()
    clock, log = FakeClock(), []
    model = FakeTarget("m", clock, log, lambda b, i: 1.0)
    result = paired_latency({"m": model}, (1, 2, 2), _config(threads=1, rounds=1), clock=clock)
    assert model.threads == 1 and result.threads == 1
    assert torch.get_num_threads() == before


def test_threads_restored_when_a_model_fails():
    before = torch.get_num_threads()
    model = torch.nn.Conv2d(3, 4, 3)  # wrong input channels: the pass raises
    model.train()
    with pytest.raises(RuntimeError):
        paired_latency({"m": model}, (1, 8, 8), _config(threads=1, rounds=1))
    assert torch.get_num_threads() == before and model.training


def test_paired_torch_models_and_single_model_agree_in_form():
    small = create_model("resnet8", num_classes=3, in_channels=1, resolution=8)
    big = create_model("resnet14", num_classes=3, in_channels=1, resolution=8)
    result = paired_latency({"big": big, "small": small}, (1, 8, 8),
                            _config(batch_sizes=(1, 2), rounds=2, max_seconds=5.0))
    assert set(result.ms("small")) == {1, 2}
    speed = result.speedup("big", "small")[2]
    ratios = [b / s for b, s in zip(result.round_ms["big"][2], result.round_ms["small"][2],
                                    strict=True)]
    assert speed.median == pytest.approx(statistics.median(ratios))
    with pytest.raises(ValueError, match="at least one model"):
        paired_latency({}, (1, 8, 8))


def test_the_summary_times_in_a_fresh_process():
    from tasprune import build_model
    from tasprune.baselines import uniform_shape
    from tasprune.evaluation import isolated_latency_report
    from tasprune.latency import LatencyConfig

    full = network("resnet8", 4, 3, 8)[1].full()
    dense, pruned = build_model(full), build_model(uniform_shape(full, 0.5))
    config = LatencyConfig(batch_sizes=(1,), warmup=0, repeats=1, min_repeats=1, rounds=1,
                           threads=1, deploy=False)
    out = isolated_latency_report(pruned, (3, 8, 8), config, dense=dense, name="pruned")
    assert out["isolated"] is True and out["threads"] == 1
    assert set(out["ms"]) == {"dense", "pruned"} and "1" in out["speedup"]["pruned"]
