"""Experiment trackers: where metric records go besides `metrics.jsonl`.

`metrics.jsonl` is always written; `log_record` also sends each record to the sinks
the user chose (`--log csv,tensorboard`, or `log: [csv, tensorboard]` in a recipe):

* `csv` - `DIR/logs/<phase>.csv`, one row per record of that phase, columns in the
  order fields first appear (lists as JSON). It is rewritten from `metrics.jsonl`
  after every record, so it agrees with it after a resume, which drops redone lines.
  No extra dependency.
* `tensorboard` - event files under `DIR/logs/tensorboard/<phase>/`: every number
  of a record as a scalar at step = its epoch, and the search's width and depth
  distributions as histograms per epoch. Needs the `tensorboard` package
  (`pip install 'tasprune[tensorboard]'`). A phase that restarts from epoch E hides
  the earlier events from step E on, as TensorBoard's purge step does.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasprune._io import append_jsonl, atomic_write_text, read_jsonl

SINKS = ("csv", "tensorboard")
LOG_DIR = "logs"
TENSORBOARD_DIR = "tensorboard"
# (choice values in increasing order, their probabilities) of one distribution
Histogram = tuple[Sequence[float], Sequence[float]]

_writers: dict[Path, Any] = {}  # one TensorBoard writer per event directory and process


def check_sinks(sinks: Sequence[str]) -> tuple[str, ...]:
    """The sinks as a tuple without repeats; an unknown name, or TensorBoard without its
    package, is a ValueError that says what to do."""
    out: list[str] = []
    for sink in sinks:
        if sink not in SINKS:
            raise ValueError(f"log: unknown tracker {sink!r}; choose from {', '.join(SINKS)} "
                             "(comma-separated, e.g. --log tensorboard,csv)")
        if sink not in out:
            out.append(sink)
    if "tensorboard" in out:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ValueError("log: tensorboard needs the tensorboard package: "
                             "pip install 'tasprune[tensorboard]'") from None
    return tuple(out)


def check_writable(run_dir: str | os.PathLike[str], sinks: Sequence[str]) -> None:
    """Make the trackers' directories under `run_dir` and write a file into each, so that
    one that cannot be written is said before any epoch, not after the first."""
    dirs = {"csv": Path(run_dir) / LOG_DIR, "tensorboard": Path(run_dir) / LOG_DIR /
            TENSORBOARD_DIR}
    for sink in sinks:
        where = dirs[sink]
        try:
            where.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=where):
                pass
        except OSError as exc:
            raise ValueError(f"log: {where} cannot be written ({exc.strerror or exc}); make "
                             f"it writable, or leave {sink} out of --log") from None


def parse_sinks(text: str) -> tuple[str, ...]:
    """`--log tensorboard,csv` -> ("tensorboard", "csv"), checked."""
    return check_sinks([part.strip() for part in text.split(",") if part.strip()])


def log_record(metrics_path: str | os.PathLike[str], record: Mapping[str, Any],
               sinks: Sequence[str] = (), histograms: Mapping[str, Histogram] | None = None
               ) -> None:
    """Append `record` to `metrics_path` and send it to `sinks` (see the module docstring);
    `histograms` go to TensorBoard only."""
    metrics_path = Path(metrics_path)
    append_jsonl(metrics_path, dict(record))
    phase = str(record.get("phase", "run"))
    if "csv" in sinks:
        write_csv(metrics_path, phase)
    if "tensorboard" in sinks:
        _write_tensorboard(metrics_path.parent, phase, record, histograms or {})


def csv_path(run_dir: str | os.PathLike[str], phase: str) -> Path:
    return Path(run_dir) / LOG_DIR / f"{phase}.csv"


def write_csv(metrics_path: Path, phase: str) -> Path:
    """Rewrite `logs/<phase>.csv` beside `metrics_path` from its records of `phase`."""
    rows = [r for r in read_jsonl(metrics_path) if r.get("phase") == phase]
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                         for k, v in row.items()})
    path = csv_path(metrics_path.parent, phase)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, buffer.getvalue())
    return path


def tensorboard_dir(run_dir: str | os.PathLike[str], phase: str) -> Path:
    return Path(run_dir) / LOG_DIR / TENSORBOARD_DIR / phase


def _write_tensorboard(run_dir: Path, phase: str, record: Mapping[str, Any],
                       histograms: Mapping[str, Histogram]) -> None:
    step = int(record.get("epoch", 0))
    where = tensorboard_dir(run_dir, phase).resolve()
    writer = _writers.get(where)
    if writer is None:
        from torch.utils.tensorboard import SummaryWriter

        # events of an earlier process from this step on were redone: hide them
        writer = _writers[where] = SummaryWriter(str(where), purge_step=step)
    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
            writer.add_scalar(key, value, step)
    for tag, (values, probs) in histograms.items():
        values, probs = [float(v) for v in values], [float(p) for p in probs]
        writer.add_histogram_raw(
            tag, min=values[0], max=values[-1], num=sum(probs),
            sum=sum(v * p for v, p in zip(values, probs, strict=True)),
            sum_squares=sum(v * v * p for v, p in zip(values, probs, strict=True)),
            bucket_limits=values, bucket_counts=probs, global_step=step)
    writer.flush()


def close_trackers() -> None:
    """Close this process's TensorBoard writers (flushed already after every record)."""
    while _writers:
        _writers.popitem()[1].close()
