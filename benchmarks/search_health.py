"""Search health of the demo over seeds: prints one JSON line per seed.

Runs `tasprune demo` (the `demo` recipe: teacher, search, KD training on the bundled
Fashion-MNIST subset) with every phase's seed set to each of --seeds, into
ROOT/seed<k>, and reads back what the search ended with: the expected and argmax
FLOPs ratios against the target band, the mean width/depth entropy against that of
uniform distributions, the argmax shape's recalibrated accuracy on the held-out
half against the teacher's on the same images, what the derivation did, the time
spent in the search and in the whole run, and the test accuracies. Re-running
reads finished runs back.

    PYTHONPATH=src python benchmarks/search_health.py --seeds 0 1 2 --out runs/health
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tasprune._io import read_jsonl
from tasprune.pipeline import load_prune_config, prune


def health(run: Path, seconds: float) -> dict[str, object]:
    """The numbers of one finished demo run directory."""
    records = read_jsonl(run / "metrics.jsonl")
    search = [r for r in records if r["phase"] == "search"]
    derive = next(r for r in records if r["phase"] == "derive")
    last = search[-1]
    summary = json.loads((run / "summary.json").read_text())
    target, tolerance = last["target_ratio"], derive["tolerance"]
    return {
        "run": str(run), "epochs": len(search), "target_ratio": target,
        "expected_ratio": round(last["expected_ratio"], 4),
        "expected_in_band": target - tolerance <= last["expected_ratio"] <= target,
        "argmax_ratio": round(last["flops_ratio"], 4),
        "derived_ratio": round(derive["flops_ratio"], 4), "adjusted": derive["adjusted"],
        "width_entropy": round(last["width_entropy"], 3),
        "width_entropy_start": round(last["width_entropy_max"], 3),
        "width_entropy_halved": last["width_entropy"] <= last["width_entropy_max"] / 2,
        "depth_entropy": round(last["depth_entropy"], 3),
        "subnet_acc": last["subnet_acc"], "teacher_acc": last["teacher_acc"],
        "subnet_vs_teacher": round(last["subnet_acc"] / last["teacher_acc"], 3),
        "blocks": derive["blocks"],
        "search_seconds": round(sum(r["seconds"] for r in search), 1),
        "run_seconds": round(seconds, 1),
        "test_acc_teacher": summary["acc_full"], "test_acc_pruned": summary["acc_pruned"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", required=True, metavar="ROOT")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides of the demo recipe for every run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        run = root / f"seed{seed}"
        seeds = [f"{phase}.seed={seed}" for phase in ("teacher_train", "search", "train")]
        config = load_prune_config("demo", (*seeds, *args.overrides))
        start = time.perf_counter()
        prune(config, run, quiet=True)
        print(json.dumps({"seed": seed, **health(run, time.perf_counter() - start)}),
              flush=True)


if __name__ == "__main__":
    main()
