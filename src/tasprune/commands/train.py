"""`tasprune train`: train a network, unpruned or pruned to a shape, into a run directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from tasprune.commands import _common
from tasprune.commands._common import (
    MODEL_HELP,
    TEACHER_HELP,
    WEIGHTS_HELP,
    UserError,
    check_out_dir,
    check_resume,
    fmt_count,
)
from tasprune.config import load_config
from tasprune.data import DATA_SPEC_HELP
from tasprune.dist import env_rank
from tasprune.flags import add_config_flags, config_values, given
from tasprune.settings import TrainConfig


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a network or a pruned shape (optionally with KD) into a run directory",
        description="Train the unpruned network of --model (this is how you make a teacher) or "
        "the pruned network of --shape, from scratch or, with --inherit, initialised from the "
        "teacher's channels of largest L1 norm; with a teacher (--teacher, or --model and "
        "--weights), by knowledge distillation. Writes into --out DIR: model.safetensors + "
        "shape.json (the trained model, for `tasprune eval`, `tasprune export` and "
        "tasprune.load_model), train.pt (resumable checkpoint, updated every epoch and every "
        "--checkpoint-every steps; the one before is kept as train.prev.pt), best.pt (weights "
        "of the epoch with the best test accuracy), metrics.jsonl (one line per epoch) and "
        "train_config.yaml (the settings). SIGINT/SIGTERM stop it after the current step with "
        "a checkpoint. Runs on several processes under `torchrun --nproc_per_node N -m "
        "tasprune train ...` (--batch-size stays the global batch).",
    )
    p.add_argument("--model", help=MODEL_HELP + ": train its unpruned network (from --weights "
                   "when given); with --shape, the network the shape prunes, as teacher with "
                   "--weights")
    p.add_argument("--shape", help="shape.json, TAS .config file or published TAS shape "
                   "name: train that pruned network")
    p.add_argument("--weights", metavar="FILE", help=WEIGHTS_HELP + "; without --shape the "
                   "training starts from them, with --shape they make the teacher")
    p.add_argument("--data", required=True, help=DATA_SPEC_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="run directory to write")
    p.add_argument("--teacher", metavar="PATH", help="teacher for KD: " + TEACHER_HELP)
    p.add_argument("--resume", action="store_true", help="continue the run in DIR from its "
                   "train.pt (same settings); refused if there is none")
    add_config_flags(p, TrainConfig, "training settings (TrainConfig)")
    p.set_defaults(func=cmd_train, writes_run="train")


def _check_out(out: str, resume: bool) -> None:
    from tasprune.export import WEIGHTS_FILE
    from tasprune.phase import TRAIN_CHECKPOINT, has_checkpoint

    check_out_dir(out)
    if resume:
        check_resume(out, TRAIN_CHECKPOINT)
    elif (Path(out) / WEIGHTS_FILE).is_file() and not has_checkpoint(
            Path(out) / TRAIN_CHECKPOINT):
        raise UserError(f"{out} already holds a trained model (model.safetensors) and no "
                        "train.pt to resume; choose another --out")


def cmd_train(args: argparse.Namespace) -> int:
    from tasprune.export import load_shape
    from tasprune.models.network import full_network
    from tasprune.net.plan import ModelSpec
    from tasprune.training.trainer import train

    if args.model is None and args.shape is None:
        raise UserError("give --model (the unpruned network) or --shape (a pruned one)")
    if args.teacher and args.weights and args.shape:
        raise UserError("give the teacher once: --teacher, or --model with --weights")
    if args.weights and args.model is None:
        raise UserError("--weights are the weights of the --model network; give --model")
    has_teacher = bool(args.teacher or (args.shape and args.weights))
    if not has_teacher and (given(args, "kd_alpha") is not None
                            or given(args, "kd_temperature") is not None):
        raise UserError("--kd-alpha/--kd-temperature configure distillation, which needs a "
                        "teacher (--teacher PATH, or --model and --weights with --shape)")
    _check_out(args.out, args.resume)
    config = load_config(TrainConfig, flags=config_values(args))
    data = _common.get_data(args.data, config.quiet)
    if args.shape is None:
        result = train(args.model, data, config, args.out, teacher=args.teacher,
                       resume=args.resume, weights=args.weights)
    else:
        shape = load_shape(args.shape, data.num_classes, data.resolution, data.in_channels)
        teacher = args.teacher
        if args.weights:
            spec = ModelSpec(args.model, data.num_classes, data.in_channels, data.resolution)
            teacher, _ = full_network(spec, shape.plan.free, weights=args.weights)
        elif args.model and shape.source is not None and shape.source.name not in (
                None, args.model):
            raise UserError(f"--shape {args.shape} prunes {shape.source.name}, not "
                            f"--model {args.model}")
        result = train(shape, data, config, args.out, teacher=teacher, resume=args.resume)
    if env_rank():  # under torchrun, rank 0 reports
        return 0
    m = result.metrics
    print(f"{args.out}: test accuracy {100 * m['test_acc']:.2f}% after {m['epoch']} epochs "
          f"(best {100 * m['best_test_acc']:.2f}% at epoch {m['best_epoch']}); "
          f"FLOPs {fmt_count(m['flops'])}, params {fmt_count(m['params'])}")
    print(f"wrote {args.out}/model.safetensors + shape.json (the model), train.pt, best.pt, "
          "metrics.jsonl, train_config.yaml")
    return 0
