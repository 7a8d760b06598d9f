"""Does a latency budget hold when the derived net is timed? Prediction against measurement.

For every run directory searched under a latency budget (`--latency-ratio`), the
derived shape and the unpruned network are timed paired (`tasprune.latency.
paired_latency`: alternating rounds, fixed threads) at every batch size of the budget,
and set beside the latency table's prediction (`tasprune.latency_table`, the same
cached table the search used when the thread count matches):

* target: the budget (latency of the pruned net over the unpruned net's);
* predicted_ratio / measured_ratio: the table's and the clock's ratio (the measured
  one is the median over rounds of pruned ms / dense ms);
* predicted_ms / measured_ms: both nets' absolute times;
* off_target: measured_ratio / target - 1 (the issue asks for |.| <= 0.10).

Prints one JSON line per run and batch size. Writes no files (the latency table's cache
aside, when an entry is missing).

    python benchmarks/latency_budget.py --runs runs/lat50-s0 runs/lat50-s1 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tasprune import build_model, load_shape
from tasprune._io import read_jsonl
from tasprune.latency import LatencyConfig, paired_latency
from tasprune.latency_table import LatencyTable


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Measured vs predicted latency of shapes searched "
                                "under a latency budget; JSON lines on stdout.")
    p.add_argument("--runs", nargs="+", required=True, metavar="DIR")
    p.add_argument("--threads", type=int, default=0, help="threads (0: torch's count; use "
                   "the search's)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeats", type=int, default=10)
    return p


def budgets_of(run: Path) -> dict[int, float]:
    """batch -> target latency ratio, from the run's derive record."""
    derive = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("phase") == "derive"]
    if not derive or "budgets" not in derive[-1]:
        raise SystemExit(f"latency_budget.py: {run}: no derive record with budgets (not a "
                         "search with --latency-ratio?)")
    return {int(name.split("@")[1]): b["target"] for name, b in derive[-1]["budgets"].items()
            if name.startswith("latency@")}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    for run in map(Path, args.runs):
        shape = load_shape(str(run / "shape.json"))
        dense = shape.plan.full()
        budgets = budgets_of(run)
        if not budgets:
            raise SystemExit(f"latency_budget.py: {run}: the search had no latency budget")
        config = LatencyConfig(batch_sizes=tuple(sorted(budgets)), warmup=2,
                               repeats=args.repeats, min_repeats=1, rounds=args.rounds,
                               threads=threads, max_seconds=60.0, deploy=False)
        size = (shape.in_channels, shape.resolution, shape.resolution)
        result = paired_latency({"dense": build_model(dense), "pruned": build_model(shape)},
                                size, config)
        for batch, target in sorted(budgets.items()):
            table = LatencyTable.cached(batch, "cpu", threads)
            rounds = zip(result.round_ms["pruned"][batch], result.round_ms["dense"][batch],
                         strict=True)
            ratios = sorted(p / d for p, d in rounds)
            measured = ratios[len(ratios) // 2]
            ms = {k: result.ms(k)[batch].median for k in ("dense", "pruned")}
            predicted = {"dense": table.predict(dense), "pruned": table.predict(shape)}
            print(json.dumps({
                "run": str(run), "batch": batch, "threads": threads, "target": target,
                "flops_ratio": shape.count("flops") / dense.count("flops"),
                "predicted_ratio": predicted["pruned"] / predicted["dense"],
                "measured_ratio": measured,
                "measured_ratio_range": [ratios[0], ratios[-1]],
                "off_target": measured / target - 1,
                "predicted_ms": predicted, "measured_ms": ms,
            }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
