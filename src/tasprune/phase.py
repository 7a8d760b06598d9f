"""What the teacher, search and train phases share in a run directory: the file names,
the checkpoint kept in pairs (`Run`), the resume rules, the named random streams, how
ranks agree, and the metrics log. docs/runs.md describes resume, checkpoints, faults and
distributed runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from tasprune._io import drop_records
from tasprune.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_latest,
    previous_path,
    save_checkpoint,
)
from tasprune.config import runtime_fields, to_dict
from tasprune.device import resolve_device
from tasprune.dist import Dist, init_from_env, launched_by_torchrun, leave_process_group
from tasprune.faults import NonFiniteLoss, StopRequest
from tasprune.tracking import check_writable, log_record

SEARCH_CHECKPOINT = "search.pt"
TRAIN_CHECKPOINT = "train.pt"
BEST_FILE = "best.pt"
METRICS_FILE = "metrics.jsonl"
TRAIN_CONFIG_FILE = "train_config.yaml"

# A stream's seed is seed * 1_000_003 + epoch * step + offset (rank 0; rank r > 0 hashes
# seed, epoch, offset and r). name -> (step, offset): the values the searches and
# trainings of earlier versions drew, so their results stay the same.
_STREAMS = {
    "search.gumbel": (97, 0), "search.train_augment": (97, 1),
    "search.valid_augment": (97, 2), "search.train_order": (97, 3),
    "search.valid_order": (97, 4), "search.split": (97, 5), "search.supernet": (97, 6),
    "search.calibration": (97, 7), "search.held_out": (97, 8),
    "train.epoch": (1, 1), "train.augment": (1, 2),
}


def stream(seed: int, name: str, epoch: int = 0, rank: int = 0,
           device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of the random stream `name` (a key of `_STREAMS`) of `epoch`, for
    `rank` (rank 0's is the single-process one): same arguments, same numbers."""
    step, offset = _STREAMS[name]
    g = torch.Generator(device=device)
    if rank == 0:
        return g.manual_seed((seed * 1_000_003 + epoch * step + offset) % (2**63 - 1))
    digest = hashlib.sha256(f"{seed}/{epoch}/{offset}/{rank}".encode()).digest()
    return g.manual_seed(int.from_bytes(digest[:8], "little") % (2**63 - 1))


def has_checkpoint(path: Path) -> bool:
    """A checkpoint to resume from: `path`, or the previous one kept beside it."""
    return path.is_file() or previous_path(path).is_file()


def changed_settings(saved: Any, now: Any, runtime: frozenset[str] = frozenset(),
                     prefix: str = "") -> list[str]:
    """Every setting (dotted key) that differs between two config dicts, as
    "key: saved -> now", except the `runtime` keys (dotted too)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(saved) | set(now)):
            if f"{prefix}{key}" not in runtime:
                out += changed_settings(saved.get(key), now.get(key), runtime,
                                        f"{prefix}{key}.")
        return out
    return [] if saved == now else [f"{prefix[:-1]}: {saved!r} -> {now!r}"]


def runtime_keys(config: Any) -> frozenset[str]:
    """The dotted keys of `config` (and of its sections) that may change on a resume."""
    keys = set(runtime_fields(type(config)))
    for f in dataclasses.fields(config):
        section = getattr(config, f.name)
        if dataclasses.is_dataclass(section):
            keys |= {f"{f.name}.{k}" for k in runtime_keys(section)}
    return frozenset(keys)


def agree(dist: Dist, values: Sequence[float], device: torch.device | str = "cpu"
          ) -> list[float]:
    """Each value's maximum over the ranks (one all-reduce; the values in one process):
    how ranks agree on flags such as a stop signal, a non-finite loss or a failure."""
    if not dist.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return t.tolist()


def check_step(loss: torch.Tensor, dist: Dist, phase: str, at: tuple[int, int],
               stop: StopRequest | None = None) -> int:
    """Raise `NonFiniteLoss` (at = 1-based epoch and step) when the loss is NaN or
    infinite on some rank; else return the stop signal some rank caught (0: none)."""
    value = float(loss.detach())
    bad = 0 if math.isfinite(value) else (2 if math.isnan(value) else 1)
    signum = (stop.signum or 0) if stop is not None else 0
    bad, signum = (int(v) for v in agree(dist, [bad, signum], loss.device))
    if bad:
        shown = value if not math.isfinite(value) else (math.nan if bad == 2 else math.inf)
        raise NonFiniteLoss(phase, *at, shown)
    return signum


def agreed_signal(stop: StopRequest, dist: Dist, device: torch.device) -> int:
    """The stop signal caught by any rank (0 for none)."""
    return int(agree(dist, [stop.signum or 0], device)[0])


def rank_max_diff(dist: Dist, tensors: Sequence[torch.Tensor]) -> float:
    """The largest difference of `tensors` on any rank from rank 0's (0 when the ranks
    agree, as they must)."""
    flat = torch.cat([t.detach().float().reshape(-1) for t in tensors])
    diff = (flat - dist.broadcast_(flat.clone())).abs().max()
    return agree(dist, [float(diff)], flat.device)[0]


def gather(tensor: torch.Tensor, dist: Dist) -> list[torch.Tensor]:
    """Every rank's `tensor` on the CPU, in rank order (every rank gets the list)."""
    if not dist.enabled:
        return [tensor.cpu()]
    parts = [torch.empty_like(tensor) for _ in range(dist.world_size)]
    torch_dist.all_gather(parts, tensor)
    return [p.cpu() for p in parts]


def on_main(dist: Dist, device: torch.device, write: Callable[[], None]) -> None:
    """Run `write` on rank 0 only. Every rank returns once it is done (the agreement is
    the barrier) and raises when it failed, so none waits forever."""
    error: Exception | None = None
    if dist.is_main:
        try:
            write()
        except Exception as exc:  # re-raised below, after telling the other ranks
            error = exc
    if agree(dist, [error is not None], device)[0]:
        if error is not None:
            raise error
        raise RuntimeError("rank 0 failed to write the run directory (see its error)")


@contextlib.contextmanager
def process_group(device_name: str) -> Iterator[tuple[Dist, torch.device]]:
    """Join the torchrun process group if launched by torchrun (left at the end when
    joined here); yields this process's `Dist` and device (its GPU under torchrun)."""
    device = resolve_device(device_name)
    joined = launched_by_torchrun() and not torch_dist.is_initialized()
    dist = init_from_env(device.type)
    try:
        if dist.enabled and device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
        yield dist, device
    finally:
        if joined and torch_dist.is_initialized():
            leave_process_group()


@dataclasses.dataclass
class Run:
    """One phase in its run directory `out`: its checkpoint (`name`, tagged `kind`, the one
    it replaces kept as .prev), its metrics log, its ranks. Rank 0 alone writes."""

    out: Path
    name: str  # the checkpoint's file name
    kind: str  # its tag, e.g. "tasprune.train"; "tasprune.search/2" is version 2
    what: str  # the phase in messages: "training", "search"
    dist: Dist = dataclasses.field(default_factory=Dist)
    device: torch.device = torch.device("cpu")
    log_to: tuple[str, ...] = ()  # trackers besides metrics.jsonl

    def __post_init__(self) -> None:
        if self.log_to and self.dist.is_main:
            check_writable(self.out, self.log_to)

    @property
    def path(self) -> Path:
        return self.out / self.name

    def resuming(self, resume: bool) -> bool:
        """Whether to resume: with `resume` and a checkpoint there; a checkpoint there
        without `resume` is refused (not overwritten)."""
        found = has_checkpoint(self.path)
        if found and not resume:
            raise ValueError(f"{self.out} already holds a {self.what} run ({self.name}); pass "
                             "--resume to continue it, or choose another output directory")
        return found and resume

    def write(self, state: Mapping[str, Any]) -> None:
        """Write the checkpoint, keeping the one it replaces (rank 0's part of `save`)."""
        save_checkpoint(self.path, {"kind": self.kind, **state}, keep_previous=True)

    def save(self, state: Mapping[str, Any]) -> None:
        """Write the checkpoint on rank 0; every rank returns when it is written."""
        on_main(self.dist, self.device, lambda: self.write(state))

    def load(self) -> tuple[dict[str, Any], Path]:
        """The newest readable checkpoint (the .prev one when the newest is damaged) on CPU,
        and its path: rank 0 chooses, every rank reads that file."""
        choice = torch.zeros(1, dtype=torch.int64, device=self.device)  # path, .prev, none
        error: CheckpointError | None = None
        if self.dist.is_main:
            try:
                state, used = load_latest(self.path)
                choice[0] = 0 if used == self.path else 1
            except CheckpointError as exc:
                error, choice[0] = exc, 2
        self.dist.broadcast_(choice)
        if error is not None:
            raise error
        if int(choice[0]) == 2:
            raise CheckpointError(f"{self.path}: rank 0 could not read the checkpoint (see "
                                  "its error)")
        if not self.dist.is_main:
            used = self.path if int(choice[0]) == 0 else previous_path(self.path)
            state = load_checkpoint(used)
        kind = state.get("kind", state.get("format"))  # search.pt had "format" before
        if kind != self.kind:
            if isinstance(kind, str) and kind.split("/")[0] == self.kind.split("/")[0]:
                raise ValueError(f"{used} was written by an earlier tasprune whose {self.what} "
                                 f"differs; it cannot be resumed: start a new {self.what} "
                                 "(another output directory)")
            raise CheckpointError(f"{used}: not a tasprune {self.what} checkpoint")
        return state, used

    def check_settings(self, saved: Mapping[str, Any], config: Any, used: Path) -> None:
        """Refuse to resume with other settings than the saved ones, but runtime ones."""
        diff = changed_settings(dict(saved), to_dict(config), runtime_keys(config))
        if diff:
            raise CheckpointError(f"{used} was written with other {self.what} settings: "
                                  f"{'; '.join(diff)}; resume with the same settings, or "
                                  "choose another output directory")

    def check_world_size(self, saved: int, epoch: int, used: Path) -> None:
        """A mid-epoch checkpoint resumes on as many processes as wrote it."""
        if saved != self.dist.world_size:
            raise CheckpointError(f"{used} was written in the middle of epoch {epoch} by a "
                                  f"{self.what} on {saved} processes; resume it on {saved} "
                                  f"(this run has {self.dist.world_size})")

    def log(self, record: Mapping[str, Any], histograms: Any = None) -> None:
        """Append a record to metrics.jsonl (and the trackers), on rank 0."""
        if self.dist.is_main:
            log_record(self.out / METRICS_FILE, record, self.log_to, histograms)

    def drop(self, phases: tuple[str, ...], from_epoch: int = 0) -> None:
        """Drop the metrics lines of `phases` after `from_epoch` (all for 0), on rank 0."""
        if self.dist.is_main:
            drop_records(self.out / METRICS_FILE, phases, from_epoch)
