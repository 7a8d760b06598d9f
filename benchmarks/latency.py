"""Dense vs pruned inference latency: measured speed-up next to the FLOP reduction.

For every pruned shape (the published TAS shapes shipped with tasprune, and/or the
shape.json of run directories) the unpruned network of the same family, classes and
resolution is timed against it with `tasprune.latency.paired_latency` (random
weights and input: latency does not depend on them; eval mode, inference_mode,
warm-up): dense and pruned alternate over `--rounds` rounds so load on a shared
machine hits both; a latency is the median of the rounds' medians, a speed-up the
median of the per-round ratios dense / pruned, each with its min and max over the
rounds. CPU always; CUDA too when present (or pick with --devices).

Prints one JSON line per model and device: FLOPs and params of both, flops_ratio
(pruned / dense), flops_speedup (dense / pruned FLOPs: the ideal speed-up), threads,
rounds, the measured latency_ms (medians) and speedup by batch size, and their
spread (latency_spread_ms, speedup_spread: [min, max]); --markdown adds a table.

    python benchmarks/latency.py --paper C010 --threads 2 --batch-sizes 1 64 --repeats 10
    python benchmarks/latency.py --runs runs/demo --paper ImageNet-ResNet18V1 --batch-sizes 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from tasprune import PlanShape, build_model, load_shape, paper_shape_names
from tasprune.latency import LatencyConfig, paired_latency


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Dense vs pruned latency (median ms) and speed-up next to the FLOP "
        "reduction, one JSON line per model and device on stdout. Writes no files.")
    p.add_argument("--runs", nargs="+", default=[], metavar="DIR",
                   help="run directories (or shape.json files) whose pruned shape to time")
    p.add_argument("--paper", nargs="*", metavar="NAME",
                   help="published TAS shapes to time: names or prefixes (C010, C100, "
                   "ImageNet); no value = all; default: all when no --runs are given")
    p.add_argument("--resolution", type=int, help="input size for every model (default: "
                   "each shape's own: 32 for CIFAR shapes, 224 for ImageNet)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeats", type=int, default=10, help="timed passes per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed passes before each round")
    p.add_argument("--rounds", type=int, default=3, help="rounds alternating dense and pruned")
    p.add_argument("--max-seconds", type=float, default=10.0,
                   help="time cap of a batch size's timed passes over all rounds and both "
                   "models (at least 1 pass per round)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--devices", nargs="+", help="cpu and/or cuda (default: cpu, and cuda "
                   "when available)")
    p.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    return p


def select_paper(patterns: list[str] | None) -> list[str]:
    """Published shape names matching any of `patterns` (exact or prefix); [] = all."""
    names = paper_shape_names()
    if not patterns:
        return names
    chosen = [n for n in names if any(n == p or n.startswith(p) for p in patterns)]
    unknown = [p for p in patterns if not any(n == p or n.startswith(p) for n in names)]
    if unknown:
        raise SystemExit(f"latency.py: no published shape matches {unknown}; known: "
                         f"{', '.join(names)}")
    return chosen


def _run_shape(path: str, resolution: int | None) -> PlanShape:
    p = Path(path)
    file = p / "shape.json" if p.is_dir() else p
    if not file.is_file():
        raise SystemExit(f"latency.py: {path}: no shape.json (not a run directory?)")
    return load_shape(str(file), resolution=resolution)


def compare(name: str, pruned: PlanShape, device: str, config: LatencyConfig
            ) -> dict[str, Any]:
    """Time the unpruned net `pruned` prunes against it (paired, `config.rounds` rounds);
    one result record."""
    dense = pruned.plan.full()
    size = (pruned.in_channels, pruned.resolution, pruned.resolution)
    config = LatencyConfig(**{**config.__dict__, "device": device})
    result = paired_latency({"dense": build_model(dense), "pruned": build_model(pruned)},
                            size, config)
    ms = {k: result.ms(k) for k in ("dense", "pruned")}
    speed = result.speedup("dense", "pruned")
    fd, fp = dense.count("flops"), pruned.count("flops")
    return {
        "name": name, "device": device, "threads": result.threads, "rounds": result.rounds,
        "resolution": pruned.resolution, "blocks": list(pruned.blocks),
        "flops_dense": fd, "flops_pruned": fp, "flops_ratio": fp / fd, "flops_speedup": fd / fp,
        "params_dense": dense.count("params"), "params_pruned": pruned.count("params"),
        "latency_ms": {k: {str(b): s.median for b, s in rows.items()} for k, rows in ms.items()},
        "latency_spread_ms": {k: {str(b): [s.low, s.high] for b, s in rows.items()}
                              for k, rows in ms.items()},
        "speedup": {str(b): s.median for b, s in speed.items()},
        "speedup_spread": {str(b): [s.low, s.high] for b, s in speed.items()},
    }


def markdown(records: list[dict[str, Any]]) -> str:
    batches = sorted({b for r in records for b in r["speedup"]}, key=int)
    head = "| model | device | FLOPs ratio | ideal speed-up | " + " | ".join(
        f"dense / pruned ms, batch {b} | speed-up [min, max], batch {b}" for b in batches) + " |"
    lines = [head, "| --- | --- |" + " ---: |" * (2 + 2 * len(batches))]
    for r in records:
        cells = [f"{r['latency_ms']['dense'][b]:.2f} / {r['latency_ms']['pruned'][b]:.2f} | "
                 f"{r['speedup'][b]:.2f}x [{r['speedup_spread'][b][0]:.2f}, "
                 f"{r['speedup_spread'][b][1]:.2f}]" for b in batches]
        lines.append(f"| {r['name']} | {r['device']} | {r['flops_ratio']:.3f} | "
                     f"{r['flops_speedup']:.2f}x | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("latency.py: CUDA is not available on this machine")
    config = LatencyConfig(batch_sizes=tuple(args.batch_sizes), warmup=args.warmup,
                           repeats=args.repeats, min_repeats=1, max_seconds=args.max_seconds,
                           rounds=args.rounds, threads=args.threads)
    targets = [(str(r), _run_shape(r, args.resolution)) for r in args.runs]
    if args.paper is not None or not args.runs:
        targets += [(n, load_shape(n, resolution=args.resolution))
                    for n in select_paper(args.paper)]
    records = []
    for name, shape in targets:
        for device in devices:
            record = compare(name, shape, device, config)
            records.append(record)
            print(json.dumps(record), flush=True)
    if args.markdown:
        print(markdown(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
