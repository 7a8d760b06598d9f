"""The `tasprune` command: one parser, subcommands (`tasprune.commands`) that call plain
library functions.

Errors a user can fix (bad names, missing files, impossible budgets) are reported on one
line with exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import errno
import re
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from tasprune._version import __version__
from tasprune.commands import data, evaluate, inspect, run, search, train
from tasprune.commands._common import UserError, check_out_dir
from tasprune.dist import env_rank, leave_process_group
from tasprune.faults import Interrupted, NonFiniteLoss

__all__ = ["UserError", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), like every other error of the CLI."""

    def error(self, message: str) -> typing.NoReturn:
        message = re.sub(r"^argument (--[\w-]+)/[-\w/]+:", r"argument \1:", message)  # one name
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tasprune",
        description="Prune a CNN to a FLOP, parameter or latency budget by Transformable "
        "Architecture Search.",
    )
    parser.add_argument("--version", action="version", version=f"tasprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (run.add_prune, run.add_baseline, run.add_demo, search.add, train.add,
                evaluate.add_eval, evaluate.add_export, inspect.add_report, inspect.add_flops,
                inspect.add_models, inspect.add_recipes, data.add):
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
_NO_OUT = " (this command writes into the run: copy the run somewhere writable first)"


def os_error_line(exc: OSError, has_out: bool = True) -> str:
    """An OSError as one line: the file, what happened and what to do (for a command
    without --out, what to do instead of choosing one)."""
    if exc.filename is None:
        return exc.strerror or str(exc)
    advice = _OS_ADVICE.get(exc.errno or 0, exc.strerror or str(exc))
    if not has_out and exc.errno in _OS_ADVICE:
        advice = advice.split(";")[0] + _NO_OUT
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
        say(f"error: {os_error_line(exc, has_out=hasattr(args, 'out'))}")
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
