"""TAS against uniform, L1-norm and random pruning at equal FLOPs, same data, same training.

Trains ONE unpruned teacher into ROOT/teacher (or takes --teacher), then for every
seed runs each method as a `tasprune prune` run directory ROOT/<method>-seed<k>:

    tas       TAS search (supernet started from the teacher), KD training
    tas-nokd  the same search (reused from tas-seed<k> when that one has finished it),
              training without KD (train.kd_alpha=0)
    uniform   one width ratio for every conv (bisection), KD training
    l1        global L1-norm filter ranking of the teacher, weights inherited, KD training
    random    best of `random_samples` shapes drawn from the TAS search space, KD training
    uniform-eq, l1-eq, random-eq
              the same baselines trained for the search epochs longer (equal total
              compute: a search epoch passes over the training set once, as a training
              epoch does)

Every method gets the same training recipe and epochs (TAS also spends the search
epochs; the baselines have no search; the -eq ones train that much longer). The seed
sets the search and training seeds; the teacher is shared. Re-running the same command
resumes: finished runs are read back, unfinished ones continue from their checkpoints.
Prints one JSON line per finished run, then a Markdown table (mean +- sample std of
test accuracy over seeds, FLOPs, params, CPU latency at batch 1 and 64 as measured at
the end of each run), whether TAS beats the best baseline by more than the seed std,
and the search's health per TAS run; writes ROOT/results.jsonl and ROOT/results.md.

    python benchmarks/accuracy.py --model resnet20 --data fashion-mnist --flops-ratio 0.5 \\
        --teacher-epochs 30 --search-epochs 30 --train-epochs 30 --seeds 0 1 2 \\
        --out runs/bench-fmnist-r20
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from tasprune import load_data
from tasprune._io import atomic_write_text, read_jsonl
from tasprune.pipeline import PruneConfig, load_prune_config, prune
from tasprune.training.trainer import train

METHODS: dict[str, tuple[str, ...]] = {
    "tas": ("method=tas",),
    "tas-nokd": ("method=tas", "train.kd_alpha=0"),
    "uniform": ("method=uniform",),
    "l1": ("method=l1",),
    "random": ("method=random",),
    "uniform-eq": ("method=uniform",),
    "l1-eq": ("method=l1",),
    "random-eq": ("method=random",),
}
BASELINES = ("uniform", "l1", "random")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Accuracy of TAS vs baselines at one FLOP budget over seeds. Writes "
        "ROOT/teacher/ (unless --teacher), ROOT/<method>-seed<k>/ (prune run directories), "
        "ROOT/results.jsonl (one line per run) and ROOT/results.md (the table).")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="prune config overrides applied to every run, e.g. train.batch_size=64")
    p.add_argument("--out", required=True, metavar="ROOT", help="benchmark directory (created)")
    p.add_argument("--model", required=True, help="model name, e.g. resnet20")
    p.add_argument("--data", required=True, help="data spec, e.g. fashion-mnist or demo")
    p.add_argument("--flops-ratio", type=float, required=True, help="FLOP budget, in (0, 1]")
    p.add_argument("--teacher-epochs", type=int, required=True)
    p.add_argument("--search-epochs", type=int, required=True)
    p.add_argument("--train-epochs", type=int, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--teacher", metavar="PATH", help="a trained unpruned model to use instead "
                   "of training one into ROOT/teacher")
    p.add_argument("--config", help="prune recipe (YAML path or shipped name) for every run")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N for every phase")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads for this process (default: torch's choice)")
    p.add_argument("--teacher-only", action="store_true",
                   help="train (or resume) ROOT/teacher and stop; lets several processes "
                   "then share one teacher, e.g. one per --methods group")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    return p


def _base_overrides(args: argparse.Namespace, teacher: str | None) -> list[str]:
    items = [f"model={args.model}", f"data={args.data}",
             f"search.flops_ratio={args.flops_ratio}",
             f"teacher_train.epochs={args.teacher_epochs}", f"search.epochs={args.search_epochs}",
             f"train.epochs={args.train_epochs}"]
    if teacher is not None:
        items.append(f"teacher={teacher}")
    if args.device:
        items += [f"{phase}.device={args.device}" for phase in ("teacher_train", "search",
                                                                  "train")]
    return items + list(args.overrides)


def _teacher(args: argparse.Namespace, root: Path) -> str:
    """The teacher's path: --teacher, or ROOT/teacher trained (or resumed) here."""
    if args.teacher:
        return args.teacher
    tdir = root / "teacher"
    if not (tdir / "model.safetensors").is_file():
        config: PruneConfig = load_prune_config(args.config, tuple(_base_overrides(args, None)))
        data = load_data(config.data, quiet=args.quiet)
        _log(f"teacher: training the unpruned {config.model} for "
             f"{config.teacher_train.epochs} epochs into {tdir}")
        settings = dataclasses.replace(config.teacher_train,
                                       quiet=args.quiet or config.teacher_train.quiet)
        train(config.model, data, settings, tdir, resume=(tdir / "train.pt").is_file())
    return str(tdir)


def reuse_search(root: Path, seed: int, run: Path) -> bool:
    """Start tas-nokd-seed<k> from the finished search of tas-seed<k>: the same settings and
    seed give the same shape (the search is deterministic), so it is not run twice. Copies
    shape.json, search.pt and the search/derive lines; prune() then skips the search."""
    source = root / f"tas-seed{seed}"
    metrics = source / "metrics.jsonl"
    if run.exists() or not (source / "shape.json").is_file() or not metrics.is_file():
        return False
    lines = [r for r in read_jsonl(metrics) if r.get("phase") in ("search", "derive")]
    if not any(r["phase"] == "derive" for r in lines):
        return False
    run.mkdir()
    for name in ("shape.json", "search.pt"):
        if (source / name).is_file():
            shutil.copy2(source / name, run / name)
    atomic_write_text(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    return True


def _log(message: str) -> None:
    print(f"[accuracy] {message}", file=sys.stderr, flush=True)


def run_row(method: str, seed: int, summary: dict[str, Any], run: Path) -> dict[str, Any]:
    """One results line from a run's summary.json (and, for a search, its health at the last
    search epoch and what the derivation did, from metrics.jsonl)."""
    row = {"method": method, "seed": seed, "acc": summary["acc_pruned"],
           "flops": summary["flops_pruned"], "params": summary["params_pruned"],
           "ratio": summary["flops_ratio"], "latency_ms": summary["latency_ms"]["pruned"],
           "acc_teacher": summary["acc_full"], "flops_teacher": summary["flops_full"],
           "params_teacher": summary["params_full"],
           "latency_ms_teacher": summary["latency_ms"]["dense"], "run": str(run)}
    records = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    search = [r for r in records if r.get("phase") == "search"]
    derive = [r for r in records if r.get("phase") == "derive"]
    row["search_seconds"] = sum(r.get("seconds", 0.0) for r in search)
    row["train_seconds"] = sum(r.get("seconds", 0.0) for r in records
                               if r.get("phase") == "train")
    row["blocks"] = summary["shape"]["blocks"]
    if search:
        last = search[-1]
        row["health"] = {k: last.get(k) for k in (
            "subnet_acc", "teacher_acc", "width_entropy", "depth_entropy", "expected_ratio",
            "flops_ratio")}
        row["health"]["width_entropy_start"] = search[0].get("width_entropy")
    if derive:
        row["adjusted"] = derive[-1].get("adjusted", False)
    return row


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def _latency(rows: list[dict[str, Any]], key: str, batch: str) -> str:
    values = [r[key][batch] for r in rows if batch in r[key]]
    return f"{statistics.median(values):.2f}" if values else "-"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Per method: seeds, test accuracy mean ± std (%), FLOPs, ratio, params, latency."""
    lines = ["| method | seeds | top-1 test acc (%) | FLOPs (M) | FLOPs ratio | params (K) | "
             "CPU ms, batch 1 | CPU ms, batch 64 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    if rows:
        lines.append(f"| unpruned teacher | - | {100 * rows[0]['acc_teacher']:.2f} | "
                     f"{rows[0]['flops_teacher'] / 1e6:.2f} | 1.000 | "
                     f"{rows[0]['params_teacher'] / 1e3:.1f} | "
                     f"{_latency(rows, 'latency_ms_teacher', '1')} | "
                     f"{_latency(rows, 'latency_ms_teacher', '64')} |")
    for method in METHODS:
        group = [r for r in rows if r["method"] == method]
        if not group:
            continue
        lines.append(
            f"| {method} | {len(group)} | {_mean_std([r['acc'] for r in group], 100)} | "
            f"{_mean_std([r['flops'] for r in group], 1e-6)} | "
            f"{statistics.fmean(r['ratio'] for r in group):.3f} | "
            f"{_mean_std([r['params'] for r in group], 1e-3, 1)} | "
            f"{_latency(group, 'latency_ms', '1')} | {_latency(group, 'latency_ms', '64')} |")
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]]) -> str | None:
    """Does TAS beat the best baseline (same training epochs) by more than the larger
    seed standard deviation of the two? One line, or None without both."""
    def accs(method: str) -> list[float]:
        return [100 * r["acc"] for r in rows if r["method"] == method]

    tas = accs("tas")
    baselines = {m: accs(m) for m in BASELINES if accs(m)}
    if len(tas) < 2 or not baselines:
        return None
    best = max(baselines, key=lambda m: statistics.fmean(baselines[m]))
    other = baselines[best]
    margin = statistics.fmean(tas) - statistics.fmean(other)
    spread = max(statistics.stdev(tas), statistics.stdev(other) if len(other) > 1 else 0.0)
    word = "beats" if margin > spread else "does not beat"
    return (f"TAS {word} the best baseline ({best}) by more than the larger seed std: "
            f"margin {margin:+.2f} pts, larger std {spread:.2f} pts.")


def health_table(rows: list[dict[str, Any]]) -> str:
    """Per TAS run: the search's health at its last epoch and the derived shape."""
    lines = ["| run | argmax subnet acc / teacher (held-out half) | width entropy (start -> "
             "end) | depth entropy | expected FLOPs ratio | argmax FLOPs ratio | adjusted "
             "into the band | blocks |", "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        h = r.get("health")
        if r["method"] != "tas" or not h or h.get("subnet_acc") is None:
            continue
        teacher = h.get("teacher_acc")
        rel = f" ({h['subnet_acc'] / teacher:.2f}x)" if teacher else ""
        lines.append(
            f"| tas-seed{r['seed']} | {100 * h['subnet_acc']:.1f}% / "
            f"{100 * teacher:.1f}%{rel} | {h['width_entropy_start']:.2f} -> "
            f"{h['width_entropy']:.2f} | {h['depth_entropy']:.2f} | {h['expected_ratio']:.3f} | "
            f"{h['flops_ratio']:.3f} | {'yes' if r.get('adjusted') else 'no'} | "
            f"{r['blocks']} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _write_results(root: Path, rows: list[dict[str, Any]], args: argparse.Namespace,
                   argv: list[str]) -> str:
    atomic_write_text(root / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    table = markdown_table(rows)
    line = verdict(rows)
    if line:
        table += "\n\n" + line
    health = health_table(rows)
    if health:
        table += "\n\nSearch health at the last search epoch:\n\n" + health
    over = [f"{r['method']}-seed{r['seed']} ({r['ratio']:.3f})" for r in rows
            if r["ratio"] > args.flops_ratio + 1e-9]
    if over:
        table += (f"\n\nAbove the budget of {args.flops_ratio}: {', '.join(over)} (the search "
                  "did not reach the target in its epochs; compare those rows with care).")
    header = [
        f"# {args.model} on {args.data} at {args.flops_ratio} of the FLOPs", "",
        f"Seeds {args.seeds}; epochs: teacher {args.teacher_epochs}, search "
        f"{args.search_epochs} (TAS only), train {args.train_epochs} (every method; the -eq "
        f"baselines {args.train_epochs + args.search_epochs}). "
        "Accuracy: mean ± sample std over seeds; latency: median over seeds of each run's "
        "median (CPU, measured at the end of the run), on a machine with "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"{torch.get_num_threads()} torch threads.", "",
        "Command: `python benchmarks/accuracy.py " + " ".join(argv) + "`", "", ""]
    atomic_write_text(root / "results.md", "\n".join(header) + table + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    teacher = _teacher(args, root)
    if args.teacher_only:
        _log(f"teacher ready: {teacher}")
        return 0
    base = _base_overrides(args, teacher)
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        for method in args.methods:
            run = root / f"{method}-seed{seed}"
            seeds = [f"search.seed={seed}", f"train.seed={seed}"]
            longer = ([f"train.epochs={args.train_epochs + args.search_epochs}"]
                      if method.endswith("-eq") else [])
            config = load_prune_config(args.config, (*base, *METHODS[method], *seeds, *longer))
            if method == "tas-nokd" and reuse_search(root, seed, run):
                _log(f"{run.name}: starting from the search of tas-seed{seed}")
            _log(f"{run.name}: {'resuming' if run.exists() else 'starting'}")
            summary = prune(config, run, quiet=args.quiet)
            row = run_row(method, seed, summary, run)
            rows.append(row)
            print(json.dumps(row), flush=True)
            _write_results(root, rows, args, argv)
    print(_write_results(root, rows, args, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
