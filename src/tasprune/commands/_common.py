"""What the subcommands share: the one-line user error, output-directory checks, number
formatting, and the flags that every run command has."""

from __future__ import annotations

import argparse
from pathlib import Path

from tasprune.data import DataBundle, load_data


class UserError(Exception):
    """A problem with the user's input; printed as one line, exit status 2."""


def check_out_dir(out: str | Path, flag: str = "--out") -> Path:
    """Refuse an output directory that cannot be written, before any long work starts.

    Its parent, or the parent's parent, must exist (`--out runs/x` on a fresh clone makes
    runs/; a typo deeper in the path should not create a tree of directories, nor fail
    after hours of training), and it must not be an existing file or empty.
    """
    if str(out).strip() in ("", "."):
        raise UserError(f"{flag} {str(out)!r} names no new directory; give one, e.g. "
                        f"{flag} runs/mine")
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


def fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def get_data(spec: str, quiet: bool = True) -> DataBundle:
    return load_data(spec, quiet=quiet)


def log_sinks(text: str) -> tuple[str, ...]:
    from tasprune.tracking import parse_sinks

    try:
        return parse_sinks(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("log: ")) from None


def add_log_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log", type=log_sinks, metavar="SINKS", help="also log every metrics "
                   "record to these trackers, comma-separated: csv (DIR/logs/<phase>.csv), "
                   "tensorboard (DIR/logs/tensorboard/<phase>/; pip install "
                   "'tasprune[tensorboard]')")


MODEL_HELP = ("the network: a registered name (see `tasprune models`: built-in ResNets and "
              "zoo networks such as mobilenet_v2), or a network of your own as FILE.py:FACTORY "
              "or package.module:FACTORY (e.g. torchvision.models:resnet18; called with "
              "num_classes=, and in_channels= when it takes it)")
WEIGHTS_HELP = ("trained weights of the unpruned --model network: a state dict (.safetensors, "
                ".pt or .pth, loaded strictly)")
TEACHER_HELP = ("the trained unpruned network, as tasprune saved it: a run directory, "
                "model.safetensors (shape.json beside it) or a train.pt/best.pt checkpoint")
