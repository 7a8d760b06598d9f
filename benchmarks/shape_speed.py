"""Which search space gives shapes that run fast: free vs coupled residual widths, any
width vs multiples of 8.

For every model and space variant, `--samples` shapes are drawn at `--ratio` of the
FLOPs (the random baseline of that space: the costliest of 1,000 uniform draws that
fits, one seed per sample), and each is timed paired with the unpruned network
(`tasprune.latency.paired_latency`: alternating rounds, fixed threads). The measure is
the *efficiency* at each batch size: the measured speed-up over the ideal one (dense
FLOPs / pruned FLOPs); 1.0 means the FLOP cut turned fully into time.

Prints one JSON line per shape and thread count, then one summary line per model,
variant and thread count (mean and min/max efficiency over the samples).

    python benchmarks/shape_speed.py --models resnet20 resnet56 --threads 1 2 --samples 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from tasprune import ModelSpec, PlanShape, build_model
from tasprune.baselines import random_shape
from tasprune.latency import LatencyConfig, paired_latency
from tasprune.models.network import full_network
from tasprune.models.registry import default_resolution
from tasprune.tas.space import SearchSpace

VARIANTS = {  # name -> (coupled residual widths, channel multiple)
    "free": (False, 1),
    "free-x8": (False, 8),
    "coupled": (True, 1),
    "coupled-x8": (True, 8),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Efficiency (speed-up over FLOP reduction) of "
                                "random shapes of each search-space variant, JSON lines on "
                                "stdout. Writes no files.")
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--ratio", type=float, default=0.5, help="FLOP budget of the shapes")
    p.add_argument("--samples", type=int, default=4, help="shapes per model and variant")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    return p


def measure(shape: PlanShape, config: LatencyConfig) -> dict[str, Any]:
    dense = shape.plan.full()
    size = (shape.in_channels, shape.resolution, shape.resolution)
    result = paired_latency({"dense": build_model(dense), "pruned": build_model(shape)}, size,
                            config)
    ideal = dense.count("flops") / shape.count("flops")
    speed = result.speedup("dense", "pruned")
    return {"flops_ratio": 1 / ideal, "ideal": ideal, "threads": result.threads,
            "speedup": {str(b): s.median for b, s in speed.items()},
            "efficiency": {str(b): s.median / ideal for b, s in speed.items()}}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    summary: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    for model in args.models:
        spec = ModelSpec(model, 10, 3, default_resolution(model))
        for variant in args.variants:
            coupled, multiple = VARIANTS[variant]
            _, plan = full_network(spec, free=not coupled)
            space = SearchSpace.from_plan(plan, multiple_of=multiple)
            shapes = [random_shape(space, args.ratio, seed=seed)
                      for seed in range(args.samples)]
            for seed, shape in enumerate(shapes):
                for threads in args.threads:
                    config = LatencyConfig(batch_sizes=tuple(args.batch_sizes), warmup=2,
                                           repeats=args.repeats, min_repeats=1,
                                           rounds=args.rounds, threads=threads,
                                           device=args.device, max_seconds=30.0)
                    record = {"model": model, "variant": variant, "seed": seed,
                              **measure(shape, config)}
                    print(json.dumps(record), flush=True)
                    summary.setdefault((model, variant, threads), []).append(
                        record["efficiency"])
    for (model, variant, threads), rows in summary.items():
        eff = {b: [r[b] for r in rows] for b in rows[0]}
        print(json.dumps({"summary": True, "model": model, "variant": variant,
                          "threads": threads, "samples": len(rows),
                          "efficiency_mean": {b: round(statistics.mean(v), 3)
                                              for b, v in eff.items()},
                          "efficiency_range": {b: [round(min(v), 3), round(max(v), 3)]
                                               for b, v in eff.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
