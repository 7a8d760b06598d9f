"""Measured inference latency (CPU by default): the honest third number next to FLOPs and params.

FLOPs do not predict speed well for pruned nets (odd channel counts, memory
bound layers), so tasprune reports wall-clock latency. On a shared machine a
model timed once, then another timed once, compares two moments of load as much
as two networks; so every latency tasprune reports comes from `paired_latency`:

* the models to compare are timed together, in `rounds` rounds; in every round
  each model runs `warmup` untimed passes then up to `repeats` timed ones, and
  the round's median is kept; the models take turns within a round, in reverse
  order every other round, so drifting load hits all of them alike;
* a model's latency is the median of its round medians, with their min and max
  as the spread;
* a speed-up is the median over rounds of the per-round ratio (baseline ms /
  model ms), with its min and max: both models of a ratio ran in the same round;
* the intra-op thread count is fixed for the whole measurement (`threads`, by
  default torch's current setting; restored afterwards) and reported.

Forward passes run in eval mode under `torch.inference_mode`, on random input.
Anything with a `prepare` method (see `Target`) can be timed next to PyTorch
modules, e.g. an ONNX Runtime session (`tasprune.deploy.OnnxRuntimeTarget`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from tasprune.config import setting

Forward = Callable[[], object]


@dataclass(frozen=True)
class LatencyConfig:
    """Batch sizes to time, rounds, warm-up passes, repeats per round, time cap, threads.

    Each model runs, per round and batch size, `warmup` untimed passes and at least
    `min_repeats`, at most `repeats` timed ones: a batch size's timed passes stop early
    once they have taken `max_seconds` over all rounds and models together (large nets
    at batch 64 on CPU). `threads`: intra-op threads while timing (None: torch's current
    setting). `deploy`: also time the deployable form (BatchNorm folded into the convs)
    in PyTorch and, when installed, ONNX Runtime (see `tasprune.deploy`).
    """

    batch_sizes: tuple[int, ...] = setting((1, 64), "batch sizes to time")
    warmup: int = setting(3, "untimed passes per model, round and batch size")
    repeats: int = setting(20, "most timed passes per model, round and batch size")
    min_repeats: int = setting(3, "fewest timed passes per model, round and batch size")
    max_seconds: float = setting(10.0, "time cap of a batch size's timed passes, all "
                                 "rounds and models together")
    device: str = setting("cpu", "device to time on")
    rounds: int = setting(5, "rounds alternating the models")
    threads: int | None = setting(None, "intra-op threads while timing (null: torch's "
                                  "setting)")
    deploy: bool = setting(True, "also time the deployable form (BatchNorm folded) in "
                           "PyTorch and ONNX Runtime")

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_sizes", tuple(int(b) for b in self.batch_sizes))
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"latency batch sizes must be >= 1, got {list(self.batch_sizes)}")
        if self.warmup < 0:
            raise ValueError(f"latency warm-up must be >= 0, got {self.warmup}")
        if not 1 <= self.min_repeats <= self.repeats:
            raise ValueError(f"need 1 <= min_repeats <= repeats, got {self.min_repeats} and "
                             f"{self.repeats}")
        if self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")
        if self.rounds < 1:
            raise ValueError(f"latency rounds must be >= 1, got {self.rounds}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"latency threads must be >= 1 (or null for torch's setting), "
                             f"got {self.threads}")


@runtime_checkable
class Target(Protocol):
    """Something to time: `prepare` returns a forward pass on a fixed random input."""

    def prepare(self, batch: int, input_shape: tuple[int, int, int], threads: int,
                device: torch.device) -> Forward:
        """A no-argument callable running one forward pass of `batch` inputs of
        [C, H, W] `input_shape` on `threads` intra-op threads."""
        ...


def random_input(batch: int, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """The timing input: the same random batch for every model (seeded)."""
    return torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))


class TorchTarget:
    """A PyTorch module as a `Target`: eval mode, on the timing device."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def prepare(self, batch: int, input_shape: tuple[int, int, int], threads: int,
                device: torch.device) -> Forward:
        model = self.model.to(device).eval()
        x = random_input(batch, input_shape).to(device)

        def forward() -> object:
            out = model(x)
            _sync(device)
            return out

        return forward


@dataclass(frozen=True)
class Spread:
    """A median with the smallest and largest value it was taken over."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float] | tuple[float, ...]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def to_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.low, "max": self.high}


@dataclass(frozen=True)
class PairedLatency:
    """Result of `paired_latency`. `round_ms[name][batch]`: that model's median ms in
    every round, in round order."""

    threads: int
    rounds: int
    device: str
    round_ms: dict[str, dict[int, tuple[float, ...]]]

    @property
    def names(self) -> list[str]:
        return list(self.round_ms)

    def ms(self, name: str) -> dict[int, Spread]:
        """By batch size: median of the round medians, with their min and max."""
        return {b: Spread.of(v) for b, v in self.round_ms[name].items()}

    def speedup(self, baseline: str, name: str) -> dict[int, Spread]:
        """By batch size: median over rounds of (baseline ms / `name` ms) in the same round,
        with the smallest and largest of those ratios."""
        out = {}
        for batch, base in self.round_ms[baseline].items():
            ratios = [b / m for b, m in zip(base, self.round_ms[name][batch], strict=True)]
            out[batch] = Spread.of(ratios)
        return out

    def to_dict(self, baseline: str | None = None) -> dict[str, Any]:
        """JSON-ready: threads, rounds, device, ms[name][str(batch)] = {median, min, max},
        rounds_ms (the round medians) and, given a baseline, speedup[name][str(batch)] =
        {median, min, max} for every other model."""
        out: dict[str, Any] = {
            "threads": self.threads, "rounds": self.rounds, "device": self.device,
            "ms": {n: {str(b): s.to_dict() for b, s in self.ms(n).items()} for n in self.names},
            "rounds_ms": {n: {str(b): list(v) for b, v in rows.items()}
                          for n, rows in self.round_ms.items()},
        }
        if baseline is not None:
            out["baseline"] = baseline
            out["speedup"] = {n: {str(b): s.to_dict()
                                  for b, s in self.speedup(baseline, n).items()}
                              for n in self.names if n != baseline}
        return out


def paired_latency(
    models: Mapping[str, nn.Module | Target],
    input_shape: tuple[int, int, int],
    config: LatencyConfig | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> PairedLatency:
    """Time `models` against each other in alternating rounds (see the module doc).

    `models` maps a name to a PyTorch module (timed in eval mode on `config.device`,
    moved there, its train/eval mode restored afterwards) or a `Target`. `clock` is the
    timer in seconds (a parameter for tests).
    """
    config = config or LatencyConfig()
    if not models:
        raise ValueError("paired_latency needs at least one model to time")
    device = torch.device(config.device)
    targets = {name: TorchTarget(m) if isinstance(m, nn.Module) else m
               for name, m in models.items()}
    modes = {name: m.training for name, m in models.items() if isinstance(m, nn.Module)}
    names = list(targets)
    slot_seconds = config.max_seconds / (config.rounds * len(names))
    previous = torch.get_num_threads()
    threads = config.threads or previous
    round_ms: dict[str, dict[int, tuple[float, ...]]] = {n: {} for n in names}
    try:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            for batch in config.batch_sizes:
                forwards = {n: targets[n].prepare(batch, input_shape, threads, device)
                            for n in names}
                medians: dict[str, list[float]] = {n: [] for n in names}
                for r in range(config.rounds):
                    for name in names if r % 2 == 0 else names[::-1]:
                        medians[name].append(
                            1000.0 * _time_slot(forwards[name], config, slot_seconds, clock))
                for name in names:
                    round_ms[name][batch] = tuple(medians[name])
    finally:
        torch.set_num_threads(previous)
        for name, training in modes.items():
            models[name].train(training)  # type: ignore[union-attr]
    return PairedLatency(threads=threads, rounds=config.rounds, device=str(device),
                         round_ms=round_ms)


def _time_slot(forward: Forward, config: LatencyConfig, seconds: float,
               clock: Callable[[], float]) -> float:
    """One model's turn in a round: warm-up, then timed passes; their median in seconds."""
    for _ in range(config.warmup):
        forward()
    times: list[float] = []
    end = clock() + seconds
    while len(times) < config.repeats:
        start = clock()
        forward()
        stop = clock()
        times.append(stop - start)
        if len(times) >= config.min_repeats and stop > end:
            break
    return statistics.median(times)


def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    config: LatencyConfig | None = None,
) -> dict[int, float]:
    """Median milliseconds per forward pass of one model, by batch size, for inputs of
    [C, H, W] `input_shape` (`paired_latency` with the model alone: the median of its
    round medians)."""
    paired = paired_latency({"model": model}, input_shape, config)
    return {b: s.median for b, s in paired.ms("model").items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
