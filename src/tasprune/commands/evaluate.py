"""`tasprune eval` and `tasprune export`: measure a trained model, or write it in another
format."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tasprune.commands import _common
from tasprune.commands._common import UserError, fmt_count
from tasprune.data import DATA_SPEC_HELP


def add_eval(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--model", help="FILE.py:FACTORY that builds the network, for a model "
                   "tasprune was given as a module in Python (its shape.json names no "
                   "factory)")
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
    data = _common.get_data(args.data, args.quiet)
    model = load_model(args.path, device=device, factory=args.model)
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
    print(f"FLOPs (MACs) {out['flops']:,} ({fmt_count(out['flops'])})   params "
          f"{out['params']:,} ({fmt_count(out['params'])})")
    if "latency" in out:
        print("\n".join(latency_lines(out["latency"], {"dense": "unpruned (random weights)"})))
    return 0


# export -----------------------------------------------------------------------------
def add_export(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--model", help="FILE.py:FACTORY that builds the network, for a model "
                   "tasprune was given as a module in Python")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from tasprune.export import EXPORT_FORMATS, export_model, load_model
    from tasprune.rundir import check_export_target

    model = load_model(args.path, factory=args.model)
    path = Path(args.path)
    if args.format == "hf":
        from tasprune.hub import run_card_inputs, save_pretrained

        if args.out is not None and not args.out.strip():
            raise UserError("--out '' names no directory; give one, e.g. --out hub")
        out = Path(args.out) if args.out else (path if path.is_dir() else path.parent) / "hub"
        summary, settings = run_card_inputs(path if path.is_dir() else path.parent)
        try:
            save_pretrained(model, out, summary=summary, settings=settings)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        print(f"wrote {out}/ (model.safetensors, shape.json, config.json, README.md)")
        return 0
    default = EXPORT_FORMATS[args.format]
    out = Path(args.out) if args.out is not None else (
        (path if path.is_dir() else path.parent) / default)
    try:
        check_export_target(path, args.out if args.out is not None else out, default)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if not out.absolute().parent.is_dir():
        raise UserError(f"output file parent {out.absolute().parent} does not exist; create it "
                        "first or choose another --out")
    try:
        export_model(model, args.format, out)
    except ImportError as exc:
        raise UserError(str(exc)) from None
    print(f"wrote {out}")
    return 0
