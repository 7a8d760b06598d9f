"""The `tasprune` command: one parser, subcommands that call plain functions.

Every subcommand is a pair: `_add_<name>(subparsers)` declares its arguments
(and says in --help what it writes where), `cmd_<name>(args) -> int` does the
work. Errors a user can fix (bad names, missing files, impossible budgets) are
reported on one line with exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import re
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasprune import __version__
from tasprune.baselines import METHODS as BASELINE_METHODS
from tasprune.config import load_config
from tasprune.data import DATA_SPEC_HELP, DataBundle, load_data
from tasprune.dist import env_rank, leave_process_group
from tasprune.faults import Interrupted, NonFiniteLoss
from tasprune.flags import add_config_flags, config_values, given
from tasprune.flops import count_params, layer_table
from tasprune.settings import PruneConfig, SearchConfig, TrainConfig
from tasprune.shape import PAPER_SHAPES_DIR, Shape, paper_shape_names


class UserError(Exception):
    """A problem with the user's input; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), like every other error of the CLI."""

    def error(self, message: str) -> typing.NoReturn:
        message = re.sub(r"^argument (--[\w-]+)/[-\w/]+:", r"argument \1:", message)  # one name
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def check_out_dir(out: str | Path, flag: str = "--out") -> Path:
    """Refuse an output directory that cannot be written, before any long work starts.

    Its parent, or the parent's parent, must exist (`--out runs/x` on a fresh clone makes
    runs/; a typo deeper in the path should not create a tree of directories, nor fail
    after hours of training), and it must not be an existing file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is an existing file, not a directory; choose another "
                        f"{flag}")
    parent = out.absolute().parent
    if not parent.is_dir() and not parent.parent.is_dir():
        raise UserError(f"output directory parent {parent} does not exist; create it first or "
                        f"choose another {flag}")
    return out


def check_resume(out: str | Path, checkpoint: str) -> None:
    """--resume needs a checkpoint to resume; starting afresh instead would hide a wrong --out."""
    from tasprune.phase import has_checkpoint

    if not has_checkpoint(Path(out) / checkpoint):
        raise UserError(f"{out} has no {checkpoint} to resume; run without --resume to start a "
                        "new run")


def load_target_shape(
    target: str,
    num_classes: int | None = None,
    resolution: int | None = None,
    in_channels: int | None = None,
) -> Shape:
    """A model name, a published TAS shape name, a shape.json or a TAS .config -> Shape."""
    path = Path(target)
    if target in paper_shape_names():
        path = PAPER_SHAPES_DIR / f"{target}.config"
    if path.suffix in (".json", ".config") or path.exists():
        if not path.is_file():
            raise UserError(f"{target}: no such file")
        shape = Shape.load(path)
        changes = {k: v for k, v in (("num_classes", num_classes), ("resolution", resolution),
                                     ("in_channels", in_channels)) if v is not None}
        return shape.replace(**changes) if changes else shape
    return Shape.full(target, num_classes=num_classes, in_channels=in_channels,
                      resolution=resolution)


def _fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


# flops ------------------------------------------------------------------------------
def _add_flops(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flops",
        help="count FLOPs and params of a model, shape.json or TAS .config",
        description="Count the multiply-accumulates (conv and linear layers; BN, ReLU, pooling "
        "and additions not counted) and the learnable parameters of a network. Prints a "
        "per-layer table, or one JSON object with --json. Writes no files.",
    )
    p.add_argument("target", help="registered model name (see `tasprune models`), a shape.json, "
                   "a TAS .config file, a published TAS shape name (e.g. C010-ResNet110), or "
                   "a network of your own as FILE.py:FACTORY or package.module:FACTORY "
                   "(counted from its torch.fx trace; --classes default 10, --in-channels 3, "
                   "--resolution 32)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--classes", type=int, help="number of classes (default: the model's)")
    p.add_argument("--resolution", type=int, help="input height = width in pixels")
    p.add_argument("--in-channels", type=int, help="input image channels (default 3)")
    p.set_defaults(func=cmd_flops)


def _custom_flops(args: argparse.Namespace) -> int:
    from tasprune.custom import plan_of, user_model

    classes, channels = args.classes or 10, args.in_channels or 3
    resolution = args.resolution or 32
    plan = plan_of(user_model(args.target, classes, channels), [channels, resolution,
                                                                resolution])
    full = plan.full()
    flops, params = full.count("flops"), full.count("params")
    if args.json:
        print(json.dumps({"target": args.target, "flops": flops, "params": params,
                          "num_classes": classes, "resolution": resolution,
                          "in_channels": channels, "groups": len(plan.searched),
                          "stages": [len(s) for s in plan.stages]}))
        return 0
    widths = full.group_widths()
    header = f"{'layer':<34} {'kind':<6} {'in':>5} {'out':>5} {'FLOPs':>14} {'block':<14}"
    print(header)
    print("-" * len(header))
    for layer in plan.layers:
        cin = sum(widths[g] for g in layer.reads)
        cout = cin if layer.writes is None else widths[layer.writes]
        cost = _layer_flops(full, layer)
        block = "" if layer.block is None else plan.blocks[layer.block].name
        print(f"{layer.name:<34} {layer.kind:<6} {cin:>5} {cout:>5} {cost:>14,} {block:<14}")
    print("-" * len(header))
    print(f"{args.target}: {plan.describe()}, {classes} classes, "
          f"{channels}x{resolution}x{resolution} input")
    print(f"FLOPs (MACs): {flops:,} ({_fmt_count(flops)})   params: {params:,} "
          f"({_fmt_count(params)})")
    return 0


def _layer_flops(full: Any, layer: Any) -> int:
    from tasprune.plan import LayerPlan, plan_cost

    plan = full.plan
    one = LayerPlan(plan.groups, (dataclasses.replace(layer, block=None),), (),
                    plan.input_shape, plan.num_classes)
    widths = full.group_widths()
    return int(plan_cost(one, widths.__getitem__, lambda a, b: widths[a] * widths[b],
                         lambda b: 1, "flops"))


def cmd_flops(args: argparse.Namespace) -> int:
    from tasprune.custom import is_factory_spec

    if is_factory_spec(args.target):
        return _custom_flops(args)
    shape = load_target_shape(args.target, args.classes, args.resolution, args.in_channels)
    layers = layer_table(shape)
    flops = int(sum(layer.flops for layer in layers))
    params = count_params(shape)
    if args.json:
        print(json.dumps({
            "target": args.target, "flops": flops, "params": params,
            "family": shape.family, "block": shape.block, "blocks": list(shape.blocks),
            "num_classes": shape.num_classes, "resolution": shape.resolution,
            "in_channels": shape.in_channels,
        }))
        return 0
    header = f"{'layer':<26} {'in':>5} {'out':>5} {'k':>2} {'size':>9} {'FLOPs':>14} {'share':>7}"
    print(header)
    print("-" * len(header))
    for layer in layers:
        size = f"{layer.out_res}x{layer.out_res}"
        print(f"{layer.name:<26} {layer.in_channels:>5} {layer.out_channels:>5} "
              f"{layer.kernel:>2} {size:>9} {int(layer.flops):>14,} "
              f"{100 * layer.flops / flops:>6.2f}%")
    print("-" * len(header))
    print(f"{args.target}: {shape.describe()}, {shape.num_classes} classes, "
          f"{shape.in_channels}x{shape.resolution}x{shape.resolution} input")
    print(f"FLOPs (MACs): {flops:,} ({_fmt_count(flops)})   params: {params:,} "
          f"({_fmt_count(params)})")
    return 0


# models -----------------------------------------------------------------------------
def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered model names with FLOPs and params",
                       description="List the registered model names. Writes no files.")
    p.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from tasprune.flops import count_flops
    from tasprune.models import list_models

    for name in list_models():
        shape = Shape.full(name)
        print(f"{name:<11} {shape.family:<16} {shape.block:<10} "
              f"{shape.resolution:>3}px  {_fmt_count(count_flops(shape)):>8} FLOPs  "
              f"{_fmt_count(count_params(shape)):>7} params")
    return 0


# train ------------------------------------------------------------------------------
def _load_data(spec: str, quiet: bool = True) -> DataBundle:
    return load_data(spec, quiet=quiet)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model or a pruned shape (optionally with KD) into a run directory",
        description="Train the unpruned network of --model (this is how you make a teacher) or "
        "the pruned network of --shape, from scratch or, with --inherit, initialised from the "
        "teacher; with --teacher, by knowledge distillation. Writes into --out DIR: "
        "model.safetensors + shape.json (the trained model, for `tasprune eval`, `tasprune "
        "export` and tasprune.load_model), train.pt (resumable checkpoint, updated every "
        "epoch and every --checkpoint-every steps; the one before is kept as train.prev.pt), "
        "best.pt (weights of the epoch with the best test accuracy), metrics.jsonl (one line "
        "per epoch) and train_config.yaml (the settings). SIGINT/SIGTERM stop it after the "
        "current step with a checkpoint. Runs on several processes under `torchrun "
        "--nproc_per_node N -m tasprune train ...` (--batch-size stays the global batch).",
    )
    p.add_argument("--model", help="registered model name (see `tasprune models`): train "
                   "the unpruned network; or a network of your own as FILE.py:FACTORY: "
                   "train it (into DIR/model.safetensors, a state dict), or with --shape "
                   "and --weights fine-tune the searched shape of those weights with KD")
    p.add_argument("--shape", help="shape.json, TAS .config file or published TAS shape "
                   "name: train that pruned network")
    p.add_argument("--weights", metavar="FILE", help="with --model FILE.py:FACTORY: trained "
                   "weights (state dict) to start from; with --shape, the searched teacher")
    p.add_argument("--data", required=True, help=DATA_SPEC_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="run directory to write")
    p.add_argument("--teacher", metavar="PATH", help="teacher for KD: a run directory, "
                   "model.safetensors, or a train.pt/best.pt checkpoint")
    p.add_argument("--resume", action="store_true", help="continue the run in DIR from its "
                   "train.pt (same settings); refused if there is none")
    add_config_flags(p, TrainConfig, "training settings (TrainConfig)")
    p.set_defaults(func=cmd_train, writes_run="train")


def _add_log_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log", type=log_sinks, metavar="SINKS", help="also log every metrics "
                   "record to these trackers, comma-separated: csv (DIR/logs/<phase>.csv), "
                   "tensorboard (DIR/logs/tensorboard/<phase>/; pip install "
                   "'tasprune[tensorboard]')")


def log_sinks(text: str) -> tuple[str, ...]:
    from tasprune.tracking import parse_sinks

    try:
        return parse_sinks(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("log: ")) from None


def _custom_train(args: argparse.Namespace) -> int:
    from tasprune.custom import train_full, train_shape

    if args.teacher or args.resume:
        raise UserError("--teacher and --resume are for the registered models; a network of "
                        "your own is distilled from --weights when --shape is given")
    config = load_config(TrainConfig, flags=config_values(args))
    data = _load_data(args.data, config.quiet)
    if args.shape:
        if not args.weights:
            raise UserError("--shape with --model FILE.py:FACTORY needs --weights: the "
                            "trained network the shape was searched on")
        _, acc = train_shape(args.model, args.weights, args.shape, data, config, args.out,
                             config.quiet)
        print(f"{args.out}: test accuracy {100 * acc:.2f}% after {config.epochs} epochs")
        print(f"wrote {args.out}/model.safetensors + shape.json (load with "
              "tasprune.load_pruned_model), model.onnx, model.pt2, metrics.jsonl")
        return 0
    acc = train_full(args.model, data, config, args.out, args.weights, config.quiet)
    print(f"{args.out}: test accuracy {100 * acc:.2f}% after {config.epochs} epochs")
    print(f"wrote {args.out}/model.safetensors (a state dict: pass it as --weights) and "
          "metrics.jsonl")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tasprune.custom import is_factory_spec
    from tasprune.export import load_model
    from tasprune.training.trainer import train

    if args.model and is_factory_spec(args.model):
        return _custom_train(args)
    if (args.model is None) == (args.shape is None):
        raise UserError("give one of --model (the unpruned network) or --shape (a pruned "
                        "one)")
    if args.weights:
        raise UserError("--weights goes with --model FILE.py:FACTORY; a registered model "
                        "distils from --teacher")

    if args.teacher is None and (given(args, "kd_alpha") is not None
                                 or given(args, "kd_temperature") is not None):
        raise UserError("--kd-alpha/--kd-temperature configure distillation, which needs "
                        "--teacher PATH")
    _check_train_out(args.out, args.resume)
    config = load_config(TrainConfig, flags=config_values(args))
    data = _load_data(args.data, config.quiet)
    shape = load_target_shape(args.model or args.shape, data.num_classes, data.resolution,
                              data.in_channels)
    teacher = load_model(args.teacher) if args.teacher else None
    if teacher is not None and args.shape is not None:
        _check_teacher_of_shape(teacher.shape, shape, args.teacher, args.shape)
    result = train(shape, data, config, args.out, teacher=teacher, resume=args.resume)
    if result.rank != 0:  # under torchrun, rank 0 reports
        return 0
    m = result.metrics
    print(f"{args.out}: test accuracy {100 * m['test_acc']:.2f}% after {m['epoch']} epochs "
          f"(best {100 * m['best_test_acc']:.2f}% at epoch {m['best_epoch']}); "
          f"FLOPs {_fmt_count(m['flops'])}, params {_fmt_count(m['params'])}")
    print(f"wrote {args.out}/model.safetensors + shape.json (the model), train.pt, best.pt, "
          "metrics.jsonl, train_config.yaml")
    return 0


def _check_train_out(out: str, resume: bool) -> None:
    from tasprune.export import WEIGHTS_FILE
    from tasprune.phase import TRAIN_CHECKPOINT, has_checkpoint

    check_out_dir(out)
    if resume:
        check_resume(out, TRAIN_CHECKPOINT)
    elif (Path(out) / WEIGHTS_FILE).is_file() and not has_checkpoint(
            Path(out) / TRAIN_CHECKPOINT):
        raise UserError(f"{out} already holds a trained model (model.safetensors) and no "
                        "train.pt to resume; choose another --out")


def _check_teacher_of_shape(teacher: Shape, shape: Shape, teacher_path: str, target: str) -> None:
    """A pruned shape learns from the unpruned network it was pruned from (same family, block
    and depths); another architecture as teacher is almost always a mixed-up file."""
    if (teacher.family, teacher.block, teacher.depths) != (shape.family, shape.block,
                                                          shape.depths):
        raise UserError(
            f"--shape {target} was pruned from a {shape.family} ({shape.block} blocks, depths "
            f"{list(shape.depths)}) but --teacher {teacher_path} is a {teacher.family} "
            f"({teacher.block} blocks, depths {list(teacher.depths)}); give the teacher the "
            "shape was pruned from, or a shape pruned from this teacher")


# search -----------------------------------------------------------------------------
def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="search a pruned shape of a model at a FLOP, parameter or latency budget (TAS)",
        description="Transformable Architecture Search: learn the width of every conv and the "
        "depth of every stage of --model under FLOP, parameter and/or latency budgets, "
        "alternating SGD steps on the supernet's weights (one half of the training set) and "
        "Adam steps on the width/depth distributions (the other half, cross-entropy + budget "
        "loss). A latency budget first times a per-layer latency table on this machine "
        "(cached under ~/.cache/tasprune/latency). Writes into --out DIR: "
        "shape.json (the searched shape: train it with `tasprune train --shape DIR/shape.json`), "
        "metrics.jsonl (a 'search' line per epoch, a 'derive' line at the end) and search.pt "
        "(resumable checkpoint, updated every epoch and every --checkpoint-every steps; the one "
        "before is kept as search.prev.pt). SIGINT/SIGTERM save a checkpoint and stop (exit "
        "130/143); a NaN/inf loss stops with exit 1, keeping the last good checkpoint. On "
        "several processes: `torchrun --nproc_per_node N -m tasprune search ...` (--batch-size "
        "stays the global batch; rank 0 writes the files).",
    )
    p.add_argument("--model", required=True, help="registered model name (see `tasprune "
                   "models`), or a network of your own as FILE.py:FACTORY or "
                   "package.module:FACTORY (called with num_classes=, in_channels=; give "
                   "its trained weights with --weights)")
    p.add_argument("--weights", metavar="FILE", help="trained weights of a FILE.py:FACTORY "
                   "model: a state dict (.safetensors, .pt or .pth), loaded strictly")
    p.add_argument("--data", required=True, help=DATA_SPEC_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="run directory to write")
    p.add_argument("--teacher", metavar="PATH", help="start the supernet from this trained "
                   "unpruned model: a run directory, model.safetensors (shape.json beside it) "
                   "or a train.pt/best.pt checkpoint")
    p.add_argument("--resume", action="store_true", help="continue the search in DIR from its "
                   "search.pt (same settings but device, amp, compile, log and "
                   "checkpoint_every); refused if there is none")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    add_config_flags(p, SearchConfig, "search settings (SearchConfig)", required={"epochs"})
    p.set_defaults(func=cmd_search, writes_run="search")


def _custom_search(args: argparse.Namespace, config: SearchConfig, data: DataBundle) -> int:
    from tasprune.custom import plan_of, user_model
    from tasprune.surgery import reorder
    from tasprune.tas.searcher import search

    if not args.weights:
        raise UserError(f"--model {args.model}: a network of your own is searched from its "
                        "trained weights: give --weights FILE (or run `tasprune prune`, "
                        "which trains them)")
    model = user_model(args.model, data.num_classes, data.in_channels, args.weights)
    plan = plan_of(model, data)
    result = search(plan.full(), data, config, args.out, teacher=reorder(model, plan),
                    resume=args.resume, quiet=args.quiet)
    print(f"{args.out}: searched {result.shape.describe()}: FLOPs "
          f"{_fmt_count(result.flops)} = {result.flops / result.full_flops:.3f} of the "
          f"unpruned {args.model}, params {_fmt_count(result.params)}")
    print(f"wrote {args.out}/shape.json (the shape: train it with `tasprune train --model "
          f"{args.model} --weights {args.weights} --shape {args.out}/shape.json`), "
          "metrics.jsonl, search.pt")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from tasprune.custom import is_factory_spec
    from tasprune.export import load_model
    from tasprune.phase import SEARCH_CHECKPOINT
    from tasprune.tas.budgets import check_budget, space_of
    from tasprune.tas.searcher import search

    check_out_dir(args.out)
    if args.resume:
        check_resume(args.out, SEARCH_CHECKPOINT)
    config = load_config(SearchConfig, flags=_budget_alone(config_values(args), ""))
    data = _load_data(args.data, args.quiet)
    if is_factory_spec(args.model):
        return _custom_search(args, config, data)
    if args.weights:
        raise UserError("--weights goes with --model FILE.py:FACTORY; a registered model "
                        "starts from --teacher")
    full = Shape.full(args.model, num_classes=data.num_classes, in_channels=data.in_channels,
                      resolution=data.resolution)
    if config.flops_ratio is not None:  # first, to name the reachable range
        check_budget(space_of(config, full), config.flops_ratio)
    teacher = None
    if args.teacher:
        teacher = load_model(args.teacher)
        if teacher.shape != full:
            raise UserError(
                f"--teacher {args.teacher} is {teacher.shape.describe()} with "
                f"{teacher.shape.num_classes} classes; the search starts from the unpruned "
                f"{args.model} for {args.data} ({full.num_classes} classes, {full.in_channels} "
                f"input channels): train one with `tasprune train --model {args.model}`"
            )
    result = search(full, data, config, args.out, teacher=teacher,
                    resume=args.resume, quiet=args.quiet)
    if env_rank():
        return 0  # under torchrun, rank 0 reports
    band = "inside" if result.in_band else "outside"
    costs = ", ".join(f"{name} {got:.3f} (target {want})"
                      for name, (got, want) in result.budgets.items() if name != "flops")
    flops_target = ("" if config.flops_ratio is None else
                    f" (target {config.flops_ratio}, {band} the band "
                    f"[{config.flops_ratio - config.tolerance:.3f}, {config.flops_ratio}])")
    print(f"{args.out}: searched {result.shape.describe()}: FLOPs {_fmt_count(result.flops)} "
          f"= {result.flops / result.full_flops:.3f} of the unpruned {args.model}"
          f"{flops_target}, params {_fmt_count(result.params)}"
          + (f"; of the unpruned net: {costs} ({band} the band)" if costs else ""))
    if result.adjusted and result.argmax_flops is not None:
        print(f"the most probable shape ({result.argmax_flops / result.full_flops:.3f} of the "
              "FLOPs) was outside the band: the shape was moved into it, to the in-band shape "
              "closest to the learned distributions")
    print(f"wrote {args.out}/shape.json (the shape), metrics.jsonl, search.pt")
    return 0


# eval -------------------------------------------------------------------------------
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="test accuracy, FLOPs, params and CPU latency of a trained model",
        description="Evaluate a trained model on the test split of --data and measure its CPU "
        "latency at batch 1 and 64: a pruned model is timed against its unpruned counterpart "
        "(random weights) in 5 rounds alternating the two, on a fixed thread count; each "
        "latency is the median of the round medians [min, max], the speed-up the median of "
        "the per-round ratios [min, max]. The deployable form (BatchNorm folded into the "
        "convs, what `export --format onnx` writes) is timed alongside in PyTorch and, when "
        "onnxruntime is installed, in ONNX Runtime. Prints a summary, or one JSON object with "
        "--json (acc as a fraction, flops, params, latency_ms by batch size, latency: the "
        "paired measurement). Writes no files.",
    )
    p.add_argument("path", help="run directory, model.safetensors, or train.pt/best.pt")
    p.add_argument("--data", required=True, help=DATA_SPEC_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--device", default="auto", help="device for the accuracy pass (latency "
                   "is always measured on the CPU)")
    p.add_argument("--threads", type=int, metavar="N", help="intra-op threads while timing "
                   "(default: torch's setting); ONNX Runtime gets the same")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--no-deploy", action="store_true", help="time the model as loaded only, "
                   "not its folded form in PyTorch and ONNX Runtime")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from tasprune.device import resolve_device
    from tasprune.evaluation import evaluate_model, latency_lines
    from tasprune.export import load_model
    from tasprune.latency import LatencyConfig

    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    device = resolve_device(args.device)
    data = _load_data(args.data, args.quiet)
    model = load_model(args.path, device=device)
    config = LatencyConfig(threads=args.threads, deploy=not args.no_deploy)
    out = {"path": args.path, "data": args.data,
           **evaluate_model(model, data, device, args.batch_size,
                            None if args.no_latency else config, args.quiet,
                            f"model {args.path}")}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{args.path} on {args.data}: test accuracy {100 * out['acc']:.2f}% (top-5 "
          f"{100 * out['top5']:.2f}%) over {out['images']} images")
    print(f"FLOPs (MACs) {out['flops']:,} ({_fmt_count(out['flops'])})   params "
          f"{out['params']:,} ({_fmt_count(out['params'])})")
    if "latency" in out:
        print("\n".join(latency_lines(out["latency"], {"dense": "unpruned (random weights)"})))
    return 0


# export -----------------------------------------------------------------------------
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained model to ONNX, torch.export (.pt2), TorchScript or Hub layout",
        description="Export a trained model. Writes --out FILE, by default model.onnx, "
        "model.pt2 or model.torchscript.pt in the run directory (or beside the given weights "
        "file). ONNX: input 'images' [N, C, H, W] with a dynamic batch, output 'logits'. pt2: "
        "a torch.export program with a dynamic batch (torch.export.load(FILE).module(), no "
        "tasprune needed). hf: a directory in Hugging Face Hub layout (model.safetensors, "
        "shape.json, config.json, README.md model card with the run's summary), by default "
        "DIR/hub; load it with tasprune.from_pretrained.",
    )
    p.add_argument("path", help="run directory, model.safetensors, or train.pt/best.pt")
    p.add_argument("--format", required=True, choices=("onnx", "pt2", "torchscript", "hf"))
    p.add_argument("--out", metavar="FILE", help="output file (a directory for hf)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from tasprune.export import EXPORT_FORMATS, export_model, load_model
    from tasprune.rundir import check_export_target, run_kind

    model = load_model(args.path)
    path = Path(args.path)
    if args.format == "hf":
        from tasprune.hub import run_card_inputs, save_pretrained

        out = Path(args.out) if args.out else (path if path.is_dir() else path.parent) / "hub"
        if out.resolve() == (path if path.is_dir() else path.parent).resolve():
            raise UserError(f"--out {out} is the run directory itself; give a new directory")
        if run_kind(out) is not None and not (out / "config.json").is_file():
            raise UserError(f"--out {out} holds a `tasprune {run_kind(out)}` run; give a new "
                            "directory (or an earlier hf export to replace)")
        summary, settings = run_card_inputs(path if path.is_dir() else path.parent)
        save_pretrained(model, out, summary=summary, settings=settings)
        print(f"wrote {out}/ (model.safetensors, shape.json, config.json, README.md)")
        return 0
    out = Path(args.out) if args.out else (
        (path if path.is_dir() else path.parent) / EXPORT_FORMATS[args.format])
    check_export_target(path, out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name, e.g. "
                        f"{out / EXPORT_FORMATS[args.format]}")
    if not out.absolute().parent.is_dir():
        raise UserError(f"output file parent {out.absolute().parent} does not exist; create it "
                        "first or choose another --out")
    try:
        export_model(model, args.format, out)
    except ImportError as exc:
        raise UserError(str(exc)) from None
    print(f"wrote {out}")
# data -------------------------------------------------------------------------------
def _add_data(sub: argparse._SubParsersAction) -> None:
    from tasprune.data.download import REMOTES

    p = sub.add_parser("data", help="describe a dataset, or download one",
                       description="Describe a dataset (`info`) or download one (`download`).")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    info = actions.add_parser(
        "info", help="print sizes, classes and input format of a --data spec",
        description="Load a dataset as training would and print its name, class count, "
        "image size, train/test sizes per class, normalisation and augmentation. Writes no "
        "files and downloads nothing.")
    info.add_argument("spec", help=DATA_SPEC_HELP)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_data_info)
    dl = actions.add_parser(
        "download", help="download CIFAR-10/100 or Fashion-MNIST (needs a network)",
        description="Download a dataset from its official site (or --mirror) into ROOT, "
        "checking every file's MD5 sum. Writes ROOT/cifar-10-batches-py/, "
        "ROOT/cifar-100-python/ or ROOT/fashion-mnist/ (files arrive under temp names and "
        "are renamed only once verified; CIFAR tarballs are deleted after extraction). "
        "Does nothing if the verified files are already there. Then use --data NAME:ROOT.")
    dl.add_argument("name", choices=list(REMOTES), help="dataset to fetch")
    dl.add_argument("--root", required=True, help="directory to download into (created)")
    dl.add_argument("--mirror", metavar="URL",
                    help="base URL serving the same file names instead of the official site")
    dl.add_argument("--quiet", action="store_true", help="no progress bar")
    dl.set_defaults(func=cmd_data_download)


def cmd_data_info(args: argparse.Namespace) -> int:
    from tasprune.data import describe, load_data

    info = describe(load_data(args.spec, quiet=False))
    if args.json:
        print(json.dumps(info))
        return 0
    size = f"{info['in_channels']}x{info['resolution']}x{info['resolution']}"
    print(f"{info['name']}: {info['num_classes']} classes, {size} images")
    for split in ("train", "test"):
        per_class = info[f"{split}_per_class"]
        spread = (f"{min(per_class):,} per class" if min(per_class) == max(per_class)
                  else f"{min(per_class):,} to {max(per_class):,} per class")
        print(f"{split + ':':<7}{info[split]:>10,} images ({spread})")
    augment = info["augment"]
    how = (f"pad-{augment['pad']} random crop" if augment["pad"] else
           "random resized crop at decode time") + " + horizontal flip"
    print(f"normalise: mean {tuple(info['mean'])}, std {tuple(info['std'])}; "
          f"training augmentation: {how}")
    names = info["class_names"] or []
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    print(f"classes: {shown}")
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    from tasprune.data.download import download

    target = download(args.name, args.root, mirror=args.mirror, quiet=args.quiet)
    print(f"{args.name}: ready in {target}; use --data {args.name}:{args.root}")
    return 0


# prune / demo / report ----------------------------------------------------------------
_RUN_FILES = ("config.yaml (resolved settings), teacher/ (the trained unpruned net, unless "
              "--teacher), search.pt, shape.json, train.pt, best.pt, model.safetensors (the "
              "pruned model), metrics.jsonl (one line per epoch and phase), summary.json, "
              "report.md and PNG plots")


def _add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="the whole job: teacher, search, KD training, evaluation, report",
        description="Prune a model to a FLOP budget: train the unpruned teacher (unless "
        "--teacher), search the shape by TAS, train it with knowledge distillation, evaluate "
        f"and report. Writes into --out DIR: {_RUN_FILES}. Re-running the same command "
        "resumes: finished phases are skipped, interrupted ones continue from their "
        "checkpoint. Settings: defaults < --config recipe < these flags < key=value overrides "
        "(dotted keys, e.g. search.epochs=20 train.batch_size=64).",
    )
    _add_run_arguments(p)
    p.set_defaults(func=cmd_prune, writes_run="prune")


# the prune settings with a flag of their own besides the generated --search-... one
_SHORT_FLAGS = {f"search.{name}": f"--{name.replace('_', '-')}" for name in (
    "flops_ratio", "params_ratio", "latency_ratio", "channel_multiple", "couple_residual")}


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


def _budget_alone(values: dict[str, Any], section: str) -> dict[str, Any]:
    """A parameter or latency budget given alone on the command line drops the FLOP budget
    of the defaults or the recipe."""
    node = values.setdefault(section, {}) if section else values
    if "flops_ratio" not in node and ("params_ratio" in node or "latency_ratio" in node):
        node["flops_ratio"] = None
    return values


def _prune_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The command line's settings of `prune`/`baseline`, as a nested mapping."""
    values = _budget_alone(config_values(args), "search")
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
    print(f"\nrun directory: {out} (report: {out}/report.md, model: {out}/model.safetensors)")
    return 0


def _run_custom(config: Any, out: str, quiet: bool) -> int:
    from tasprune.custom import run_prune

    summary = run_prune(config, out, config.weights, quiet, _load_data(config.data, quiet))
    flops = summary["flops"] / summary["full_flops"]
    params = summary["params"] / summary["full_params"]
    acc = "" if summary["acc"] is None else f", test accuracy {summary['acc']:.4f}"
    if summary["teacher_acc"] is not None:
        acc += f" (unpruned {summary['teacher_acc']:.4f})"
    print(f"{config.model} pruned by {config.method}: FLOPs {_fmt_count(summary['flops'])} "
          f"= {flops:.3f} of the unpruned, params {params:.3f}{acc}")
    print(f"\nrun directory: {out} (report: {out}/report.md, model: {out}/model.safetensors "
          "+ shape.json, model.onnx, model.pt2)")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from tasprune.custom import is_factory_spec
    from tasprune.pipeline import load_prune_config

    check_out_dir(args.out)
    config = load_prune_config(args.config, tuple(args.overrides), flags=_prune_flags(args))
    if is_factory_spec(config.model):
        return _run_custom(config, args.out, args.quiet)
    return _run_prune(args.config, _prune_flags(args), list(args.overrides), args.out,
                      args.quiet)


_BASELINE_FILES = _RUN_FILES.replace("search.pt, ", "")


def _add_baseline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "baseline",
        help="prune with a hand-set method (uniform, l1, random) instead of TAS, same pipeline",
        description="Like `prune`, but the shape comes from a baseline at the same FLOP budget "
        "instead of a search: uniform (one width ratio for every conv, by bisection), l1 "
        "(global ranking of the teacher's filters by mean |weight|; the pruned net inherits "
        "the teacher's weights) or random (the best of random_samples=N shapes drawn from the "
        "TAS search space, never above the budget). The shape is trained with the same "
        f"recipe (KD unless --no-kd). Writes into --out DIR: {_BASELINE_FILES} (no "
        "search.pt; the 'derive' line of metrics.jsonl names the method). Re-running resumes "
        "as `prune` does. Same settings as `prune` (recipe, flags, key=value overrides).",
    )
    p.add_argument("--method", required=True, choices=BASELINE_METHODS, dest="config:method",
                   help="how the pruned shape is chosen")
    _add_run_arguments(p, skip=("method",))
    p.set_defaults(func=cmd_prune, writes_run="prune")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole method in minutes on the bundled Fashion-MNIST subset",
        description="Run `prune` with the shipped `demo` recipe (a small ResNet on the bundled "
        "6,000-image Fashion-MNIST subset, half the FLOPs, a few minutes on 2 CPU cores) and "
        f"print the summary table. Writes into --out DIR (default runs/demo): {_RUN_FILES}. "
        "Re-running resumes or, when finished, just prints the summary.",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    _add_log_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_demo, writes_run="prune")


def cmd_demo(args: argparse.Namespace) -> int:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    flags = {} if args.log is None else {"log": list(args.log)}
    return _run_prune("demo", flags, list(args.overrides), args.out, args.quiet)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="regenerate a run directory's report.md and plots",
        description="Regenerate the report of a run directory DIR from its files: writes "
        "DIR/report.md and its PNG plots (widths.png, blocks.png, flops.png, accuracy.png, "
        "tau.png).")
    p.add_argument("run_dir", help="a directory written by prune, search or train")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from tasprune.report import write_report

    print(write_report(args.run_dir))
    return 0


def _add_recipes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipes", help="list the shipped recipes",
                       description="List the recipes shipped with tasprune (for prune --config "
                       "NAME) with their first comment line. Writes no files.")
    p.set_defaults(func=cmd_recipes)


def cmd_recipes(args: argparse.Namespace) -> int:
    from tasprune.pipeline import RECIPES_DIR, recipe_names

    for name in recipe_names():
        first = (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        print(f"{name:<22} {first}")
    return 0


# parser -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tasprune",
        description="Prune a CNN to a FLOP budget by Transformable Architecture Search.",
    )
    parser.add_argument("--version", action="version", version=f"tasprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_prune, _add_baseline, _add_demo, _add_search, _add_train, _add_eval,
                _add_export, _add_report, _add_flops, _add_models, _add_recipes, _add_data):
        add(sub)
    return parser


def _run_command(args: argparse.Namespace, rank: int | None) -> int:
    """Run the command; one that writes a run directory first checks that the directory
    holds no other kind of run and locks it while it runs (rank 0 alone under torchrun)."""
    from tasprune.rundir import check_kind, run_lock

    kind = getattr(args, "writes_run", None)
    if kind is None:
        return args.func(args)
    if kind == "prune" and args.command == "demo":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    check_out_dir(args.out)
    check_kind(args.out, kind)
    with run_lock(args.out, enabled=not rank):
        return args.func(args)


_OS_ADVICE = {
    errno.EROFS: "the file system is read-only; choose an --out on a writable one",
    errno.EACCES: "permission denied; choose an --out you can write to",
    errno.EPERM: "permission denied; choose an --out you can write to",
}


def os_error_line(exc: OSError) -> str:
    """An OSError as one line: the file, what happened and what to do."""
    if exc.filename is None:
        return exc.strerror or str(exc)
    advice = _OS_ADVICE.get(exc.errno or 0, exc.strerror or str(exc))
    return f"{exc.filename}: {advice}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may stand on both sides of the flags (argparse takes only one run
    # of a positional list); anything else left over is an error, as parse_args makes it
    if extra and hasattr(args, "overrides") and all(
            "=" in item and not item.startswith("-") for item in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.parse_args(argv)  # exits with argparse's own message
    rank = env_rank()

    def say(message: str) -> None:
        """One line on stderr; under torchrun every rank says it, prefixed with its rank
        (so a user sees that all ranks stopped, and where)."""
        where = "" if rank is None else f" [rank {rank}]"
        print(f"tasprune {args.command}{where}: {message}", file=sys.stderr)

    try:
        return int(_run_command(args, rank) or 0)
    except (UserError, ValueError, FileNotFoundError) as exc:
        say(f"error: {exc}")
        return 2
    except OSError as exc:  # read-only or full file system, permissions: one line
        say(f"error: {os_error_line(exc)}")
        return 2
    except NonFiniteLoss as exc:
        say(f"error: {exc}")
        return 1
    except Interrupted as exc:
        say(str(exc))
        return exc.exit_status
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        leave_process_group()


if __name__ == "__main__":
    sys.exit(main())
