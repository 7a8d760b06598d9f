"""Evaluate a trained model: test accuracy, FLOPs, params and measured latency together."""

from __future__ import annotations

from typing import Any

import torch

from tasprune.data.source import DataBundle
from tasprune.flops import count_flops, count_params
from tasprune.latency import LatencyConfig, measure_latency
from tasprune.models import ResNet
from tasprune.train.loop import LoopOptions, evaluate
from tasprune.train.trainer import check_fits_data


def evaluate_model(
    model: ResNet,
    data: DataBundle,
    device: torch.device,
    batch_size: int = 256,
    latency: LatencyConfig | None = LatencyConfig(),
    quiet: bool = False,
    what: str = "model",
) -> dict[str, Any]:
    """Accuracy on `data.test`, exact FLOPs/params at the data's resolution, CPU latency.

    `latency=None` skips the timing. Keys: acc, top5, loss (fractions / nats),
    images, flops, params, latency_ms (str(batch) -> median ms), threads.
    """
    check_fits_data(model.shape, data, what)
    shape = model.shape.replace(resolution=data.resolution)  # count at the resolution evaluated
    test = evaluate(model.to(device), data.test, data.transform,
                    LoopOptions(batch_size=batch_size, device=device, quiet=quiet, desc=what))
    timed = {} if latency is None else measure_latency(
        model, (shape.in_channels, shape.resolution, shape.resolution), latency)
    return {"acc": test["acc"], "top5": test["top5"], "loss": test["loss"],
            "images": int(test["images"]), "flops": count_flops(shape),
            "params": count_params(shape), "latency_ms": {str(b): ms for b, ms in timed.items()},
            "threads": torch.get_num_threads()}
