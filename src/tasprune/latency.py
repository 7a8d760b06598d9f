"""Measured inference latency (CPU by default): the honest third number next to FLOPs and params.

FLOPs do not predict speed well for pruned nets (odd channel counts, memory
bound layers), so tasprune reports wall-clock latency: the median of repeated
forward passes on random input, after warm-up, under `torch.inference_mode`.
The thread count in use is reported with the numbers, since it changes them.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LatencyConfig:
    """Batch sizes to time, warm-up passes, repeats (the median is reported), time cap.

    Each batch size runs at least `min_repeats` and at most `repeats` timed passes,
    stopping early once `max_seconds` are spent (large nets at batch 64 on CPU).
    """

    batch_sizes: tuple[int, ...] = (1, 64)
    warmup: int = 3
    repeats: int = 20
    min_repeats: int = 3
    max_seconds: float = 10.0
    device: str = "cpu"

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


def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    config: LatencyConfig | None = None,
) -> dict[int, float]:
    """Median milliseconds per forward pass, by batch size, for inputs of [C, H, W] `input_shape`.

    The model is timed in eval mode on `config.device` (returned to its previous
    mode afterwards; it is moved to that device).
    """
    config = config or LatencyConfig()
    device = torch.device(config.device)
    was_training = model.training
    model = model.to(device).eval()
    result: dict[int, float] = {}
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch in config.batch_sizes:
            x = torch.randn(batch, *input_shape, generator=gen).to(device)
            for _ in range(config.warmup):
                model(x)
            times: list[float] = []
            budget_end = time.perf_counter() + config.max_seconds
            while len(times) < config.repeats:
                _sync(device)
                start = time.perf_counter()
                model(x)
                _sync(device)
                times.append(time.perf_counter() - start)
                if len(times) >= config.min_repeats and time.perf_counter() > budget_end:
                    break
            result[batch] = 1000.0 * statistics.median(times)
    model.train(was_training)
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
