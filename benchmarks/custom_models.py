"""Networks of your own (traced by torch.fx): TAS against uniform and L1 at equal FLOPs.

For every model, one `tasprune prune --model FILE.py:FACTORY` run directory per method
under ROOT/<model>/<method>: the "tas" run trains the unpruned teacher (into
ROOT/<model>/tas/teacher/); "uniform" and "l1" take that teacher as --teacher. Every
method trains its pruned network for the same epochs with KD from the teacher (TAS also
spends the search epochs):

    tas      Taylor reorder, TAS search, the shape trained from scratch with KD
    uniform  one width ratio for every channel group (bisection), fresh weights, KD
    l1       the teacher's channels of largest L1 norm (global ranking), inherited, KD

Prints one JSON line per run (accuracy, FLOPs, params, CPU latency of dense and pruned
at batch 1 and 64, measured in alternating rounds at the end of the run) and writes
ROOT/results.jsonl and ROOT/results.md. Run it alone on the machine.

    python benchmarks/custom_models.py --data fashion-mnist --teacher-epochs 3 \\
        --search-epochs 2 --train-epochs 3 --out runs/bench-custom
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from tasprune.latency import LatencyConfig
from tasprune.models import zoo
from tasprune.pipeline import prune
from tasprune.settings import PruneConfig, SearchConfig, TrainConfig

METHODS = ("tas", "uniform", "l1")


def mobilenet_v2(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """MobileNetV2 with its ImageNet strides (28 px inputs end at 1x1)."""
    return zoo.mobilenet_v2(num_classes=num_classes, in_channels=in_channels,
                            small_input=False)


def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-18 in torchvision's layout with its ImageNet stem (28 px -> 7 px)."""
    return zoo.resnet18(num_classes=num_classes, in_channels=in_channels)


MODELS = {"mobilenet_v2": mobilenet_v2, "resnet18": resnet18}


def config(model: str, method: str, args: argparse.Namespace, teacher: str | None
           ) -> PruneConfig:
    train = TrainConfig(epochs=args.train_epochs, batch_size=args.batch_size,
                        lr=args.lr, seed=args.seed, quiet=args.quiet)
    return PruneConfig(
        model=f"{Path(__file__).resolve()}:{model}", data=args.data, method=method,
        teacher=teacher,
        teacher_train=TrainConfig(epochs=args.teacher_epochs, batch_size=args.batch_size,
                                  seed=args.seed, quiet=args.quiet),
        search=SearchConfig(epochs=args.search_epochs, batch_size=args.batch_size,
                            flops_ratio=args.flops_ratio, seed=args.seed),
        train=train,
        latency=LatencyConfig(batch_sizes=(1, 64), threads=args.threads))


def table(records: list[dict]) -> str:
    lines = ["| model | method | test acc | teacher acc | FLOPs ratio | params ratio | "
             "latency b1 (ms) dense / pruned | latency b64 (ms) dense / pruned |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        ms = r["latency"]["ms"]
        lat = [f"{ms['dense'][b]['median']:.2f} / {ms['pruned'][b]['median']:.2f}"
               for b in ("1", "64")]
        lines.append(f"| {r['name']} | {r['method']} | {r['acc_pruned']:.4f} | "
                     f"{r['acc_full']:.4f} | {r['flops_pruned'] / r['flops_full']:.3f} | "
                     f"{r['params_pruned'] / r['params_full']:.3f} | {lat[0]} | {lat[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--flops-ratio", type=float, default=0.5)
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--search-epochs", type=int, default=2)
    p.add_argument("--train-epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05, help="fine-tuning learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default="runs/bench-custom")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.out)
    records = []
    for name in args.models:
        teacher = root / name / "tas" / "teacher"
        for method in args.methods:
            out = root / name / method
            if (out / "summary.json").is_file():
                summary = json.loads((out / "summary.json").read_text())
            else:
                given = str(teacher) if (teacher / "model.safetensors").is_file() else None
                summary = prune(config(name, method, args, given), out, quiet=args.quiet)
            record = {"name": name, "threads": args.threads, **summary,
                      "epochs": {"teacher": args.teacher_epochs, "search": args.search_epochs,
                                 "train": args.train_epochs}}
            print(json.dumps(record), flush=True)
            records.append(record)
    with (root / "results.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    (root / "results.md").write_text(table(records) + "\n")
    print(table(records), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
