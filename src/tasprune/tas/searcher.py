"""The TAS search loop: alternate weight and architecture steps, log, checkpoint, derive.

Every step: one SGD step on the network weights with a batch of the "train" half,
then one Adam step on the architecture logits with a batch of the "valid" half
(cross-entropy + lambda * FLOP loss). The two halves are a per-class split of the
training set. What each step samples and optimises depends on the settings: the
default (`relaxation="expected"`) trains one Gumbel-sampled sub-network per weight
step, distilling from the teacher, and takes the architecture step on the
noise-free expected network; the paper's procedure (`relaxation="gumbel"` and the
settings of the paper recipes) mixes Gumbel top-2 samples by channel-wise
interpolation in both steps. docs/search.md explains both and why the default
differs. The first `weight_warmup` of the steps train the weights only; tau
anneals per step after them (or per epoch, `tau_per="epoch"`). The derived shape
is the argmax of every distribution, moved into the FLOP band when it lies
outside (`tasprune.tas.derive`).

Reproducibility: the split comes from the seed; batch order, augmentation and
Gumbel noise of epoch e come from generators seeded by (seed, e), so an epoch
can be replayed from its seed.

Checkpoints and faults. search.pt is written at every epoch end and, with
`checkpoint_every` = N > 0, after every N-th step (counted from the start of
the search); the file it replaces is kept as search.prev.pt, and a resume falls
back to that one when the newest is damaged. A mid-epoch checkpoint holds the
step reached, the states of the epoch's Gumbel and augmentation generators and
the epoch's partial metric sums: resuming rebuilds the epoch's batch order from
the seed, drops the finished batches as indices (their images are never
loaded) and continues, so a search stopped or killed anywhere and resumed ends
bit-identical to an uninterrupted one (CPU, one process); a mid-epoch checkpoint
resumes on the device type that wrote it (the Gumbel generator of a CUDA run is
a CUDA one, whose state a CPU generator cannot continue). A NaN/inf loss of
either step stops the search with `NonFiniteLoss` before that step's optimiser
applies it, writing nothing. SIGINT/SIGTERM finish the current step, write a
checkpoint and raise `Interrupted`.

Distributed (torchrun, WORLD_SIZE > 1). Each rank runs batch_size / world_size
images of each half per step, its shard of the same epoch permutation (see
tasprune.dist: the ranks' k-th batches together are the single-process k-th
batch), and the gradients of both steps are averaged over ranks with one flat
all-reduce before each optimiser step. There is no DistributedDataParallel
wrapper: each step freezes a different half of the parameters (the logits in
the weight step, the weights in the architecture step), which DDP's reducer
does not support; averaging the gradients the step computed is what DDP would
do. The flags the ranks must agree on (a loss was NaN/inf on some rank; some
rank was asked to stop) travel in those same all-reduces, so every rank stops
at the same step and no extra collective is needed.
- Gumbel noise: seeded from (seed, epoch) on every rank, so all ranks draw the
  same architecture at every step (same sub-network, same set of gradients),
  and the logits stay identical; every epoch end checks this (the record's
  `rank_logit_max_diff`, 0.0) and raises if they differ.
- Augmentation: rank 0 uses the single-process generators, rank r > 0 its own,
  seeded from (seed, epoch, stream, r), so ranks do not repeat the same crops.
- BatchNorm running statistics: every rank keeps its own, search.pt holds rank
  0's and a resume gives them to every rank. They play no part in the search
  (every forward runs in training mode on batch statistics), so no collective is
  spent on them.
- Epoch metrics are summed over ranks: rank 0 logs global numbers. Rank 0 alone
  writes files and shows progress; every rank reads the same checkpoint on resume.
- A mid-epoch checkpoint holds every rank's augmentation generator states
  (gathered) and the partial sums over all ranks (rank 0 resumes from them, the
  others from zero), so it resumes on the same number of processes; an epoch-end
  one on any.
With world size 1 no collective runs and the numbers are the single-process ones.
"""

from __future__ import annotations

import hashlib
import math
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tasprune._io import drop_records, read_jsonl
from tasprune.checkpoint import (
    CheckpointError,
    load_latest,
    previous_path,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tasprune.config import from_dict, to_dict
from tasprune.data.source import DataBundle, per_class_split
from tasprune.device import check_fits_data, resolve_amp, resolve_device
from tasprune.dist import (
    Dist,
    init_from_env,
    launched_by_torchrun,
    leave_process_group,
    per_rank_batch,
)
from tasprune.faults import Interrupted, NonFiniteLoss, StopRequest
from tasprune.flops import count_flops, count_params, expected_flops
from tasprune.latency_table import Key, LatencyTable
from tasprune.models import ResNet, build_model
from tasprune.progress import progress
from tasprune.settings import SearchConfig
from tasprune.shape import Shape
from tasprune.tas.cost import (
    Budget,
    BudgetLoss,
    band_floor,
    expected_cost,
    flops_budget,
    latency_budget,
    normalized_cost,
    params_budget,
    supernet_budget_loss,
    supernet_expected_flops,
)
from tasprune.tas.derive import derive_in_band
from tasprune.tas.health import Health, accuracy
from tasprune.tas.sampling import entropy, mean_entropy, tau_at
from tasprune.tas.space import SearchSpace
from tasprune.tas.supernet import Arch, SuperNet
from tasprune.tracking import log_record
from tasprune.training.distill import DistillConfig, distill_loss, teacher_logits
from tasprune.training.inherit import reorder_channels, taylor_importance
from tasprune.training.loop import autocast_for
from tasprune.training.optim import WarmupCosine, make_sgd

CHECKPOINT = "search.pt"
METRICS = "metrics.jsonl"
SHAPE = "shape.json"
_FORMAT = "tasprune.search/2"  # /2: the in-place KD search (1 had no suffix)


@dataclass(frozen=True)
class SearchResult:
    """The derived shape and its cost next to the target (FLOPs as multiply-accumulates)."""

    shape: Shape
    flops: int
    params: int
    full_flops: int
    target_flops: float
    tolerance_flops: float
    epochs: int
    out_dir: Path
    adjusted: bool = False  # the argmax shape was outside the band and was moved into it
    argmax_flops: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)
    # every budget's name -> (the shape's cost, the target), fractions of the unpruned cost
    budgets: dict[str, tuple[float, float]] = field(default_factory=dict)
    band_floor: float = 0.0  # of the loosest budget, its cost over its target

    @property
    def in_band(self) -> bool:
        """Every budget met, and the cost within the zero-loss band [target - tolerance,
        target] of the loosest one (FLOPs alone: the FLOP band)."""
        if not self.budgets:
            return self.target_flops - self.tolerance_flops <= self.flops <= self.target_flops
        worst = max(got / want for got, want in self.budgets.values())
        return self.band_floor - 1e-12 <= worst <= 1 + 1e-12


def check_budget(space: SearchSpace, flops_ratio: float) -> None:
    """Refuse a budget the space cannot reach, naming the reachable range."""
    low = space.min_flops_ratio()
    if not (0 < flops_ratio <= 1) or flops_ratio < low:
        raise ValueError(
            f"flops ratio {flops_ratio} cannot be reached: the smallest shape of this search "
            f"space (every conv at its narrowest width, every stage at its fewest blocks) has "
            f"{low:.4f} of the unpruned FLOPs; choose a ratio in [{math.ceil(low * 1e4) / 1e4}"
            f", 1]"
        )


def describe_budgets(config: SearchConfig) -> str:
    """The budgets of a search config in words, e.g. "0.5 of the FLOPs"."""
    parts = []
    if config.flops_ratio is not None:
        parts.append(f"{config.flops_ratio} of the FLOPs")
    if config.params_ratio is not None:
        parts.append(f"{config.params_ratio} of the parameters")
    if config.latency_ratio is not None:
        batches = ", ".join(str(b) for b in config.latency_batch_sizes)
        parts.append(f"{config.latency_ratio} of the {config.latency_device} latency (batch "
                     f"{batches})")
    return " and ".join(parts)


def space_of(config: SearchConfig, full: Shape) -> SearchSpace:
    """The search space a config searches on the unpruned network `full`."""
    return SearchSpace.from_shape(full, config.width_ratios, config.channel_multiple,
                                  config.couple_residual)


def _check_table(table: LatencyTable, keys: set[Key], full: Shape, quiet: bool) -> None:
    """Set a freshly timed table's prediction for the unpruned network beside the network's
    own time; time the table's entries of this model again when they are more than 2x apart
    (the machine was busy while it was timed)."""
    predicted, measured = table.check(full)
    if not 0.5 <= measured / predicted <= 2:
        if not quiet:
            print(f"latency table: it predicts {predicted:.2f} ms for the unpruned network at "
                  f"batch {table.batch}, which runs in {measured:.2f} ms; timing it again "
                  "(was the machine busy?)", file=sys.stderr, flush=True)
        table.forget(keys)
        table.fill(keys)
        predicted, measured = table.check(full)
    if not quiet:
        print(f"latency table: batch {table.batch}: {predicted:.2f} ms predicted for the "
              f"unpruned network, {measured:.2f} ms measured", file=sys.stderr, flush=True)


def build_budgets(config: SearchConfig, space: SearchSpace, quiet: bool = True
                  ) -> tuple[Budget, ...]:
    """The budgets of `config` on `space`, latency tables timed (or read from the cache)
    first; each is checked against the smallest shape of the space."""
    full = space.full
    budgets = []
    if config.flops_ratio is not None:
        budgets.append(flops_budget(full, config.flops_ratio))
    if config.params_ratio is not None:
        budgets.append(params_budget(full, config.params_ratio))
    if config.latency_ratio is not None:
        for batch in config.latency_batch_sizes:
            table = LatencyTable.cached(batch, config.latency_device, config.latency_threads)
            keys = table.keys_of_space(space)
            todo = len(keys - table.entries.keys())
            if todo and not quiet:
                print(f"latency table: timing {todo} layer configurations at batch {batch} on "
                      f"{config.latency_device} ({table.threads} threads; cached in "
                      f"{table.path})", file=sys.stderr, flush=True)
            if table.fill(keys):  # just timed: is the table right about the network?
                _check_table(table, keys, full, quiet)
            budgets.append(latency_budget(full, config.latency_ratio, table))
    smallest = space.smallest()
    for b in budgets:
        low = b.fraction(smallest)
        if b.ratio < low:
            name = b.name.split("@")[0]
            raise ValueError(
                f"{name} ratio {b.ratio} cannot be reached: the smallest shape of this search "
                f"space (every conv at its narrowest width, every stage at its fewest blocks) "
                f"has {low:.4f} of the unpruned network's {b.name}; choose a ratio in "
                f"[{math.ceil(low * 1e4) / 1e4}, 1]")
    return tuple(budgets)


def _generator(seed: int, epoch: int, stream: int, device: torch.device | str = "cpu",
               rank: int = 0) -> torch.Generator:
    """An independent generator per (seed, epoch, purpose), and per rank for rank > 0
    (rank 0's are the single-process ones)."""
    g = torch.Generator(device=device)
    if rank == 0:
        g.manual_seed((seed * 1_000_003 + epoch * 97 + stream) % (2**63 - 1))
    else:
        digest = hashlib.sha256(f"{seed}/{epoch}/{stream}/{rank}".encode()).digest()
        g.manual_seed(int.from_bytes(digest[:8], "little") % (2**63 - 1))
    return g


@contextmanager
def _grad_only(train: Sequence[torch.nn.Parameter], frozen: Sequence[torch.nn.Parameter]
               ) -> Iterator[None]:
    """Let autograd skip the gradients of `frozen` (they are not stepped here)."""
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


class _Flags:
    """Flags sent through `Dist.average_gradients` as one more "gradient": averaged over
    ranks, a flag is > 0 when some rank raised it."""

    def __init__(self, flags: list[bool], device: torch.device) -> None:
        self.grad = torch.tensor(flags, dtype=torch.float32, device=device)


def _average_and_agree(dist: Dist, params: Sequence[torch.nn.Parameter], loss: torch.Tensor,
                       stop: bool = False) -> tuple[bool, bool]:
    """Average the gradients of `params` over ranks; return (the loss is NaN/inf on some
    rank, some rank was asked to stop), agreed in the same all-reduce."""
    bad = not bool(torch.isfinite(loss.detach()).all())
    if not dist.enabled:
        return bad, stop
    flags = _Flags([bad, stop], loss.device)
    dist.average_gradients([*params, flags])
    agreed = (flags.grad > 0).tolist()
    return agreed[0], agreed[1]


def _loss_value(loss: torch.Tensor) -> float:
    """The loss for a NonFiniteLoss message (NaN when only another rank's was bad)."""
    value = float(loss.detach())
    return value if not math.isfinite(value) else float("nan")


def _backward_agreed(loss: torch.Tensor, opt: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler | None, dist: Dist,
                     params: Sequence[torch.nn.Parameter], stop: bool = False
                     ) -> tuple[bool, bool]:
    """Backward (scaled when `scaler`, then unscaled), gradients averaged over ranks;
    returns (a rank's loss was not finite, a rank asked to stop)."""
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    return _average_and_agree(dist, params, loss, stop)


def _optimizer_step(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """The step (skipped by the scaler when fp16 gradients overflowed)."""
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()


@dataclass(frozen=True)
class StepOut:
    """What one search step reports: the FLOP loss (None for a weight-only step),
    [train loss sum, train correct, train images, valid loss sum, valid correct, valid
    images, FLOP loss, architecture steps] as a float64 tensor, and whether a stop
    request was agreed (by every rank) during the step."""

    flop: BudgetLoss | None
    stats: torch.Tensor
    stop: bool = False


STATS = 8  # entries of StepOut.stats


def weight_loss(logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor,
                teacher: nn.Module | None, config: SearchConfig) -> torch.Tensor:
    """The weight step's loss: KD from the teacher's logits on the same images (in-place
    distillation, `config.kd_alpha` > 0 and a teacher given), else cross-entropy."""
    if teacher is None or config.kd_alpha == 0:
        return F.cross_entropy(logits, labels)
    soft = teacher_logits(teacher, images)
    return distill_loss(logits, labels, soft,
                        DistillConfig(config.kd_alpha, config.kd_temperature)).total


def weight_step_arch(net: SuperNet, config: SearchConfig, tau: float,
                generator: torch.Generator | None) -> Arch:
    """The architecture of a weight step: a Gumbel sample; with the "expected" relaxation
    one width per slot (a real sub-network's widths, channels kept in place), with
    "gumbel" (the paper) `topk` candidates mixed by channel-wise interpolation."""
    if config.relaxation == "expected":
        return net.sample(tau, 1, generator, pad=True)
    return net.sample(tau, config.topk, generator)


def arch_step_arch(net: SuperNet, config: SearchConfig, tau: float,
              generator: torch.Generator | None) -> Arch:
    """The architecture of an architecture step: with the "expected" relaxation every
    choice weighted by its probability, no noise (`SuperNet.expected`); with "gumbel"
    (the paper) a Gumbel sample as in the weight step."""
    if config.relaxation == "expected":
        return net.expected()
    return net.sample(tau, config.topk, generator)


def search_step(net: SuperNet, train: tuple[torch.Tensor, torch.Tensor],
                valid: tuple[torch.Tensor, torch.Tensor], w_opt: torch.optim.Optimizer,
                a_opt: torch.optim.Optimizer, config: SearchConfig, tau: float,
                generator: torch.Generator | None, budgets: Sequence[Budget] | int, *,
                teacher: nn.Module | None = None, arch_step: bool = True,
                entropy_weight: float = 0.0, argmax_weight: float = 1.0,
                dist: Dist | None = None, stop: bool = False, at: tuple[int, int] = (0, 0),
                amp: str = "off", scalers: Sequence[torch.amp.GradScaler] = ()
                ) -> StepOut:
    """(1) SGD on the weights with a train batch (`weight_loss`), then, when `arch_step`,
    (2) Adam on the logits with a valid batch (CE + lambda * the loss of every budget,
    `cost.supernet_budget_loss`; an int `budgets` is the unpruned FLOPs of a FLOP budget
    at `config.flops_ratio`); fresh Gumbel samples for each forward.

    Each step computes only the gradients it applies: the logits are frozen in (1),
    the weights in (2) (autograd then skips the weight gradients of every conv).
    Under `dist` the gradients are averaged over ranks before each optimiser step,
    and `stop` (this rank's stop request) is agreed with the other ranks. A NaN/inf
    loss on any rank raises `NonFiniteLoss` (at = 1-based epoch and step) before
    its optimiser step.

    `amp` ("off", "bf16", "fp16") runs both forwards under autocast; the FLOP loss and
    the entropy stay in float32/float64 outside it. With fp16, `scalers` (one
    GradScaler per optimiser) scale each loss before its backward."""
    dist = dist or Dist()
    (xt, yt), (xv, yv) = train, valid
    weights, arch = net.weight_parameters(), net.arch_parameters()
    w_scaler, a_scaler = scalers if scalers else (None, None)
    with _grad_only(weights, arch):
        with autocast_for(amp, xt.device):
            out_t = net(xt, weight_step_arch(net, config, tau, generator))
            loss_t = weight_loss(out_t, yt, xt, teacher, config)
        w_opt.zero_grad(set_to_none=True)
        bad, stop = _backward_agreed(loss_t, w_opt, w_scaler, dist, weights, stop)
        if bad:
            raise NonFiniteLoss("search", *at, _loss_value(loss_t))
        _optimizer_step(w_opt, w_scaler)
    fl = None
    zero = loss_t.new_zeros((), dtype=torch.float64)
    valid_stats = [zero] * 5
    if arch_step:
        with _grad_only(arch, weights):
            with autocast_for(amp, xv.device):
                out_v = net(xv, arch_step_arch(net, config, tau, generator))
                loss_v = F.cross_entropy(out_v, yv).float()
            if isinstance(budgets, int):  # the unpruned FLOPs: no count every step
                budgets = [Budget("flops", config.flops_ratio or 1.0, budgets, count_flops,
                                  expected_flops)]
            fl = supernet_budget_loss(net, budgets, config.tolerance, argmax_weight)
            loss_a = loss_v + config.flop_weight * fl.loss
            if entropy_weight > 0:
                loss_a = loss_a + entropy_weight * (
                    entropy(*net.searched_width_logits())
                    + entropy(net.depth_logits, net.depth_mask))
            a_opt.zero_grad(set_to_none=True)
            bad, _ = _backward_agreed(loss_a, a_opt, a_scaler, dist, arch)
            if bad:
                raise NonFiniteLoss("search", *at, _loss_value(loss_a))
            _optimizer_step(a_opt, a_scaler)
        with torch.no_grad():
            valid_stats = [loss_v.double() * len(yv), (out_v.argmax(1) == yv).sum().double(),
                           zero + len(yv), fl.loss.double().to(zero.device), zero + 1]
    with torch.no_grad():
        stats = torch.stack([loss_t.double() * len(yt), (out_t.argmax(1) == yt).sum().double(),
                             zero + len(yt), *valid_stats])
    return StepOut(flop=fl, stats=stats, stop=stop)


@dataclass
class _EpochRun:
    """What one epoch carries from step to step; a mid-epoch checkpoint saves it."""

    step: int  # steps done in this epoch
    lr: float  # at the epoch's start (the record's "lr")
    gumbel: torch.Generator
    train_aug: torch.Generator
    valid_aug: torch.Generator
    sums: torch.Tensor  # float64, StepOut.stats summed
    moves: list[int] = field(default_factory=lambda: [0, 0, 0])  # below / in band / above

    @classmethod
    def start(cls, config: SearchConfig, epoch: int, dist: Dist, device: torch.device,
              lr: float) -> _EpochRun:
        return cls(step=0, lr=lr, gumbel=_generator(config.seed, epoch, 0, device),
                   train_aug=_generator(config.seed, epoch, 1, rank=dist.rank),
                   valid_aug=_generator(config.seed, epoch, 2, rank=dist.rank),
                   sums=torch.zeros(STATS, dtype=torch.float64, device=device))

    def add(self, out: StepOut) -> None:
        if out.flop is not None:
            self.moves[out.flop.direction + 1] += 1
        self.sums += out.stats
        self.step += 1

    def totals(self, dist: Dist) -> list[float]:
        """The sums over all ranks (a collective)."""
        return dist.all_reduce_sum_(self.sums.clone()).tolist()

    def state(self, dist: Dist) -> dict[str, Any]:
        """For the checkpoint (a collective: every rank's augmentation states are gathered)."""
        augment = torch.stack([self.train_aug.get_state(), self.valid_aug.get_state()])
        if dist.enabled:
            mine = augment.to(self.sums.device)  # NCCL gathers on the GPU, gloo on the CPU
            gathered = [torch.empty_like(mine) for _ in range(dist.world_size)]
            torch_dist.all_gather(gathered, mine)
            augment = torch.stack([t.cpu() for t in gathered])
        else:
            augment = augment[None]
        return {"step": self.step, "lr": self.lr, "moves": list(self.moves),
                "totals": torch.tensor(self.totals(dist), dtype=torch.float64),
                "gumbel": self.gumbel.get_state(), "gumbel_device": self.gumbel.device.type,
                "augment": augment, "world_size": dist.world_size}

    @classmethod
    def restore(cls, saved: Mapping[str, Any], config: SearchConfig, epoch: int, dist: Dist,
                device: torch.device, path: Path) -> _EpochRun:
        """Continue the epoch a mid-epoch checkpoint stopped in (this rank's share of it)."""
        if saved["world_size"] != dist.world_size:
            raise ValueError(f"{path} was written in the middle of epoch {epoch + 1} by a "
                             f"search on {saved['world_size']} processes; resume it on "
                             f"{saved['world_size']} (this run has {dist.world_size})")
        if saved["gumbel_device"] != device.type:
            raise ValueError(f"{path} was written in the middle of epoch {epoch + 1} on "
                             f"{saved['gumbel_device']}, whose random numbers cannot be "
                             f"continued on {device.type}; resume with --device "
                             f"{saved['gumbel_device']}")
        run = cls.start(config, epoch, dist, device, float(saved["lr"]))
        # clones: Generator.set_state ignores a view's storage offset (crashes on [r, 1])
        run.gumbel.set_state(saved["gumbel"].cpu().clone())
        run.train_aug.set_state(saved["augment"][dist.rank, 0].clone())
        run.valid_aug.set_state(saved["augment"][dist.rank, 1].clone())
        if dist.is_main:  # the other ranks start from 0: the epoch end sums over ranks
            totals = saved["totals"].to(device=device, dtype=torch.float64)
            run.sums = totals.clone()
        run.step, run.moves = int(saved["step"]), [int(m) for m in saved["moves"]]
        return run


@dataclass
class SearchLoop:
    """What every epoch of one search uses: model, data, optimisers, where checkpoints go
    (`out`), the process group (`dist`) and the stop request (`stop`)."""

    net: SuperNet
    data: DataBundle
    config: SearchConfig
    train_idx: torch.Tensor
    valid_idx: torch.Tensor
    w_opt: torch.optim.Optimizer
    a_opt: torch.optim.Optimizer
    w_sched: torch.optim.lr_scheduler.LRScheduler
    full_flops: int
    steps: int
    out: Path
    shape_full: Shape
    budgets: tuple[Budget, ...] = ()
    teacher: bool = False
    dist: Dist = field(default_factory=Dist)
    teacher_net: nn.Module | None = None  # distilled from in the weight step
    health: Health | None = None
    stop: StopRequest = field(default_factory=lambda: StopRequest(enabled=False))
    resume_at: _EpochRun | None = None  # a mid-epoch checkpoint's epoch, for search_epoch
    stopped: bool = False  # a stop was agreed at the last step of an epoch
    amp: str = "off"  # resolved: "off", "bf16" or "fp16"
    scalers: tuple[torch.amp.GradScaler, ...] = ()  # (weights, architecture) with fp16

    @property
    def warmup_steps(self) -> int:
        """Weight-only steps before the first architecture step."""
        return warmup_steps(self.config, self.steps)

    def is_arch_step(self, epoch: int, step: int) -> bool:
        """Whether step `step` of epoch `epoch` (0-based) takes an architecture step."""
        return epoch * self.steps + step >= self.warmup_steps

    def _arch_position(self, epoch: int, step: int) -> tuple[int, int]:
        """(architecture steps before this one, architecture steps in all), the first
        clamped at 0 during the warm-up."""
        done = epoch * self.steps + step - self.warmup_steps
        return max(done, 0), self.config.epochs * self.steps - self.warmup_steps

    def _arch_fraction(self, epoch: int, step: int) -> float:
        """0 at the first architecture step, 1 at the last."""
        done, total = self._arch_position(epoch, step)
        return min(done / max(total - 1, 1), 1.0)

    def entropy_weight(self, epoch: int, step: int) -> float:
        """Weight of the mean entropy in the arch loss: 0 at the first architecture step,
        rising linearly to `config.entropy_weight` at the last."""
        return self.config.entropy_weight * self._arch_fraction(epoch, step)

    def argmax_weight(self, epoch: int, step: int) -> float:
        """Where the FLOP loss's direction comes from (see `cost.flop_loss`): the argmax
        shape (1), E[F] (0), or, "anneal", from E[F] at the first architecture step to the
        argmax at the last."""
        mode = self.config.flop_loss
        if mode == "anneal":
            return self._arch_fraction(epoch, step)
        return 1.0 if mode == "argmax" else 0.0

    def tau(self, epoch: int, step: int) -> float:
        """The temperature of step `step` of epoch `epoch` (both 0-based)."""
        cfg = self.config
        if cfg.tau_per == "epoch":
            return tau_at(epoch, cfg.epochs, cfg.tau_max, cfg.tau_min, cfg.tau_schedule)
        return tau_at(*self._arch_position(epoch, step), cfg.tau_max, cfg.tau_min,
                      cfg.tau_schedule)

    def save(self, epoch: int, run: _EpochRun | None = None) -> Path:
        """Write search.pt after `epoch` finished epochs (+ `run.step` steps of the next).

        Every rank calls it; rank 0 writes, the others wait until it has."""
        path = self.out / CHECKPOINT
        partial = run.state(self.dist) if run is not None else None
        if self.dist.is_main:
            save_checkpoint(path, {
                "format": _FORMAT, "epoch": epoch, "step": run.step if run else 0,
                "epoch_state": partial, "config": to_dict(self.config),
                "shape_full": self.shape_full.to_dict(), "supernet": self.net.state_dict(),
                "w_optimizer": self.w_opt.state_dict(), "a_optimizer": self.a_opt.state_dict(),
                "w_scheduler": self.w_sched.state_dict(), "rng": rng_state(),
                "teacher": self.teacher,
            }, keep_previous=True)
        self.dist.barrier()
        return path

    def interrupted(self, where: str) -> Interrupted:
        return Interrupted("search", self.stop.signum or signal.SIGTERM,
                           str(self.out / CHECKPOINT), where)


def _epoch_batches(data: DataBundle, indices: torch.Tensor, batch: int,
                   generator: torch.Generator, dist: Dist, skip: int
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's batches of one epoch over `indices`, from batch `skip` on.

    The permutation is drawn from `generator` as `ImageSource.batches(shuffle=True)`
    draws it, then sharded; the first `skip` batches are dropped as indices (their
    images are never loaded), and the generator goes on to the source (folders draw
    their crop seed from it after the permutation)."""
    order = dist.shard(indices[torch.randperm(len(indices), generator=generator)])
    return data.train.batches(batch, indices=order[skip * batch:], drop_last=True,
                              generator=generator, train=True)


def _rank_logit_max_diff(dist: Dist, net: SuperNet) -> float:
    """Largest difference between any rank's architecture logits and rank 0's."""
    logits = torch.cat([p.detach().reshape(-1) for p in net.arch_parameters()])
    diff = (logits - dist.broadcast_(logits.clone())).abs().max().reshape(1)
    torch_dist.all_reduce(diff, op=torch_dist.ReduceOp.MAX)
    return float(diff)


def search_epoch(loop: SearchLoop, epoch: int, quiet: bool = False) -> dict[str, Any]:
    """One epoch of alternating weight / architecture steps; returns its metrics record.

    Continues `loop.resume_at` (a mid-epoch checkpoint's state) when set; writes a
    checkpoint every `checkpoint_every` steps; when a stop is agreed, writes one and
    raises `Interrupted` (at the epoch's last step it sets `loop.stopped` instead, and
    `search` stops after the epoch-end checkpoint)."""
    net, data, cfg, dist = loop.net, loop.data, loop.config, loop.dist
    device = net.width_logits.device
    run = loop.resume_at or _EpochRun.start(cfg, epoch, dist, device,
                                            loop.w_opt.param_groups[0]["lr"])
    loop.resume_at = None
    batch = per_rank_batch(cfg.batch_size, dist)
    batches = zip(
        _epoch_batches(data, loop.train_idx, batch, _generator(cfg.seed, epoch, 3), dist,
                       run.step),
        _epoch_batches(data, loop.valid_idx, batch, _generator(cfg.seed, epoch, 4), dist,
                       run.step),
    )
    first, start = run.step, time.perf_counter()
    tau = loop.tau(epoch, first)
    net.train()
    bar = progress(batches, total=loop.steps - first, desc=f"search {epoch + 1}/{cfg.epochs}",
                   quiet=quiet)
    memory_format = torch.channels_last if device.type == "cuda" else torch.preserve_format
    for step, ((xt, yt), (xv, yv)) in enumerate(bar, start=first):
        xt = data.transform(xt.to(device, non_blocking=True), train=True,
                            generator=run.train_aug).contiguous(memory_format=memory_format)
        xv = data.transform(xv.to(device, non_blocking=True), train=True,
                            generator=run.valid_aug).contiguous(memory_format=memory_format)
        tau = loop.tau(epoch, step)
        out = search_step(net, (xt, yt.to(device)), (xv, yv.to(device)), loop.w_opt,
                          loop.a_opt, cfg, tau, run.gumbel, loop.budgets or loop.full_flops,
                          teacher=loop.teacher_net, arch_step=loop.is_arch_step(epoch, step),
                          entropy_weight=loop.entropy_weight(epoch, step),
                          argmax_weight=loop.argmax_weight(epoch, step), dist=dist,
                          stop=loop.stop.requested, at=(epoch + 1, step + 1),
                          amp=loop.amp, scalers=loop.scalers)
        loop.w_sched.step()
        run.add(out)
        if not quiet and step % 20 == 0:
            bar.set_postfix(loss=f"{float(out.stats[0]) / len(yt):.3f}", tau=f"{tau:.2f}",
                            flops=f"{count_flops(net.derive()) / loop.full_flops:.3f}")
        if step + 1 == loop.steps:
            loop.stopped = out.stop  # the epoch end writes the checkpoint
        elif out.stop:
            loop.save(epoch, run)
            raise loop.interrupted(f"epoch {epoch + 1} step {step + 1} of {loop.steps}")
        elif cfg.checkpoint_every and (epoch * loop.steps + step + 1) % cfg.checkpoint_every == 0:
            loop.save(epoch, run)
    seconds = time.perf_counter() - start
    s = run.totals(dist)
    n_train, n_valid = max(s[2], 1), max(s[5], 1)
    shape = net.derive()
    flops = count_flops(shape)
    expected = float(supernet_expected_flops(net).detach())
    searched = net.searched_width_logits()
    record = {
        "phase": "search", "epoch": epoch + 1, "tau": tau, "lr": run.lr,
        "arch_lr": loop.a_opt.param_groups[0]["lr"], "arch_steps": int(s[7]),
        "train_loss": s[0] / n_train, "train_acc": s[1] / n_train,
        "valid_loss": s[3] / n_valid, "valid_acc": s[4] / n_valid,
        "flop_loss": s[6] / max(s[7], 1),
        "expected_flops": expected, "argmax_flops": flops,
        "expected_ratio": expected / loop.full_flops, "flops_ratio": flops / loop.full_flops,
        "target_ratio": cfg.flops_ratio, **_budget_fields(loop.budgets, net, shape),
        "steps_below_band": run.moves[0],
        "steps_in_band": run.moves[1], "steps_above_target": run.moves[2],
        "width_entropy": mean_entropy(*searched),
        "depth_entropy": mean_entropy(net.depth_logits, net.depth_mask),
        "width_entropy_max": mean_entropy(searched[0] * 0, searched[1]),
        "depth_entropy_max": mean_entropy(net.depth_logits * 0, net.depth_mask),
        "blocks": list(shape.blocks),
        "images_per_s": (s[2] + s[5]) / seconds if seconds > 0 else 0.0,
        "seconds": seconds,
    }
    if loop.health is not None and dist.is_main:
        record.update(loop.health.measure(net, shape))
    if dist.enabled:
        record["rank_logit_max_diff"] = diff = _rank_logit_max_diff(dist, net)
        if diff != 0:
            raise RuntimeError(
                f"search: after epoch {epoch + 1} the architecture logits differ between "
                f"processes (max abs difference {diff:.3g}); they must stay identical (same "
                "Gumbel draws, averaged gradients): check that every process runs the same "
                "tasprune version and settings")
    return record


def warmup_steps(config: SearchConfig, steps: int) -> int:
    """Weight-only steps at the start of a search of `steps` steps per epoch."""
    return int(config.weight_warmup * config.epochs * steps)


def arch_lr(config: SearchConfig, steps: int) -> float:
    """The architecture learning rate of a search of `steps` steps per epoch: arch_lr, times
    arch_lr_steps / (its architecture steps) when arch_lr_steps > 0, so that the logits can
    move as far in a short search as in a long one."""
    arch_steps = max(config.epochs * steps - warmup_steps(config, steps), 1)
    if config.arch_lr_steps == 0:
        return config.arch_lr
    return config.arch_lr * config.arch_lr_steps / arch_steps


_CALIBRATION_IMAGES = 1024  # train-half images for BatchNorm recalibration and importance


def _subset(indices: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """A fixed random subset of `n` of `indices` (all of them when fewer), sorted."""
    pick = indices[torch.randperm(len(indices), generator=generator)[:n]]
    return torch.sort(pick).values


def _reordered(teacher: ResNet, data: DataBundle, images: torch.Tensor, batch_size: int,
               dist: Dist) -> ResNet:
    """The teacher with its channels sorted by Taylor importance on `images` (computed
    on rank 0 and shared, so every rank starts from the same supernet)."""
    device = next(teacher.parameters()).device
    batches = ((data.transform(x.to(device)), y.to(device))
               for x, y in data.train.batches(batch_size, indices=images))
    importance = taylor_importance(teacher, batches)
    if dist.enabled:
        for scores in importance.values():
            dist.broadcast_(scores)
    return reorder_channels(teacher, importance)


def search(shape_full: Shape, data: DataBundle, config: SearchConfig,
           out_dir: str | Path, teacher_state: Mapping[str, torch.Tensor] | None = None,
           resume: bool = False, quiet: bool = False) -> SearchResult:
    """Search a pruned shape of `shape_full` at `config.flops_ratio` of its FLOPs.

    Writes `out_dir/search.pt` (every epoch, every `checkpoint_every` steps; the one
    before as search.prev.pt), `out_dir/metrics.jsonl` (a "search" line per epoch, a
    "derive" line at the end) and `out_dir/shape.json`.
    `teacher_state`: state dict of the trained unpruned network to start from.
    `resume`: continue from `out_dir/search.pt` (or search.prev.pt when it is damaged;
    same config, except device and checkpoint_every), or start afresh when there is none.
    Launched by torchrun, the search runs on all its processes (module docstring).
    Raises `NonFiniteLoss` on a NaN/inf loss and `Interrupted` after SIGINT/SIGTERM.
    """
    out = Path(out_dir)
    check_fits_data(shape_full, data, "network to search")
    space = space_of(config, shape_full)
    if config.flops_ratio is not None:
        check_budget(space, config.flops_ratio)
    ckpt_path, metrics_path = out / CHECKPOINT, out / METRICS
    found = ckpt_path.exists() or previous_path(ckpt_path).exists()
    if not resume and found:
        raise ValueError(f"{ckpt_path} exists: pass resume (--resume) to continue that search, "
                         f"or choose another output directory")
    resume = resume and found  # nothing to resume: start afresh (as train)
    train_idx, valid_idx = per_class_split(data.train.labels, config.split_fraction,
                                           _generator(config.seed, 0, 5))
    steps = min(len(train_idx), len(valid_idx)) // config.batch_size
    if steps == 0:
        raise ValueError(
            f"batch size {config.batch_size} is larger than the halves of the training set "
            f"({len(train_idx)} and {len(valid_idx)} images); use a batch size <= "
            f"{min(len(train_idx), len(valid_idx))}"
        )
    device = resolve_device(config.device)
    amp = resolve_amp(config.amp, device)
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("search amp fp16 needs a CUDA device; use amp bf16 or off")
    owns_group = launched_by_torchrun() and not torch_dist.is_initialized()
    dist = init_from_env(device.type)
    try:
        per_rank_batch(config.batch_size, dist)
        if dist.enabled and device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
        net = SuperNet(space, _generator(config.seed, 0, 6)).to(device)
        calibrate = _subset(train_idx, _CALIBRATION_IMAGES, _generator(config.seed, 0, 7))
        held_out = _subset(valid_idx, config.health_images, _generator(config.seed, 0, 8))
        health = Health(data, calibrate, held_out, config.batch_size)
        teacher_net = None
        if teacher_state is not None:
            net.load_teacher(teacher_state)  # checks that it fits
            teacher_net = build_model(shape_full).to(device, memory_format=torch.channels_last)
            teacher_net.load_state_dict(teacher_state)
            teacher_net.eval()
            if config.reorder and not resume:
                net.load_teacher(_reordered(teacher_net, data, calibrate, config.batch_size,
                                            dist).state_dict())
            health.teacher_acc = accuracy(teacher_net, data, held_out, config.batch_size,
                                          device)
        # weight decay on every weight (BN included), as the TAS code
        w_opt = make_sgd(net.weight_parameters(), config.lr, config.momentum, config.nesterov,
                         config.weight_decay)
        a_opt = torch.optim.Adam(net.arch_parameters(), lr=arch_lr(config, steps),
                                 betas=config.arch_betas, weight_decay=config.arch_weight_decay)
        w_sched = WarmupCosine(w_opt, total_steps=config.epochs * steps)
        distil_from = teacher_net if config.kd_alpha > 0 else None
        if distil_from is not None and config.compile:
            distil_from = torch.compile(distil_from)
        loop = SearchLoop(net, data, config, train_idx, valid_idx, w_opt, a_opt, w_sched,
                          count_flops(shape_full), steps, out, shape_full,
                          build_budgets(config, space, quiet or not dist.is_main),
                          teacher=teacher_state is not None, dist=dist,
                          teacher_net=distil_from,
                          health=health if config.health_images > 0 else None, amp=amp,
                          scalers=tuple(torch.amp.GradScaler(device.type) for _ in range(2))
                          if amp == "fp16" else ())
        start = _restore(ckpt_path, shape_full, config, loop) if resume else 0
        quiet = quiet or not dist.is_main
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            drop_records(metrics_path, ("derive",))  # written again at the end
            drop_records(metrics_path, ("search",), start)  # a resume redoes epochs after it
        with StopRequest() as loop.stop:
            for epoch in range(start, config.epochs):
                record = search_epoch(loop, epoch, quiet)
                if dist.is_main:
                    log_record(metrics_path, record, config.log, distributions(net))
                loop.save(epoch + 1)
                if not quiet:
                    tqdm.write(_epoch_line(record, config), file=sys.stderr)
                if loop.stopped and epoch + 1 < config.epochs:
                    raise loop.interrupted(f"the end of epoch {epoch + 1}")
        return _finish(loop, metrics_path)
    finally:
        if owns_group and torch_dist.is_initialized():
            leave_process_group()


def distributions(net: SuperNet) -> dict[str, tuple[tuple[int, ...], list[float]]]:
    """Every width slot's and stage depth's distribution: tag -> (choices, probabilities),
    for the trackers' histograms."""
    out = {}
    for kind, logits, mask, values in (
            ("width/slot", net.slot_width_logits(), net.width_mask, net.space.widths),
            ("depth/stage", net.depth_logits, net.depth_mask, net.space.depths)):
        probs = torch.softmax(logits.detach().masked_fill(~mask, float("-inf")), -1)
        for i, choices in enumerate(values):
            out[f"{kind}{i:02d}"] = (choices, probs[i, :len(choices)].tolist())
    return out


def _budget_fields(budgets: Sequence[Budget], net: SuperNet, shape: Shape) -> dict[str, float]:
    """For every budget but the FLOPs (always logged): the argmax shape's cost and the
    expected cost as fractions of the unpruned network's, and the target."""
    out = {}
    for b in budgets:
        if b.name == "flops":
            continue
        expected = expected_cost(net.space, net.width_logits, net.depth_logits,
                                 net.width_mask, net.depth_mask, b.expected)
        out[f"{b.name}_ratio"] = b.fraction(shape)
        out[f"expected_{b.name}_ratio"] = float(expected.detach()) / b.full
        out[f"target_{b.name}_ratio"] = b.ratio
    return out


def _epoch_line(record: dict[str, Any], config: SearchConfig) -> str:
    """The one line a search prints per epoch: its health at a glance."""
    line = (f"search epoch {record['epoch']}/{config.epochs}: tau {record['tau']:.2f}  "
            f"train acc {record['train_acc']:.3f}")
    if "subnet_acc" in record:
        line += f"  argmax shape acc {record['subnet_acc']:.3f}"
        if "teacher_acc" in record:
            line += f" (teacher {record['teacher_acc']:.3f})"
    line += (f"  FLOPs {record['flops_ratio']:.3f} (expected {record['expected_ratio']:.3f}"
             + (f", target {config.flops_ratio})" if config.flops_ratio else ")"))
    for key in record:
        if key.startswith("target_") and key != "target_ratio":
            name = key.removeprefix("target_").removesuffix("_ratio")
            line += (f"  {name} {record[f'{name}_ratio']:.3f} (expected "
                     f"{record[f'expected_{name}_ratio']:.3f}, target {record[key]})")
    return (line + "  entropy width "
            f"{record['width_entropy']:.2f}/{record['width_entropy_max']:.2f} depth "
            f"{record['depth_entropy']:.2f}/{record['depth_entropy_max']:.2f}  "
            f"{record['images_per_s']:.0f} img/s")


def _finish(loop: SearchLoop, metrics_path: Path) -> SearchResult:
    """Derive the shape (the argmax, moved into the FLOP band when it is outside), write
    shape.json and the "derive" metrics line (rank 0)."""
    net, config, shape_full, dist = loop.net, loop.config, loop.shape_full, loop.dist
    budgets = loop.budgets or (flops_budget(shape_full, config.flops_ratio or 1.0),)
    only_flops = [b.name for b in budgets] == ["flops"]
    floor = band_floor(budgets, config.tolerance)
    derived = derive_in_band(
        net.space, net.slot_width_logits(), net.depth_logits, net.width_mask, net.depth_mask,
        budgets[0].ratio, config.tolerance, fill=config.fill,
        cost=None if only_flops else (normalized_cost(budgets), 1.0, floor))
    shape = derived.shape
    full = loop.full_flops
    ratio = 1.0 if config.flops_ratio is None else config.flops_ratio
    result = SearchResult(
        shape=shape, flops=derived.flops, params=count_params(shape), full_flops=full,
        target_flops=ratio * full, tolerance_flops=config.tolerance * full,
        epochs=config.epochs, out_dir=loop.out, adjusted=derived.adjusted,
        argmax_flops=derived.argmax_flops,
        history=[r for r in read_jsonl(metrics_path) if r.get("phase") == "search"],
        budgets={b.name: (b.fraction(shape), b.ratio) for b in budgets},
        band_floor=floor,
    )
    if dist.is_main:
        shape.save(loop.out / SHAPE)
        record = {
            "phase": "derive", "epoch": config.epochs, "flops": result.flops,
            "params": result.params, "full_flops": full,
            "full_params": count_params(shape_full), "target_flops": result.target_flops,
            "flops_ratio": result.flops / full, "target_ratio": config.flops_ratio,
            "tolerance": config.tolerance, "in_band": result.in_band,
            "blocks": list(shape.blocks), "adjusted": derived.adjusted,
            "argmax_flops": derived.argmax_flops,
            "argmax_ratio": derived.argmax_flops / full,
            "budgets": {name: {"ratio": got, "target": want}
                        for name, (got, want) in result.budgets.items()},
        }
        if loop.health is not None:
            record.update(loop.health.measure(net, shape))
        log_record(metrics_path, record, config.log)
    dist.barrier()
    return result


# settings a resume may change: where and how fast it runs, how often it checkpoints, where
# its metrics go
_RESUMABLE_CHANGES = ("device", "checkpoint_every", "amp", "compile", "log")


def _restore(path: Path, shape_full: Shape, config: SearchConfig, loop: SearchLoop) -> int:
    """Load search.pt (or search.prev.pt when it is damaged) into the fresh objects of
    `loop`; return the number of finished epochs (and set `loop.resume_at` when the
    checkpoint was written mid-epoch)."""
    state, used = load_latest(path)
    if state.get("format") == "tasprune.search":
        raise ValueError(f"{used} was written by an earlier tasprune whose search differs; "
                         "it cannot be resumed: start a new search (another output directory)")
    if state.get("format") != _FORMAT:
        raise CheckpointError(f"{used}: not a tasprune search checkpoint")
    saved_shape = Shape.from_dict(state["shape_full"])
    if saved_shape != shape_full:
        raise ValueError(f"{used} searched {saved_shape.describe()} with "
                         f"{saved_shape.num_classes} classes, not {shape_full.describe()} with "
                         f"{shape_full.num_classes}; resume with the same model and data")
    # a search saved before couple_residual existed searched the free space
    saved = from_dict(SearchConfig, {"couple_residual": False, **state["config"]})
    diff = [f"{k} (saved {getattr(saved, k)!r}, now {getattr(config, k)!r})"
            for k in to_dict(config)
            if k not in _RESUMABLE_CHANGES and getattr(saved, k) != getattr(config, k)]
    if diff:
        raise ValueError(f"{used} was written with other search settings: {'; '.join(diff)}; "
                         f"resume with the same settings or start a new output directory")
    loop.net.load_state_dict(state["supernet"])
    loop.w_opt.load_state_dict(state["w_optimizer"])
    loop.a_opt.load_state_dict(state["a_optimizer"])
    loop.w_sched.load_state_dict(state["w_scheduler"])
    set_rng_state(state["rng"])
    epoch = int(state["epoch"])
    if state.get("epoch_state") is not None:
        loop.resume_at = _EpochRun.restore(state["epoch_state"], config, epoch, loop.dist,
                                           loop.net.width_logits.device, used)
    return epoch
