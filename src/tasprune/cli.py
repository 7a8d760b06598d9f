"""The `tasprune` command: one parser, subcommands that call plain functions.

Every subcommand is a pair: `_add_<name>(subparsers)` declares its arguments
(and says in --help what it writes where), `cmd_<name>(args) -> int` does the
work. Errors a user can fix (bad names, missing files, impossible budgets) are
reported on one line with exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tasprune import __version__
from tasprune.data import DATA_SPEC_HELP
from tasprune.flops import count_params, layer_table
from tasprune.shape import PAPER_SHAPES_DIR, Shape, paper_shape_names


class UserError(Exception):
    """A problem with the user's input; printed as one line, exit status 2."""


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
                   "a TAS .config file, or a published TAS shape name (e.g. C010-ResNet110)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--classes", type=int, help="number of classes (default: the model's)")
    p.add_argument("--resolution", type=int, help="input height = width in pixels")
    p.add_argument("--in-channels", type=int, help="input image channels (default 3)")
    p.set_defaults(func=cmd_flops)


def cmd_flops(args: argparse.Namespace) -> int:
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


# parser -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tasprune",
        description="Prune a CNN to a FLOP budget by Transformable Architecture Search.",
    )
    parser.add_argument("--version", action="version", version=f"tasprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_flops, _add_models, _add_data):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as exc:
        print(f"tasprune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tasprune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
