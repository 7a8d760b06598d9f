"""`tasprune prune`, `baseline` and `demo`: the whole job into one run directory."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tasprune.commands._common import add_log_argument, check_out_dir
from tasprune.dist import env_rank
from tasprune.flags import add_config_flags, config_values
from tasprune.settings import METHODS, PruneConfig

RUN_FILES = ("config.yaml (resolved settings), teacher/ (the trained unpruned net, unless "
             "--teacher or --weights), search.pt, shape.json, train.pt, best.pt, "
             "model.safetensors (the pruned model), metrics.jsonl (one line per epoch and "
             "phase), summary.json, report.md and PNG plots")
BASELINE_METHODS = tuple(m for m in METHODS if m != "tas")

# the prune settings with a flag of their own besides the generated --search-... one
_SHORT_FLAGS = {f"search.{name}": f"--{name.replace('_', '-')}" for name in (
    "flops_ratio", "params_ratio", "latency_ratio", "channel_multiple", "couple_residual")}


def add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="the whole job: teacher, search, KD training, evaluation, report",
        description="Prune a network to a FLOP, parameter or latency budget: train the "
        "unpruned teacher (unless --teacher or --weights), search the shape by TAS, train it "
        "with knowledge distillation, evaluate and report. Works for every --model: the "
        "built-in ResNets, the zoo networks and your own. Writes into --out DIR: "
        f"{RUN_FILES}. Re-running the same command resumes: finished phases are skipped, "
        "interrupted ones continue from their checkpoint. Settings: defaults < --config "
        "recipe < these flags < key=value overrides (dotted keys, e.g. search.epochs=20 "
        "train.batch_size=64). On several processes: `torchrun --nproc_per_node N -m "
        "tasprune prune ...`.",
    )
    _add_run_arguments(p)
    p.set_defaults(func=cmd_prune, writes_run="prune")


def add_baseline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "baseline",
        help="prune with a hand-set method (uniform, l1, random) instead of TAS, same pipeline",
        description="Like `prune`, but the shape comes from a baseline at the same budget "
        "instead of a search: uniform (one width ratio for every channel group, by "
        "bisection), l1 (global ranking of the teacher's channels by the mean |weight| of the "
        "rows writing them; the pruned net inherits the teacher's weights) or random (the "
        "best of random_samples=N shapes drawn from the TAS search space, never above the "
        "budget). The shape is trained with the same recipe (KD unless --no-kd). Writes into "
        f"--out DIR: {RUN_FILES.replace('search.pt, ', '')} (no search.pt; the 'derive' line "
        "of metrics.jsonl names the method). Re-running resumes as `prune` does. Same "
        "settings as `prune` (recipe, flags, key=value overrides).",
    )
    p.add_argument("--method", required=True, choices=BASELINE_METHODS, dest="config:method",
                   help="how the pruned shape is chosen")
    _add_run_arguments(p, skip=("method",))
    p.set_defaults(func=cmd_prune, writes_run="prune")


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole method in minutes on the bundled Fashion-MNIST subset",
        description="Run `prune` with the shipped `demo` recipe (a small ResNet on the bundled "
        "6,000-image Fashion-MNIST subset, half the FLOPs, a few minutes on 2 CPU cores) and "
        f"print the summary table. Writes into --out DIR (default runs/demo): {RUN_FILES}. "
        "Re-running resumes or, when finished, just prints the summary.",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    add_log_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_demo, writes_run="prune")


def _add_run_arguments(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """The arguments `prune` and `baseline` share: every PruneConfig field as a flag, and
    the shortcuts."""
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. search.epochs=10 teacher_train.epochs=5")
    p.add_argument("--out", required=True,
                   help="run directory (created, with its parent if only that is missing)")
    p.add_argument("--config", help="recipe: a YAML file or a shipped name (see "
                   "`tasprune recipes`)")
    p.add_argument("--no-kd", action="store_true", help="train the pruned shape without "
                   "knowledge distillation (same as --train-kd-alpha 0)")
    p.add_argument("--seed", type=int, help="seed of every phase")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N for every phase")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    add_config_flags(p, PruneConfig, "job settings (PruneConfig)", skip=skip,
                     aliases=_SHORT_FLAGS)


def budget_alone(values: dict[str, Any], section: str) -> dict[str, Any]:
    """A parameter or latency budget given alone on the command line drops the FLOP budget
    of the defaults or the recipe."""
    node = values.setdefault(section, {}) if section else values
    if "flops_ratio" not in node and ("params_ratio" in node or "latency_ratio" in node):
        node["flops_ratio"] = None
    return values


def _prune_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The command line's settings of `prune`/`baseline`, as a nested mapping."""
    values = budget_alone(config_values(args), "search")
    if args.no_kd:
        values.setdefault("train", {})["kd_alpha"] = 0
    for phase in ("teacher_train", "search", "train"):
        node = values.setdefault(phase, {})
        for name in ("seed", "device"):
            if getattr(args, name) is not None:
                node.setdefault(name, getattr(args, name))
    return values


def _run_prune(recipe: str | None, flags: dict[str, Any], overrides: list[str], out: str,
               quiet: bool) -> int:
    from tasprune.pipeline import load_prune_config, prune
    from tasprune.report import format_summary

    config = load_prune_config(recipe, tuple(overrides), flags=flags)
    summary = prune(config, out, quiet=quiet)
    if env_rank():
        return 0  # under torchrun, rank 0 reports
    print(format_summary(summary))
    print(f"\nrun directory: {out} (report: {out}/report.md, model: {out}/model.safetensors "
          "+ shape.json: `tasprune eval`, `tasprune export`, tasprune.load_model)")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    check_out_dir(args.out)
    return _run_prune(args.config, _prune_flags(args), list(args.overrides), args.out,
                      args.quiet)


def cmd_demo(args: argparse.Namespace) -> int:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    flags = {} if args.log is None else {"log": list(args.log)}
    return _run_prune("demo", flags, list(args.overrides), args.out, args.quiet)
