"""The search loop around `tasprune.tas.step.search_step`: epochs of alternating weight and
architecture steps, logging, checkpoints and resume, torchrun ranks, and the public
`search()`, which derives the shape at the end (`tasprune.tas.derive`). docs/runs.md
describes resume, checkpoints, faults and distributed searches; docs/search.md the
algorithm.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from tasprune._io import read_jsonl
from tasprune.checkpoint import rng_state, set_rng_state
from tasprune.config import from_dict, to_dict
from tasprune.data.source import DataBundle, per_class_split
from tasprune.device import resolve_amp
from tasprune.dist import Dist, per_rank_batch
from tasprune.export import SHAPE_FILE, Teacher, resolve_network
from tasprune.faults import Interrupted, StopRequest
from tasprune.models.shape import Shape
from tasprune.net.importance import reorder, taylor_scores
from tasprune.net.plan import LayerPlan, PlanShape
from tasprune.phase import (
    METRICS_FILE,
    SEARCH_CHECKPOINT,
    Run,
    agree,
    gather,
    on_main,
    process_group,
    rank_max_diff,
    stream,
)
from tasprune.progress import progress
from tasprune.settings import SearchConfig
from tasprune.tas.budgets import build_budgets, check_budget, space_of
from tasprune.tas.cost import (
    Budget,
    band_floor,
    expected_cost,
    flops_budget,
    normalized_cost,
    supernet_expected_flops,
)
from tasprune.tas.derive import derive_in_band
from tasprune.tas.health import Health, accuracy
from tasprune.tas.sampling import mean_entropy, tau_at
from tasprune.tas.step import STATS, StepOut, search_step
from tasprune.tas.supernet import SuperNet
from tasprune.training.optim import WarmupCosine, make_sgd

_KIND = "tasprune.search/2"  # /2: the in-place KD search (1 had no suffix)


@dataclass(frozen=True)
class SearchResult:
    """The derived shape and its cost next to the target (FLOPs as multiply-accumulates)."""

    shape: PlanShape
    flops: int
    params: int
    full_flops: int
    target_flops: float
    tolerance_flops: float
    epochs: int
    out_dir: Path
    adjusted: bool = False  # the argmax shape was moved (into the band, or to use the budget)
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
        return cls(step=0, lr=lr, gumbel=stream(config.seed, "search.gumbel", epoch,
                                                device=device),
                   train_aug=stream(config.seed, "search.train_augment", epoch, dist.rank),
                   valid_aug=stream(config.seed, "search.valid_augment", epoch, dist.rank),
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
        # NCCL gathers on the GPU, gloo on the CPU
        augment = torch.stack(gather(augment.to(self.sums.device), dist))
        return {"step": self.step, "lr": self.lr, "moves": list(self.moves),
                "totals": torch.tensor(self.totals(dist), dtype=torch.float64),
                "gumbel": self.gumbel.get_state(), "gumbel_device": self.gumbel.device.type,
                "augment": augment, "world_size": dist.world_size}

    @classmethod
    def restore(cls, saved: Mapping[str, Any], config: SearchConfig, epoch: int, run: Run,
                path: Path) -> _EpochRun:
        """Continue the epoch a mid-epoch checkpoint stopped in (this rank's share of it)."""
        dist, device = run.dist, run.device
        run.check_world_size(saved["world_size"], epoch + 1, path)
        if saved["gumbel_device"] != device.type:
            raise ValueError(f"{path} was written in the middle of epoch {epoch + 1} on "
                             f"{saved['gumbel_device']}, whose random numbers cannot be "
                             f"continued on {device.type}; resume with --device "
                             f"{saved['gumbel_device']}")
        state = cls.start(config, epoch, dist, device, float(saved["lr"]))
        # clones: Generator.set_state ignores a view's storage offset (crashes on [r, 1])
        state.gumbel.set_state(saved["gumbel"].cpu().clone())
        state.train_aug.set_state(saved["augment"][dist.rank, 0].clone())
        state.valid_aug.set_state(saved["augment"][dist.rank, 1].clone())
        if dist.is_main:  # the other ranks start from 0: the epoch end sums over ranks
            state.sums = saved["totals"].to(device=device, dtype=torch.float64).clone()
        state.step, state.moves = int(saved["step"]), [int(m) for m in saved["moves"]]
        return state


@dataclass
class SearchLoop:
    """What every epoch of one search uses: model, data, optimisers, where checkpoints go
    (`run`: the run directory and the process group) and the stop request (`stop`)."""

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
    run: Run
    shape_full: PlanShape
    budgets: tuple[Budget, ...] = ()
    teacher: bool = False
    teacher_net: nn.Module | None = None  # distilled from in the weight step
    health: Health | None = None
    stop: StopRequest = field(default_factory=lambda: StopRequest(enabled=False))
    resume_at: _EpochRun | None = None  # a mid-epoch checkpoint's epoch, for search_epoch
    stopped: int = 0  # the signal of a stop agreed at the last step of an epoch
    amp: str = "off"  # resolved: "off", "bf16" or "fp16"
    scalers: tuple[torch.amp.GradScaler, ...] = ()  # (weights, architecture) with fp16

    @property
    def dist(self) -> Dist:
        return self.run.dist

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

    def save(self, epoch: int, run: _EpochRun | None = None) -> None:
        """Write search.pt after `epoch` finished epochs (+ `run.step` steps of the next).

        Every rank calls it; rank 0 writes, the others wait until it has."""
        partial = run.state(self.dist) if run is not None else None
        self.run.save({
            "epoch": epoch, "step": run.step if run else 0,
            "epoch_state": partial, "config": to_dict(self.config),
            "shape_full": self.shape_full.to_dict(), "supernet": self.net.state_dict(),
            "w_optimizer": self.w_opt.state_dict(), "a_optimizer": self.a_opt.state_dict(),
            "w_scheduler": self.w_sched.state_dict(), "rng": rng_state(),
            "teacher": self.teacher,
        })

    def interrupted(self, signum: int, where: str) -> Interrupted:
        return Interrupted("search", signum, str(self.run.path), where)


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
        _epoch_batches(data, loop.train_idx, batch,
                       stream(cfg.seed, "search.train_order", epoch), dist, run.step),
        _epoch_batches(data, loop.valid_idx, batch,
                       stream(cfg.seed, "search.valid_order", epoch), dist, run.step),
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
        signum = loop.stop.signum or 0  # asked before the step: agreed after it
        out = search_step(net, (xt, yt.to(device)), (xv, yv.to(device)), loop.w_opt,
                          loop.a_opt, cfg, tau, run.gumbel, loop.budgets or loop.full_flops,
                          teacher=loop.teacher_net, arch_step=loop.is_arch_step(epoch, step),
                          entropy_weight=loop.entropy_weight(epoch, step),
                          argmax_weight=loop.argmax_weight(epoch, step), dist=dist,
                          at=(epoch + 1, step + 1), amp=loop.amp, scalers=loop.scalers)
        signum = int(agree(dist, [signum], device)[0])
        loop.w_sched.step()
        run.add(out)
        if not quiet and step % 20 == 0:
            bar.set_postfix(loss=f"{float(out.stats[0]) / len(yt):.3f}", tau=f"{tau:.2f}",
                            flops=f"{net.derive().count('flops') / loop.full_flops:.3f}")
        if step + 1 == loop.steps:
            loop.stopped = signum  # the epoch end writes the checkpoint
        elif signum:
            loop.save(epoch, run)
            raise loop.interrupted(signum, f"epoch {epoch + 1} step {step + 1} of {loop.steps}")
        elif cfg.checkpoint_every and (epoch * loop.steps + step + 1) % cfg.checkpoint_every == 0:
            loop.save(epoch, run)
    seconds = time.perf_counter() - start
    s = run.totals(dist)
    n_train, n_valid = max(s[2], 1), max(s[5], 1)
    shape = net.derive()
    flops = shape.count("flops")
    expected = float(supernet_expected_flops(net).detach())
    searched = (net.width_logits, net.width_mask)
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
        record["rank_logit_max_diff"] = diff = rank_max_diff(dist, net.arch_parameters())
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


def _reordered(teacher: nn.Module, plan: LayerPlan, data: DataBundle, images: torch.Tensor,
               batch_size: int, dist: Dist) -> nn.Module:
    """The teacher with the channels of every group sorted by Taylor importance on `images`
    (computed on rank 0 and shared, so every rank starts from the same supernet)."""
    device = next(teacher.parameters()).device
    batches = ((data.transform(x.to(device)), y.to(device))
               for x, y in data.train.batches(batch_size, indices=images))
    scores = taylor_scores(teacher, plan, batches)
    if dist.enabled:
        for g in sorted(scores):
            scores[g] = scores[g].to(device)
            dist.broadcast_(scores[g])
    return reorder(teacher, plan, scores)


def search(network: str | nn.Module | Shape, data: DataBundle, config: SearchConfig,
           out_dir: str | Path, teacher: Teacher | None = None, resume: bool = False,
           quiet: bool = False, weights: str | Path | None = None) -> SearchResult:
    """Search a pruned shape of `network` under the budgets of `config` (by default half
    its FLOPs).

    `network`: a registered model name or a FILE.py:FACTORY (built for the data), the
    `Shape` of an unpruned built-in ResNet, or a module (which is also the teacher when
    none is given). `teacher`: the trained
    unpruned network to start from (a module, its state dict or the path of a saved
    model), or `weights`, a state dict file of the network named; without either the
    supernet starts from a fresh initialisation and the weight step has no distillation.
    Writes `out_dir/search.pt` (every epoch, every `checkpoint_every` steps; the one
    before as search.prev.pt), `out_dir/metrics.jsonl` (a "search" line per epoch, a
    "derive" line at the end) and `out_dir/shape.json`.
    `resume`: continue from `out_dir/search.pt` (or search.prev.pt when it is damaged;
    same config, except the runtime settings), or start afresh when there is none.
    Launched by torchrun, the search runs on all its processes (docs/runs.md).
    Raises `NonFiniteLoss` on a NaN/inf loss and `Interrupted` after SIGINT/SIGTERM.
    """
    out = Path(out_dir)
    model, plan, teacher_model = resolve_network(network, data, teacher,
                                                 free=not config.couple_residual,
                                                 seed=config.seed, weights=weights)
    if not plan.searched and not plan.stages:
        raise ValueError(f"{type(model).__name__}: nothing can be pruned (every channel "
                         "group is fixed and no block can be skipped)")
    space = space_of(config, plan)
    shape_full = plan.full()
    if config.flops_ratio is not None:
        check_budget(space, config.flops_ratio)
    resume = Run(out, SEARCH_CHECKPOINT, _KIND, "search").resuming(resume)
    train_idx, valid_idx = per_class_split(data.train.labels, config.split_fraction,
                                           stream(config.seed, "search.split"))
    steps = min(len(train_idx), len(valid_idx)) // config.batch_size
    if steps == 0:
        raise ValueError(
            f"batch size {config.batch_size} is larger than the halves of the training set "
            f"({len(train_idx)} and {len(valid_idx)} images); use a batch size <= "
            f"{min(len(train_idx), len(valid_idx))}"
        )
    with process_group(config.device) as (dist, device):
        amp = resolve_amp(config.amp, device)
        if amp == "fp16" and device.type != "cuda":
            raise ValueError("search amp fp16 needs a CUDA device; use amp bf16 or off")
        per_rank_batch(config.batch_size, dist)
        run = Run(out, SEARCH_CHECKPOINT, _KIND, "search", dist, device, config.log)
        budgets = build_budgets(config, space, quiet or not dist.is_main, model)
        calibrate = _subset(train_idx, _CALIBRATION_IMAGES,
                            stream(config.seed, "search.calibration"))
        held_out = _subset(valid_idx, config.health_images, stream(config.seed, "search.held_out"))
        health = Health(data, calibrate, held_out, config.batch_size)
        teacher_net = None
        start_from = model
        if teacher_model is not None:
            teacher_net = copy.deepcopy(teacher_model).to(device,
                                                          memory_format=torch.channels_last)
            teacher_net.eval()
            if config.reorder and not resume:
                start_from = _reordered(teacher_net, plan, data, calibrate, config.batch_size,
                                        dist)
            health.teacher_acc = accuracy(teacher_net, data, held_out, config.batch_size,
                                          device)
        net = SuperNet(space, start_from, stream(config.seed, "search.supernet")).to(device)
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
                          shape_full.count("flops"), steps, run, shape_full, budgets,
                          teacher=teacher_model is not None, teacher_net=distil_from,
                          health=health if config.health_images > 0 else None, amp=amp,
                          scalers=tuple(torch.amp.GradScaler(device.type) for _ in range(2))
                          if amp == "fp16" else ())
        start = _restore(loop) if resume else 0
        quiet = quiet or not dist.is_main
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
        run.drop(("derive",))  # written again at the end
        run.drop(("search",), start)  # a resume redoes the epochs after it
        with StopRequest() as loop.stop:
            for epoch in range(start, config.epochs):
                record = search_epoch(loop, epoch, quiet)
                run.log(record, distributions(net))
                loop.save(epoch + 1)
                if not quiet:
                    tqdm.write(_epoch_line(record, config), file=sys.stderr)
                if loop.stopped and epoch + 1 < config.epochs:
                    raise loop.interrupted(loop.stopped, f"the end of epoch {epoch + 1}")
        return _finish(loop)


def distributions(net: SuperNet) -> dict[str, tuple[tuple[int, ...], list[float]]]:
    """Every width slot's and stage depth's distribution: tag -> (choices, probabilities),
    for the trackers' histograms."""
    out = {}
    for kind, logits, mask, values in (
            ("width/group", net.width_logits, net.width_mask, net.space.widths),
            ("depth/stage", net.depth_logits, net.depth_mask, net.space.depths)):
        probs = torch.softmax(logits.detach().masked_fill(~mask, float("-inf")), -1)
        for i, choices in enumerate(values):
            out[f"{kind}{i:02d}"] = (choices, probs[i, :len(choices)].tolist())
    return out


def _budget_fields(budgets: Sequence[Budget], net: SuperNet, shape: PlanShape
                   ) -> dict[str, float]:
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


def _finish(loop: SearchLoop) -> SearchResult:
    """Derive the shape (the argmax, moved into the FLOP band when it is outside), write
    shape.json and the "derive" metrics line (rank 0)."""
    net, config, shape_full, dist = loop.net, loop.config, loop.shape_full, loop.dist
    budgets = loop.budgets or (flops_budget(shape_full, config.flops_ratio or 1.0),)
    only_flops = [b.name for b in budgets] == ["flops"]
    floor = band_floor(budgets, config.tolerance)
    derived = derive_in_band(
        net.space, net.width_logits, net.depth_logits, net.width_mask, net.depth_mask,
        budgets[0].ratio, config.tolerance, fill=config.fill,
        cost=None if only_flops else (normalized_cost(budgets), 1.0, floor))
    shape = derived.shape
    full = loop.full_flops
    ratio = 1.0 if config.flops_ratio is None else config.flops_ratio
    result = SearchResult(
        shape=shape, flops=derived.flops, params=shape.count("params"), full_flops=full,
        target_flops=ratio * full, tolerance_flops=config.tolerance * full,
        epochs=config.epochs, out_dir=loop.run.out, adjusted=derived.adjusted,
        argmax_flops=derived.argmax_flops,
        history=[r for r in read_jsonl(loop.run.out / METRICS_FILE)
                 if r.get("phase") == "search"],
        budgets={b.name: (b.fraction(shape), b.ratio) for b in budgets},
        band_floor=floor,
    )

    def write() -> None:
        shape.save(loop.run.out / SHAPE_FILE)
        record = {
            "phase": "derive", "epoch": config.epochs, "flops": result.flops,
            "params": result.params, "full_flops": full,
            "full_params": shape_full.count("params"), "target_flops": result.target_flops,
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
        loop.run.log(record)

    on_main(dist, loop.run.device, write)
    return result


def _restore(loop: SearchLoop) -> int:
    """Load search.pt (or search.prev.pt when it is damaged) into the fresh objects of
    `loop`; return the number of finished epochs (and set `loop.resume_at` when the
    checkpoint was written mid-epoch)."""
    state, used = loop.run.load()
    if state["shape_full"] != loop.shape_full.to_dict():
        raise ValueError(f"{used} searched another network (or the same for other data); "
                         "resume with the same model and data, or choose another output "
                         "directory")
    # a search saved before couple_residual existed searched the free space
    saved = from_dict(SearchConfig, {"couple_residual": False, **state["config"]})
    loop.run.check_settings(to_dict(saved), loop.config, used)
    loop.net.load_state_dict(state["supernet"])
    loop.w_opt.load_state_dict(state["w_optimizer"])
    loop.a_opt.load_state_dict(state["a_optimizer"])
    loop.w_sched.load_state_dict(state["w_scheduler"])
    set_rng_state(state["rng"])
    epoch = int(state["epoch"])
    if state.get("epoch_state") is not None:
        loop.resume_at = _EpochRun.restore(state["epoch_state"], loop.config, epoch, loop.run,
                                           used)
    return epoch
