"""`tasprune flops`, `models`, `recipes` and `report`: look at networks and runs."""

from __future__ import annotations

import argparse
import json

from tasprune.commands._common import fmt_count


def add_flops(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flops",
        help="count FLOPs and params of a network, shape.json or TAS .config",
        description="Count the multiply-accumulates (conv and linear layers; BN, ReLU, pooling "
        "and additions not counted) and the learnable parameters of a network, from its "
        "layer plan (traced by torch.fx). Prints a per-layer table, or one JSON object with "
        "--json. Writes no files.",
    )
    p.add_argument("target", help="a registered model name (see `tasprune models`), a network "
                   "of your own as FILE.py:FACTORY or package.module:FACTORY, a shape.json, a "
                   "TAS .config file, or a published TAS shape name (e.g. C010-ResNet110)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--classes", type=int, help="number of classes (default: the model's, 10 "
                   "for zoo networks and your own)")
    p.add_argument("--resolution", type=int, help="input height = width in pixels (default: "
                   "the model's, 32 for zoo networks and your own)")
    p.add_argument("--in-channels", type=int, help="input image channels (default 3)")
    p.set_defaults(func=cmd_flops)


def cmd_flops(args: argparse.Namespace) -> int:
    from tasprune.export import load_shape
    from tasprune.flops import layer_table

    shape = load_shape(args.target, args.classes, args.resolution, args.in_channels)
    flops, params = shape.count("flops"), shape.count("params")
    plan = shape.plan
    if args.json:
        print(json.dumps({
            "target": args.target, "flops": flops, "params": params,
            "model": None if plan.source is None else plan.source.name,
            "blocks": list(shape.blocks), "num_classes": shape.num_classes,
            "resolution": shape.resolution, "in_channels": shape.in_channels,
            "groups": len(plan.searched), "stages": [len(s) + 1 for s in plan.stages]}))
        return 0
    rows = layer_table(shape)
    width = max([26, *(len(r.name) for r in rows)])
    header = (f"{'layer':<{width}} {'kind':<6} {'in':>5} {'out':>5} {'k':>2} {'size':>7} "
              f"{'FLOPs':>14} {'share':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        size = f"{r.pixels}px"
        print(f"{r.name:<{width}} {r.kind:<6} {r.in_channels:>5} {r.out_channels:>5} "
              f"{r.kernel:>2} {size:>7} {r.flops:>14,} {100 * r.flops / max(flops, 1):>6.2f}%")
    print("-" * len(header))
    print(f"{args.target}: {shape.describe()}; {plan.describe()}; {shape.num_classes} classes, "
          f"{shape.in_channels}x{shape.resolution}x{shape.resolution} input")
    print(f"FLOPs (MACs): {flops:,} ({fmt_count(flops)})   params: {params:,} "
          f"({fmt_count(params)})")
    return 0


def add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered model names with FLOPs and params",
                       description="List the registered model names (built-in ResNets and zoo "
                       "networks) with their FLOPs and params at their default input size. "
                       "Writes no files.")
    p.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from tasprune.export import load_shape
    from tasprune.models import list_models
    from tasprune.models.registry import default_resolution

    for name in list_models():
        shape = load_shape(name)
        print(f"{name:<20} {default_resolution(name):>3}px  "
              f"{fmt_count(shape.count('flops')):>8} FLOPs  "
              f"{fmt_count(shape.count('params')):>7} params  {shape.num_classes} classes")
    return 0


def add_recipes(sub: argparse._SubParsersAction) -> None:
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


def add_report(sub: argparse._SubParsersAction) -> None:
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
