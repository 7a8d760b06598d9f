"""`tasprune search`: the TAS search of a network's widths and depths under budgets."""

from __future__ import annotations

import argparse

from tasprune.commands import _common
from tasprune.commands._common import (
    MODEL_HELP,
    TEACHER_HELP,
    WEIGHTS_HELP,
    check_out_dir,
    check_resume,
    fmt_count,
)
from tasprune.commands.run import budget_alone
from tasprune.config import load_config
from tasprune.data import DATA_SPEC_HELP
from tasprune.dist import env_rank
from tasprune.flags import add_config_flags, config_values
from tasprune.settings import SearchConfig


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="search a pruned shape of a network at a FLOP, parameter or latency budget (TAS)",
        description="Transformable Architecture Search: learn the width of every channel group "
        "and the depth of every stage of --model under FLOP, parameter and/or latency "
        "budgets, alternating SGD steps on the supernet's weights (one half of the training "
        "set) and Adam steps on the width/depth distributions (the other half, cross-entropy "
        "+ budget loss). The supernet starts from the trained network (--teacher or "
        "--weights), else from scratch. A latency budget first times a per-layer latency "
        "table on this machine (cached under ~/.cache/tasprune/latency). Writes into --out "
        "DIR: shape.json (the searched shape: train it with `tasprune train --shape "
        "DIR/shape.json`), metrics.jsonl (a 'search' line per epoch, a 'derive' line at the "
        "end) and search.pt (resumable checkpoint, updated every epoch and every "
        "--checkpoint-every steps; the one before is kept as search.prev.pt). SIGINT/SIGTERM "
        "save a checkpoint and stop (exit 130/143); a NaN/inf loss stops with exit 1, "
        "keeping the last good checkpoint. On several processes: `torchrun --nproc_per_node "
        "N -m tasprune search ...` (--batch-size stays the global batch; rank 0 writes the "
        "files).",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--weights", metavar="FILE", help=WEIGHTS_HELP + ": the supernet starts "
                   "from them")
    p.add_argument("--data", required=True, help=DATA_SPEC_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="run directory to write")
    p.add_argument("--teacher", metavar="PATH", help="start the supernet from this "
                   + TEACHER_HELP)
    p.add_argument("--resume", action="store_true", help="continue the search in DIR from its "
                   "search.pt (same settings but device, amp, compile, log and "
                   "checkpoint_every); refused if there is none")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    add_config_flags(p, SearchConfig, "search settings (SearchConfig)", required={"epochs"})
    p.set_defaults(func=cmd_search, writes_run="search")


def cmd_search(args: argparse.Namespace) -> int:
    from tasprune.phase import SEARCH_CHECKPOINT
    from tasprune.tas.searcher import search

    check_out_dir(args.out)
    if args.resume:
        check_resume(args.out, SEARCH_CHECKPOINT)
    config = load_config(SearchConfig, flags=budget_alone(config_values(args), ""))
    data = _common.get_data(args.data, args.quiet)
    result = search(args.model, data, config, args.out, teacher=args.teacher,
                    resume=args.resume, quiet=args.quiet, weights=args.weights)
    if env_rank():
        return 0  # under torchrun, rank 0 reports
    band = "inside" if result.in_band else "outside"
    costs = ", ".join(f"{name} {got:.3f} (target {want})"
                      for name, (got, want) in result.budgets.items() if name != "flops")
    flops_target = ("" if config.flops_ratio is None else
                    f" (target {config.flops_ratio}, {band} the band "
                    f"[{config.flops_ratio - config.tolerance:.3f}, {config.flops_ratio}])")
    print(f"{args.out}: searched {result.shape.describe()}: FLOPs {fmt_count(result.flops)} "
          f"= {result.flops / result.full_flops:.3f} of the unpruned {args.model}"
          f"{flops_target}, params {fmt_count(result.params)}"
          + (f"; of the unpruned net: {costs} ({band} the band)" if costs else ""))
    if result.adjusted and result.argmax_flops is not None:
        print(f"the most probable shape ({result.argmax_flops / result.full_flops:.4f} of the "
              "FLOPs) was moved to the shape closest to the learned distributions that is in "
              f"the band and uses the budget ({result.flops / result.full_flops:.4f})")
    print(f"wrote {args.out}/shape.json (the shape), metrics.jsonl, search.pt")
    return 0
