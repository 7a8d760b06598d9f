"""Train a network (unpruned, or pruned to a shape), optionally with KD from a teacher, into
a run directory.

`train(target, data, config, out_dir)` writes `train.pt` (resumable, after every epoch and
every `checkpoint_every` steps; the one it replaces kept as `train.prev.pt`),
`metrics.jsonl` (a "train" line per epoch, a "teacher" line when there is a teacher),
`best.pt` (the weights of the best test epoch, for inspection), the final model
`model.safetensors` + `shape.json` (`tasprune.export`) and `train_config.yaml`.
docs/runs.md describes resuming, faults and torchrun runs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from tasprune._io import read_jsonl
from tasprune.checkpoint import (
    CheckpointError,
    load_state_checked,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tasprune.config import save_config
from tasprune.data.source import DataBundle
from tasprune.device import check_fits_data, resolve_amp
from tasprune.dist import per_rank_batch
from tasprune.export import SHAPE_FILE, Teacher, as_teacher, save_pruned, spec_for
from tasprune.faults import Interrupted, StopRequest
from tasprune.models.network import from_view, full_network, instantiate, network_plan
from tasprune.models.shape import Shape
from tasprune.net.importance import inherit
from tasprune.net.plan import PlanShape
from tasprune.net.surgery import carried_shape, mark
from tasprune.phase import (
    BEST_FILE,
    METRICS_FILE,
    TRAIN_CHECKPOINT,
    TRAIN_CONFIG_FILE,
    Run,
    agreed_signal,
    on_main,
    process_group,
    rank_max_diff,
    stream,
)
from tasprune.settings import TrainConfig
from tasprune.training.loop import (
    EpochControl,
    EpochProgress,
    LoopOptions,
    evaluate,
    steps_per_epoch,
    train_one_epoch,
)
from tasprune.training.optim import WarmupCosine, make_sgd

_KIND = "tasprune.train"


@dataclass
class TrainResult:
    """The trained model, the last epoch's metrics record and the run directory (and this
    process's rank under torchrun: every rank returns the same metrics)."""

    model: nn.Module
    metrics: dict[str, Any]
    out_dir: Path
    rank: int = 0


def train(
    target: PlanShape | Shape | str | nn.Module,
    data: DataBundle,
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    teacher: Teacher | None = None,
    resume: bool = False,
    weights: str | os.PathLike[str] | None = None,
) -> TrainResult:
    """Train `target` on `data` (KD from `teacher` when given) into `out_dir`; see module doc.

    `target`: a pruned (or full) `PlanShape` (or a built-in ResNet's `Shape`), built afresh
    (seeded by `config.seed`) or, with `config.inherit`, cut from the teacher's channels of
    largest L1 norm; a
    registered model name or a FILE.py:FACTORY, its unpruned network for the data (from
    `weights`, a state dict file, when given); or a module, trained as it is.
    `teacher`: a module, a state dict of the unpruned network, or the path of a saved
    model. With `resume`, continue from `out_dir/train.pt` (or, when that is damaged, the
    `train.prev.pt` kept beside it) if there is one; the settings must match the
    checkpoint's, except the runtime ones (`settings.runtime_fields`). Without it, an
    existing checkpoint is an error rather than being overwritten. Launched by torchrun,
    this joins the process group (and leaves it at the end if it joined it here).
    """
    out = Path(out_dir)
    model, shape = _target(target, data, config, weights)
    check_fits_data(shape, data, "network")
    teacher_model = as_teacher(teacher, shape.plan.source or spec_for("", data),
                               shape.plan.free)
    if teacher_model is not None:
        check_teacher(teacher_model, shape, data, same=config.inherit or not shape.is_full)
    if config.inherit:
        if teacher_model is None:
            raise ValueError("weight inheritance (--inherit) needs a teacher (--teacher)")
        model = inherit(teacher_model, shape)
        model = mark(model, shape)
    resume = Run(out, TRAIN_CHECKPOINT, _KIND, "training").resuming(resume)
    with process_group(config.device) as (dist, device):
        job = _Training.build(model, shape, data, config, teacher_model,
                              Run(out, TRAIN_CHECKPOINT, _KIND, "training", dist, device,
                                  config.log))
        if resume:
            job.restore()
        else:
            job.start()
        with StopRequest() as stop:
            for epoch in range(job.start_epoch, config.epochs):
                job.write_epoch(*job.epoch(epoch, stop))
                if epoch + 1 < config.epochs:  # a stop asked for during evaluation
                    signum = agreed_signal(stop, dist, device)
                    if signum:
                        raise Interrupted("train", signum, str(job.run.path), f"the end of "
                                          f"epoch {epoch + 1}/{config.epochs}")
        return job.finish()


def _target(target: PlanShape | Shape | str | nn.Module, data: DataBundle,
            config: TrainConfig, weights: str | os.PathLike[str] | None
            ) -> tuple[nn.Module, PlanShape]:
    """The module to train and its shape."""
    if isinstance(target, Shape):  # the view of a built-in ResNet, at the data's size
        target = from_view(target.replace(resolution=data.resolution))
    if isinstance(target, PlanShape):
        if weights is not None:
            raise ValueError("weights start the unpruned network; a pruned shape starts from "
                             "a fresh initialisation or, with inherit, from the teacher")
        return instantiate(target, seed=config.seed), target
    if isinstance(target, str):
        model, plan = full_network(spec_for(target, data), weights=weights, seed=config.seed)
        return model, plan.full()
    shape = carried_shape(target)
    if shape is None:
        shape = network_plan(target, spec_for(target, data)).full()
        mark(target, shape)
    return target, shape


def check_teacher(teacher: nn.Module, shape: PlanShape, data: DataBundle, same: bool) -> None:
    """A teacher is trained on the same data; with `same` (a pruned shape, or weights
    inherited) it is the unpruned network the shape prunes: another one is almost always
    a mixed-up file. An unpruned network may distil from any teacher."""
    own = carried_shape(teacher)
    if own is None:
        return
    src, want = own.source, shape.source
    if same and src is not None and want is not None and src.name and want.name \
            and src.name != want.name:
        raise ValueError(f"the teacher is a {src.name} but the shape prunes a {want.name}; "
                         "give the teacher the shape was pruned from")
    if (own.num_classes, own.in_channels) != (data.num_classes, data.in_channels):
        raise ValueError(f"the teacher has {own.num_classes} classes and {own.in_channels} "
                         f"input channels but the data {data.name!r} has {data.num_classes} "
                         f"and {data.in_channels}; give a teacher trained on this data")


@dataclass
class _Training:
    """One training run's objects, built once; each method is one step of the run."""

    shape: PlanShape
    data: DataBundle
    config: TrainConfig
    teacher: nn.Module | None
    run: Run
    options: LoopOptions
    model: nn.Module
    net: nn.Module  # the model as trained: wrapped by DDP under torchrun, compiled
    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosine
    scaler: torch.amp.GradScaler | None
    steps: int  # per epoch
    start_epoch: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"test_acc": -1.0, "epoch": 0})
    progress: EpochProgress | None = None  # of a mid-epoch checkpoint resumed from
    record: dict[str, Any] = field(default_factory=dict)  # the last epoch's

    @classmethod
    def build(cls, model: nn.Module, shape: PlanShape, data: DataBundle, config: TrainConfig,
              teacher: nn.Module | None, run: Run) -> _Training:
        dist, device = run.dist, run.device
        options = LoopOptions(batch_size=per_rank_batch(config.batch_size, dist), device=device,
                              amp=resolve_amp(config.amp, device), channels_last=True,
                              quiet=config.quiet or not dist.is_main)
        model = model.to(device, memory_format=torch.channels_last)
        if teacher is not None:
            teacher = teacher.to(device, memory_format=torch.channels_last).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        # every rank runs the same number of steps (dist.shard drops len % world_size images)
        steps = steps_per_epoch(len(data.train) // dist.world_size, options.batch_size)
        optimizer = make_sgd(model, config.lr, config.momentum, config.nesterov,
                             config.weight_decay, config.decay_norm_and_bias)
        scheduler = WarmupCosine(optimizer, total_steps=config.epochs * steps,
                                 warmup_steps=round(config.warmup() * steps))
        net: nn.Module = model
        if dist.enabled:
            net = DistributedDataParallel(model, device_ids=[device.index]
                                          if device.type == "cuda" else None)
        if config.compile:
            net = torch.compile(net)
        return cls(shape, data, config, teacher, run, options, model, net, optimizer,
                   scheduler, torch.amp.GradScaler(device.type) if options.amp == "fp16"
                   else None, steps)

    def _say(self, message: str) -> None:
        if not self.options.quiet:
            tqdm.write(message, file=sys.stderr)

    def state(self, epoch: int, progress: EpochProgress | None = None) -> dict[str, Any]:
        """The checkpoint after `epoch` epochs (and `progress` into the next)."""
        return {
            "epoch": epoch, "step": progress.step if progress is not None else 0,
            "progress": progress.to_state() if progress is not None else None,
            "model": _cpu_state(self.model), "shape": self.shape.to_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "config": self.config.to_dict(), "best": self.best, "rng": rng_state(),
            "teacher_shape": _teacher_id(self.teacher),
            "data": _data_id(self.data),
        }

    def start(self) -> None:
        """A fresh run: the run directory's files, and the teacher's "teacher" line."""
        run = self.run
        if run.dist.is_main:
            run.out.mkdir(parents=True, exist_ok=True)
            self.shape.save(run.out / SHAPE_FILE)
            save_config(self.config, run.out / TRAIN_CONFIG_FILE)
        run.drop(("train", "teacher"))
        if self.teacher is not None:
            test = evaluate(self.teacher, self.data.test, self.data.transform,
                            dataclasses.replace(self.options, desc="teacher"), dist=run.dist)
            run.log({"phase": "teacher", "epoch": 0, "test_loss": test["loss"],
                     "test_acc": test["acc"], "test_top5": test["top5"]})

    def restore(self) -> None:
        """Load train.pt (or train.prev.pt) after checking it is this run's."""
        state, used = self.run.load()
        self._check_resumable(state, used)
        load_state_checked(self.model, state["model"], str(used))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.start_epoch, self.best = int(state["epoch"]), dict(state["best"])
        where = ""
        if state.get("progress") is not None:
            self.progress = EpochProgress.from_state(state["progress"])
            self.run.check_world_size(len(self.progress.generators), self.start_epoch + 1,
                                      used)
            where = f" step {self.progress.step}/{self.steps}"
        self.run.drop(("train",), self.start_epoch)
        self._say(f"resuming {self.run.out} after epoch {self.start_epoch}/"
                  f"{self.config.epochs}{where}")

    def _check_resumable(self, state: dict[str, Any], used: Path) -> None:
        if state["shape"] != self.shape.to_dict():
            raise CheckpointError(f"{used}: was written for another shape; resume with the "
                                  "same --model/--shape or choose another output directory")
        self.run.check_settings(state["config"], self.config, used)
        data = _data_id(self.data)
        if state.get("data", data) != data:
            raise CheckpointError(f"{used}: the run was started on other data "
                                  f"({state['data']}, now {data}); resume with the same --data")
        saved = state.get("teacher_shape")
        now = _teacher_id(self.teacher)
        if saved != now:
            had = "with a teacher" if saved is not None else "without a teacher"
            raise CheckpointError(f"{used}: the run was started {had}; resume with the same "
                                  "--teacher")

    def _save_mid_epoch(self, epoch: int, progress: EpochProgress) -> str:
        self.run.save(self.state(epoch, progress))
        return str(self.run.path)

    def epoch(self, epoch: int, stop: StopRequest) -> tuple[dict[str, Any], bool]:
        """Train epoch `epoch` (0-based) and test it when due; its record, and whether its
        test accuracy is the best so far."""
        config, dist, options, data = self.config, self.run.dist, self.options, self.data
        started = time.perf_counter()
        control = EpochControl(
            epoch=epoch + 1, dist=dist, stop=stop,
            augment=None if dist.rank == 0 else stream(config.seed, "train.augment", epoch,
                                                       dist.rank),
            checkpoint_every=config.checkpoint_every, steps_before=epoch * self.steps,
            save=functools.partial(self._save_mid_epoch, epoch),
            resume=self.progress if epoch == self.start_epoch else None)
        stats = train_one_epoch(
            self.net, data.train, data.transform, self.optimizer,
            stream(config.seed, "train.epoch", epoch),
            dataclasses.replace(options, desc=f"epoch {epoch + 1}/{config.epochs}"),
            loss_config=config.distill_config(), scheduler=self.scheduler,
            teacher=self.teacher if config.kd_alpha > 0 else None, scaler=self.scaler,
            control=control)
        record = {"phase": "train", "epoch": epoch + 1, **stats}
        if dist.enabled:
            for buffer in self.model.buffers():  # all ranks evaluate and save rank 0's BN stats
                dist.broadcast_(buffer.data)
            record.update(world_size=dist.world_size,
                          rank_param_max_diff=rank_max_diff(dist, list(self.model.parameters())))
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            test = evaluate(self.model, data.test, data.transform,
                            dataclasses.replace(options, desc="test"), dist=dist)
            record.update(test_loss=test["loss"], test_acc=test["acc"], test_top5=test["top5"])
        record["time_s"] = time.perf_counter() - started
        improved = record.get("test_acc", -1.0) > self.best["test_acc"]
        if improved:
            self.best = {"test_acc": record["test_acc"], "epoch": epoch + 1}
        return record, improved

    def write_epoch(self, record: dict[str, Any], improved: bool) -> None:
        """The epoch's metrics line, best.pt when it improved, and train.pt (rank 0)."""
        self.record = record
        run = self.run

        def write() -> None:
            run.log(record)
            if improved:
                save_checkpoint(run.out / BEST_FILE, {
                    "kind": "tasprune.best", "model": _cpu_state(self.model),
                    "shape": self.shape.to_dict(), **self.best})
            run.write(self.state(record["epoch"]))

        on_main(run.dist, run.device, write)
        self._say(_summary(record, self.config.epochs))

    def finish(self) -> TrainResult:
        """The final model (model.safetensors + shape.json) and the result."""
        model = self.model.to(memory_format=torch.contiguous_format)
        run = self.run
        on_main(run.dist, run.device, lambda: save_pruned(run.out, model, self.shape))
        record = self.record or next(  # resumed a finished run: report its last epoch
            (r for r in reversed(read_jsonl(run.out / METRICS_FILE))
             if r.get("phase") == "train"), {})
        record = {**record, "best_test_acc": self.best["test_acc"],
                  "best_epoch": self.best["epoch"], "flops": self.shape.count("flops"),
                  "params": self.shape.count("params")}
        return TrainResult(model=model, metrics=record, out_dir=run.out, rank=run.dist.rank)


def _teacher_id(teacher: nn.Module | None) -> dict[str, Any] | None:
    """What a checkpoint records of the teacher, to resume with the same one."""
    if teacher is None:
        return None
    shape = carried_shape(teacher)
    return shape.to_dict() if shape is not None else {"module": type(teacher).__name__}


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _summary(record: dict[str, Any], epochs: int) -> str:
    text = (f"epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f} "
            f"train acc {100 * record['acc']:.2f}%")
    if "test_acc" in record:
        text += f" test acc {100 * record['test_acc']:.2f}%"
    return text + f" ({record['images_per_s']:.0f} img/s, {record['time_s']:.0f}s)"


def _data_id(data: DataBundle) -> dict[str, Any]:
    return {"name": data.name, "train": len(data.train), "test": len(data.test),
            "num_classes": data.num_classes}


