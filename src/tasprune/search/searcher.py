"""The TAS search loop: alternate weight and architecture steps, log, checkpoint, derive.

Every step (DESIGN.md, "Schedule"): one SGD step on the network weights with a
batch of the "train" half (cross-entropy), then one Adam step on the
architecture logits with a batch of the "valid" half (cross-entropy + lambda *
FLOP loss). Both forwards draw fresh Gumbel samples. The two halves are a
per-class split of the training set. tau is set per epoch.

Reproducibility: the split comes from the seed; batch order, augmentation and
Gumbel noise of epoch e come from generators seeded by (seed, e), so a search
resumed from the checkpoint of epoch e replays epoch e exactly as an
uninterrupted one would (bit-exact on CPU).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tasprune._io import append_jsonl, drop_records, read_jsonl
from tasprune.config import from_dict, to_dict
from tasprune.data.source import DataBundle, per_class_split
from tasprune.flops import count_flops, count_params
from tasprune.progress import progress
from tasprune.search.cost import FlopLoss, supernet_expected_flops, supernet_flop_loss
from tasprune.search.sampling import SCHEDULES, mean_entropy, tau_at
from tasprune.search.space import DEFAULT_RATIOS, SearchSpace
from tasprune.search.supernet import SuperNet
from tasprune.shape import Shape
from tasprune.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tasprune.train.optim import WarmupCosine, make_sgd
from tasprune.train.trainer import check_fits_data, resolve_device

CHECKPOINT = "search.pt"
METRICS = "metrics.jsonl"
SHAPE = "shape.json"
_FORMAT = "tasprune.search"


@dataclass(frozen=True)
class SearchConfig:
    """Hyper-parameters of the search (defaults: DESIGN.md "Schedule", the TAS code).

    flops_ratio: target FLOPs as a fraction of the unpruned network's;
    tolerance: width of the zero-loss band below the target, as a fraction of
    the unpruned FLOPs; flop_weight: lambda of the arch loss; topk: width
    candidates per slot and forward (1 = hard sample); width_ratios and
    channel_multiple: the width choices (see search.space); split_fraction:
    share of every class in the "train" half.
    """

    flops_ratio: float = 0.5
    epochs: int = 600
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    arch_lr: float = 1e-3
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 1e-3
    tau_max: float = 5.0
    tau_min: float = 0.1
    tau_schedule: str = "cosine"
    flop_weight: float = 2.0
    tolerance: float = 0.05
    topk: int = 2
    width_ratios: tuple[float, ...] = DEFAULT_RATIOS
    channel_multiple: int = 1
    split_fraction: float = 0.5
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        def fail(name: str, rule: str) -> None:
            raise ValueError(f"search config {name} = {getattr(self, name)!r}: {rule}")

        if not 0 < self.flops_ratio <= 1:
            fail("flops_ratio", "the FLOP budget is a fraction of the unpruned network's "
                 "FLOPs in (0, 1], e.g. 0.5 for half")
        for name in ("epochs", "batch_size", "topk", "channel_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(name, "must be an integer >= 1")
        for name in ("lr", "arch_lr"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                fail(name, "a learning rate must be a positive number")
        for name in ("momentum", "weight_decay", "arch_weight_decay", "flop_weight",
                     "tolerance"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                fail(name, "must be a number >= 0")
        if len(self.arch_betas) != 2 or not all(0 <= b < 1 for b in self.arch_betas):
            fail("arch_betas", "Adam needs two betas in [0, 1), e.g. [0.5, 0.999]")
        if not 0 < self.tau_min <= self.tau_max:
            fail("tau_min", f"need 0 < tau_min <= tau_max (tau_max = {self.tau_max})")
        if self.tau_schedule not in SCHEDULES:
            fail("tau_schedule", f"expected one of {', '.join(SCHEDULES)}")
        if not self.width_ratios or not all(0 < r <= 1 for r in self.width_ratios):
            fail("width_ratios", "give width ratios in (0, 1], e.g. [0.3, 0.4, ..., 1.0]")
        if not 0 < self.split_fraction < 1:
            fail("split_fraction", "the train half's share of every class, in (0, 1)")
        if self.nesterov and self.momentum == 0:
            fail("momentum", "Nesterov momentum needs momentum > 0 (or set nesterov false)")
        object.__setattr__(self, "width_ratios", tuple(float(r) for r in self.width_ratios))
        object.__setattr__(self, "arch_betas", tuple(float(b) for b in self.arch_betas))


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
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def in_band(self) -> bool:
        """FLOPs within the zero-loss band [target - tolerance, target]."""
        return self.target_flops - self.tolerance_flops <= self.flops <= self.target_flops


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


def _generator(seed: int, epoch: int, stream: int, device: torch.device | str = "cpu"
               ) -> torch.Generator:
    """An independent generator per (seed, epoch, purpose)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + epoch * 97 + stream) % (2**63 - 1))
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


@dataclass
class SearchLoop:
    """What every epoch of one search uses (one place, so a data sharder can be added)."""

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


@dataclass(frozen=True)
class StepOut:
    """What one search step reports: the FLOP loss, and [train loss sum, train correct,
    valid loss sum, valid correct, FLOP loss, 1] as a float64 tensor (no host sync)."""

    flop: FlopLoss
    stats: torch.Tensor


def search_step(net: SuperNet, train: tuple[torch.Tensor, torch.Tensor],
                valid: tuple[torch.Tensor, torch.Tensor], w_opt: torch.optim.Optimizer,
                a_opt: torch.optim.Optimizer, config: SearchConfig, tau: float,
                generator: torch.Generator | None, full_flops: int) -> StepOut:
    """(1) SGD on the weights with a train batch (CE), then (2) Adam on the logits with a
    valid batch (CE + lambda * FLOP loss); fresh Gumbel samples for each forward.

    Each step computes only the gradients it applies: the logits are frozen in (1),
    the weights in (2) (autograd then skips the weight gradients of every conv)."""
    (xt, yt), (xv, yv) = train, valid
    weights, arch = net.weight_parameters(), net.arch_parameters()
    with _grad_only(weights, arch):
        out_t = net(xt, net.sample(tau, config.topk, generator))
        loss_t = F.cross_entropy(out_t, yt)
        w_opt.zero_grad(set_to_none=True)
        loss_t.backward()
        w_opt.step()
    with _grad_only(arch, weights):
        out_v = net(xv, net.sample(tau, config.topk, generator))
        loss_v = F.cross_entropy(out_v, yv)
        fl = supernet_flop_loss(net, config.flops_ratio, config.tolerance, full_flops)
        a_opt.zero_grad(set_to_none=True)
        (loss_v + config.flop_weight * fl.loss).backward()
        a_opt.step()
    with torch.no_grad():
        stats = torch.stack([
            loss_t.double() * len(yt), (out_t.argmax(1) == yt).sum().double(),
            loss_v.double() * len(yv), (out_v.argmax(1) == yv).sum().double(),
            fl.loss.double().to(loss_t.device), loss_t.new_ones((), dtype=torch.float64),
        ])
    return StepOut(flop=fl, stats=stats)


def search_epoch(loop: SearchLoop, epoch: int, quiet: bool = False) -> dict[str, Any]:
    """One epoch of alternating weight / architecture steps; returns its metrics record."""
    net, data, cfg = loop.net, loop.data, loop.config
    device = net.width_logits.device
    tau = tau_at(epoch, cfg.epochs, cfg.tau_max, cfg.tau_min, cfg.tau_schedule)
    gumbel = _generator(cfg.seed, epoch, 0, device)
    train_aug, valid_aug = _generator(cfg.seed, epoch, 1), _generator(cfg.seed, epoch, 2)
    batches = zip(
        data.train.batches(cfg.batch_size, indices=loop.train_idx, shuffle=True, drop_last=True,
                           generator=_generator(cfg.seed, epoch, 3), train=True),
        data.train.batches(cfg.batch_size, indices=loop.valid_idx, shuffle=True, drop_last=True,
                           generator=_generator(cfg.seed, epoch, 4), train=True),
    )
    lr = loop.w_opt.param_groups[0]["lr"]
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # train/valid loss, correct; flop
    n_seen, moves, start = 0, [0, 0, 0], time.perf_counter()
    net.train()
    bar = progress(batches, total=loop.steps, desc=f"search {epoch + 1}/{cfg.epochs}",
                   quiet=quiet)
    for step, ((xt, yt), (xv, yv)) in enumerate(bar):
        xt = data.transform(xt.to(device), train=True, generator=train_aug)
        xv = data.transform(xv.to(device), train=True, generator=valid_aug)
        out = search_step(net, (xt, yt.to(device)), (xv, yv.to(device)), loop.w_opt,
                          loop.a_opt, cfg, tau, gumbel, loop.full_flops)
        loop.w_sched.step()
        moves[out.flop.direction + 1] += 1
        sums += out.stats
        n_seen += len(yt)
        if not quiet and step % 20 == 0:
            bar.set_postfix(loss=f"{float(out.stats[0]) / len(yt):.3f}", tau=f"{tau:.2f}",
                            flops=f"{out.flop.current / loop.full_flops:.3f}")
    seconds = time.perf_counter() - start
    s = sums.tolist()
    shape = net.derive()
    flops = count_flops(shape)
    expected = float(supernet_expected_flops(net).detach())
    return {
        "phase": "search", "epoch": epoch + 1, "tau": tau, "lr": lr,
        "train_loss": s[0] / max(n_seen, 1), "train_acc": s[1] / max(n_seen, 1),
        "valid_loss": s[2] / max(n_seen, 1), "valid_acc": s[3] / max(n_seen, 1),
        "flop_loss": s[4] / max(s[5], 1),
        "expected_flops": expected, "argmax_flops": flops,
        "expected_ratio": expected / loop.full_flops, "flops_ratio": flops / loop.full_flops,
        "target_ratio": cfg.flops_ratio,
        "steps_below_band": moves[0], "steps_in_band": moves[1], "steps_above_target": moves[2],
        "width_entropy": mean_entropy(net.width_logits, net.width_mask),
        "depth_entropy": mean_entropy(net.depth_logits, net.depth_mask),
        "blocks": list(shape.blocks),
        "images_per_s": 2 * n_seen / seconds if seconds > 0 else 0.0, "seconds": seconds,
    }


def search(shape_full: Shape, data: DataBundle, config: SearchConfig,
           out_dir: str | Path, teacher_state: Mapping[str, torch.Tensor] | None = None,
           resume: bool = False, quiet: bool = False) -> SearchResult:
    """Search a pruned shape of `shape_full` at `config.flops_ratio` of its FLOPs.

    Writes `out_dir/search.pt` (every epoch), `out_dir/metrics.jsonl` (a "search"
    line per epoch, a "derive" line at the end) and `out_dir/shape.json`.
    `teacher_state`: state dict of the trained unpruned network to start from.
    `resume`: continue from `out_dir/search.pt` (same config; device may differ), or
    start afresh when there is none.
    """
    out = Path(out_dir)
    check_fits_data(shape_full, data, "network to search")
    space = SearchSpace.from_shape(shape_full, config.width_ratios, config.channel_multiple)
    check_budget(space, config.flops_ratio)
    ckpt_path, metrics_path = out / CHECKPOINT, out / METRICS
    if not resume and ckpt_path.exists():
        raise ValueError(f"{ckpt_path} exists: pass resume (--resume) to continue that search, "
                         f"or choose another output directory")
    resume = resume and ckpt_path.exists()  # nothing to resume: start afresh (as train)
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
    net = SuperNet(space, _generator(config.seed, 0, 6)).to(device)
    if teacher_state is not None:
        net.load_teacher(teacher_state)
    # weight decay on every weight (BN included), as the TAS code
    w_opt = make_sgd(net.weight_parameters(), config.lr, config.momentum, config.nesterov,
                     config.weight_decay)
    a_opt = torch.optim.Adam(net.arch_parameters(), lr=config.arch_lr, betas=config.arch_betas,
                             weight_decay=config.arch_weight_decay)
    w_sched = WarmupCosine(w_opt, total_steps=config.epochs * steps)
    start = 0
    if resume:
        start = _restore(ckpt_path, device, shape_full, config, net, w_opt, a_opt, w_sched)
    out.mkdir(parents=True, exist_ok=True)
    drop_records(metrics_path, ("derive",))  # written again at the end
    drop_records(metrics_path, ("search",), start)  # a resume redoes epochs after `start`
    loop = SearchLoop(net, data, config, train_idx, valid_idx, w_opt, a_opt, w_sched,
                 count_flops(shape_full), steps)
    for epoch in range(start, config.epochs):
        record = search_epoch(loop, epoch, quiet)
        append_jsonl(metrics_path, record)
        save_checkpoint(ckpt_path, {
            "format": _FORMAT, "epoch": epoch + 1, "config": to_dict(config),
            "shape_full": shape_full.to_dict(), "supernet": net.state_dict(),
            "w_optimizer": w_opt.state_dict(), "a_optimizer": a_opt.state_dict(),
            "w_scheduler": w_sched.state_dict(), "rng": rng_state(),
            "teacher": teacher_state is not None,
        })
        if not quiet:
            tqdm.write(
                f"search epoch {epoch + 1}/{config.epochs}: tau {record['tau']:.2f}  "
                f"train acc {record['train_acc']:.3f}  valid acc {record['valid_acc']:.3f}  "
                f"FLOPs {record['flops_ratio']:.3f} (expected {record['expected_ratio']:.3f}, "
                f"target {config.flops_ratio})  {record['images_per_s']:.0f} img/s",
                file=sys.stderr)
    return _finish(net, shape_full, config, out, metrics_path)


def _finish(net: SuperNet, shape_full: Shape, config: SearchConfig, out: Path,
            metrics_path: Path) -> SearchResult:
    """Derive the argmax shape, write shape.json and the "derive" metrics line."""
    shape = net.derive()
    shape.save(out / SHAPE)
    full = count_flops(shape_full)
    result = SearchResult(
        shape=shape, flops=count_flops(shape), params=count_params(shape), full_flops=full,
        target_flops=config.flops_ratio * full, tolerance_flops=config.tolerance * full,
        epochs=config.epochs, out_dir=out,
        history=[r for r in read_jsonl(metrics_path) if r.get("phase") == "search"],
    )
    append_jsonl(metrics_path, {
        "phase": "derive", "epoch": config.epochs, "flops": result.flops,
        "params": result.params, "full_flops": full, "full_params": count_params(shape_full),
        "target_flops": result.target_flops, "flops_ratio": result.flops / full,
        "target_ratio": config.flops_ratio, "tolerance": config.tolerance,
        "in_band": result.in_band, "blocks": list(shape.blocks),
    })
    return result


def _restore(path: Path, device: torch.device, shape_full: Shape, config: SearchConfig,
             net: SuperNet, w_opt: torch.optim.Optimizer, a_opt: torch.optim.Optimizer,
             w_sched: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Load search.pt into the fresh objects; return the number of finished epochs."""
    state = load_checkpoint(path, map_location=device)
    if state.get("format") != _FORMAT:
        raise CheckpointError(f"{path}: not a tasprune search checkpoint")
    saved_shape = Shape.from_dict(state["shape_full"])
    if saved_shape != shape_full:
        raise ValueError(f"{path} searched {saved_shape.describe()} with "
                         f"{saved_shape.num_classes} classes, not {shape_full.describe()} with "
                         f"{shape_full.num_classes}; resume with the same model and data")
    saved = from_dict(SearchConfig, state["config"])
    diff = [f"{k} (saved {getattr(saved, k)!r}, now {getattr(config, k)!r})"
            for k in to_dict(config) if k != "device" and getattr(saved, k) != getattr(config, k)]
    if diff:
        raise ValueError(f"{path} was written with other search settings: {'; '.join(diff)}; "
                         f"resume with the same settings or start a new output directory")
    net.load_state_dict(state["supernet"])
    w_opt.load_state_dict(state["w_optimizer"])
    a_opt.load_state_dict(state["a_optimizer"])
    w_sched.load_state_dict(state["w_scheduler"])
    set_rng_state(state["rng"])
    return int(state["epoch"])

