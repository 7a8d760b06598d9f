"""Train a network of a given Shape, optionally with KD from a teacher, into a run directory.

`train(shape, data, config, out_dir)` writes:

* `train.pt`     resumable checkpoint after every epoch and, with `checkpoint_every`,
                 every N optimiser steps (model, optimiser, scheduler, loss scaler,
                 epoch, step, the epoch's progress, best accuracy, RNG states,
                 config), written atomically; the one it replaces is kept as
                 `train.prev.pt`, which a resume falls back to when `train.pt` is damaged;
* `metrics.jsonl` one line per epoch (phase "train": train loss parts, accuracy,
                 lr, images/s, and the test split's loss and accuracy), plus one
                 phase "teacher" line with the teacher's test accuracy when distilling;
* `best.pt`      the weights of the epoch with the best test accuracy (for
                 inspection; the deliverable is the final weights, so the test
                 split is never used to pick a model);
* `model.safetensors` + `shape.json`  the final model (see `tasprune.export`);
* `train_config.yaml` the resolved configuration.

With `kd_alpha=0` the teacher only serves weight inheritance (and the "teacher"
metrics line): its forward pass is skipped, and the loss is the plain cross-entropy.

Every epoch draws its batch order and augmentation from a generator seeded by
(seed, epoch), so resuming from `train.pt`, at an epoch end or in the middle of an
epoch, replays the rest exactly as an uninterrupted run would (on CPU, bit for bit).

Faults: a NaN or infinite loss stops the run before the optimiser step
(`NonFiniteLoss`, nothing written after the last good checkpoint); SIGINT/SIGTERM
stop it after the current step with a checkpoint (`Interrupted`).

Under torchrun (`torchrun --nproc_per_node W -m tasprune train ...`) the model is
wrapped in DistributedDataParallel; every rank draws the same batch order and trains
on its `Dist.shard` with batch_size / W images per step; rank 0 draws its
augmentation as a single process does, rank r > 0 from a generator seeded by
(seed, epoch, r). Training metrics are summed over ranks, the test split is split
between ranks (each image evaluated once), and BatchNorm running statistics are
taken from rank 0 at every epoch end. Rank 0 alone writes files and shows progress;
the epoch records also hold `world_size` and `rank_param_max_diff` (the largest
difference of any parameter from rank 0's, 0 when the ranks agree). A mid-epoch
checkpoint resumes with the same number of processes; an epoch-end one with any.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from tasprune._io import drop_records, read_jsonl
from tasprune.config import save_config
from tasprune.data.source import DataBundle
from tasprune.device import check_fits_data, resolve_amp, resolve_device
from tasprune.dist import (
    Dist,
    init_from_env,
    launched_by_torchrun,
    leave_process_group,
    per_rank_batch,
)
from tasprune.export import SHAPE_FILE, save_pruned
from tasprune.faults import Interrupted, StopRequest
from tasprune.flops import count_flops, count_params
from tasprune.models import ResNet, build_model
from tasprune.settings import TrainConfig
from tasprune.shape import Shape
from tasprune.tracking import log_record
from tasprune.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_latest,
    load_state_checked,
    previous_path,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tasprune.training.inherit import inherit_weights
from tasprune.training.loop import (
    EpochControl,
    EpochProgress,
    LoopOptions,
    evaluate,
    steps_per_epoch,
    train_one_epoch,
)
from tasprune.training.optim import WarmupCosine, make_sgd

CHECKPOINT_FILE = "train.pt"
BEST_FILE = "best.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "train_config.yaml"
_CHECKPOINT_KIND = "tasprune.train"
# settings that may change when resuming (they do not change what is computed on CPU)
_RESUME_MAY_CHANGE = frozenset({"quiet", "device", "amp", "compile", "eval_every",
                                "checkpoint_every", "log"})



@dataclass
class TrainResult:
    """The trained model, the last epoch's metrics record and the run directory (and this
    process's rank under torchrun: every rank returns the same metrics)."""

    model: ResNet
    metrics: dict[str, Any]
    out_dir: Path
    rank: int = 0


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's batch order and augmentation (same seed -> same epoch)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)


def _log(config: TrainConfig, dist: Dist, message: str) -> None:
    if not config.quiet and dist.is_main:
        tqdm.write(message, file=sys.stderr)


def train(
    shape: Shape,
    data: DataBundle,
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    teacher: ResNet | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train `shape` on `data` (KD from `teacher` when given) into `out_dir`; see module doc.

    With `resume`, continue from `out_dir/train.pt` (or, when that is damaged, the
    `train.prev.pt` kept beside it) if there is one; the settings must match the
    checkpoint's, except quiet/device/amp/eval_every/checkpoint_every. Without it, an
    existing checkpoint is an error rather than being overwritten. Launched by torchrun,
    this joins the process group (and leaves it at the end if it joined it here).
    """
    out = Path(out_dir)
    ckpt_path = out / CHECKPOINT_FILE
    check_fits_data(shape, data, "shape")
    if teacher is not None:
        check_fits_data(teacher.shape, data, "teacher")
    if config.inherit and teacher is None:
        raise ValueError("weight inheritance (--inherit) needs a teacher (--teacher)")
    has_checkpoint = ckpt_path.exists() or previous_path(ckpt_path).exists()
    if has_checkpoint and not resume:
        raise ValueError(f"{out} already holds a training run ({CHECKPOINT_FILE}); pass "
                         "--resume to continue it, or choose another output directory")
    device = resolve_device(config.device)
    joined = launched_by_torchrun() and not torch_dist.is_initialized()
    dist = init_from_env(device.type)
    try:
        if dist.enabled and device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
        return _train(shape, data, config, out, teacher, resume and has_checkpoint, device, dist)
    finally:
        if joined and torch_dist.is_initialized():
            leave_process_group()


def _train(shape: Shape, data: DataBundle, config: TrainConfig, out: Path,
           teacher: ResNet | None, resume: bool, device: torch.device, dist: Dist
           ) -> TrainResult:
    ckpt_path = out / CHECKPOINT_FILE
    options = LoopOptions(batch_size=per_rank_batch(config.batch_size, dist), device=device,
                          amp=resolve_amp(config.amp, device), channels_last=True,
                          quiet=config.quiet or not dist.is_main)
    memory_format = torch.channels_last if options.channels_last else torch.preserve_format
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = inherit_weights(shape, teacher.cpu()) if config.inherit else build_model(shape)
    model = model.to(device, memory_format=memory_format)
    if teacher is not None:
        teacher = teacher.to(device, memory_format=memory_format).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    # every rank runs the same number of steps (dist.shard drops len % world_size images)
    steps = steps_per_epoch(len(data.train) // dist.world_size, options.batch_size)
    optimizer = make_sgd(model, config.lr, config.momentum, config.nesterov,
                         config.weight_decay, config.decay_norm_and_bias)
    scheduler = WarmupCosine(optimizer, total_steps=config.epochs * steps,
                             warmup_steps=round(config.warmup() * steps))
    scaler = torch.amp.GradScaler(device.type) if options.amp == "fp16" else None

    def checkpoint(epoch: int, progress: EpochProgress | None) -> dict[str, Any]:
        return {
            "kind": _CHECKPOINT_KIND, "epoch": epoch,
            "step": progress.step if progress is not None else 0,
            "progress": progress.to_state() if progress is not None else None,
            "model": _cpu_state(model), "shape": shape.to_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "config": config.to_dict(), "best": best, "rng": rng_state(),
            "teacher_shape": teacher.shape.to_dict() if teacher is not None else None,
            "data": _data_id(data),
        }

    start_epoch, best = 0, {"test_acc": -1.0, "epoch": 0}
    progress: EpochProgress | None = None
    if resume:
        state, used = _load_for_resume(ckpt_path, dist, device)
        _check_resumable(state, used, shape, config, teacher, _data_id(data))
        load_state_checked(model, state["model"], str(used))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start_epoch, best = int(state["epoch"]), dict(state["best"])
        if state.get("progress") is not None:
            progress = EpochProgress.from_state(state["progress"])
            if len(progress.generators) != dist.world_size:
                raise CheckpointError(
                    f"{used}: written in the middle of an epoch by {len(progress.generators)} "
                    f"process(es), resumed with {dist.world_size}; resume with "
                    f"{len(progress.generators)}")
        if dist.is_main:
            drop_records(out / METRICS_FILE, ("train",), start_epoch)
        where = f" step {progress.step}/{steps}" if progress is not None else ""
        _log(config, dist, f"resuming {out} after epoch {start_epoch}/{config.epochs}{where}")
    else:
        if dist.is_main:
            drop_records(out / METRICS_FILE, ("train", "teacher"))
            shape.save(out / SHAPE_FILE)
            save_config(config, out / CONFIG_FILE)
        if teacher is not None:
            teacher_eval = evaluate(teacher, data.test, data.transform,
                                    dataclasses.replace(options, desc="teacher"), dist=dist)
            if dist.is_main:
                log_record(out / METRICS_FILE, {"phase": "teacher", "epoch": 0,
                                                "test_loss": teacher_eval["loss"],
                                                "test_acc": teacher_eval["acc"],
                                                "test_top5": teacher_eval["top5"]}, config.log)

    def save_mid_epoch(epoch: int, progress: EpochProgress) -> str:
        _on_main(dist, device, lambda: save_checkpoint(ckpt_path, checkpoint(epoch, progress),
                                                       keep_previous=True))
        return str(ckpt_path)

    net: nn.Module = model
    if dist.enabled:
        net = DistributedDataParallel(model, device_ids=[device.index]
                                      if device.type == "cuda" else None)
    if config.compile:
        net = torch.compile(net)
    record: dict[str, Any] = {}
    with StopRequest() as stop:
        for epoch in range(start_epoch, config.epochs):
            started = time.perf_counter()
            control = EpochControl(
                epoch=epoch + 1, dist=dist, stop=stop,
                augment=augment_generator(config.seed, epoch, dist.rank),
                checkpoint_every=config.checkpoint_every, steps_before=epoch * steps,
                save=functools.partial(save_mid_epoch, epoch),
                resume=progress if epoch == start_epoch else None)
            stats = train_one_epoch(
                net, data.train, data.transform, optimizer, epoch_generator(config.seed, epoch),
                dataclasses.replace(options, desc=f"epoch {epoch + 1}/{config.epochs}"),
                loss_config=config.distill_config(), scheduler=scheduler,
                teacher=teacher if config.kd_alpha > 0 else None, scaler=scaler, control=control)
            record = {"phase": "train", "epoch": epoch + 1, **stats}
            if dist.enabled:
                _broadcast_buffers(model, dist)  # all ranks evaluate and save rank 0's BN stats
                record.update(world_size=dist.world_size,
                              rank_param_max_diff=_rank_param_max_diff(model, dist))
            if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
                test = evaluate(model, data.test, data.transform,
                                dataclasses.replace(options, desc="test"), dist=dist)
                record.update(test_loss=test["loss"], test_acc=test["acc"],
                              test_top5=test["top5"])
            record["time_s"] = time.perf_counter() - started
            improved = record.get("test_acc", -1.0) > best["test_acc"]
            if improved:
                best = {"test_acc": record["test_acc"], "epoch": epoch + 1}

            def write_epoch() -> None:
                log_record(out / METRICS_FILE, record, config.log)
                if improved:
                    save_checkpoint(out / BEST_FILE, {"kind": "tasprune.best",
                                                      "model": _cpu_state(model),
                                                      "shape": shape.to_dict(), **best})
                save_checkpoint(ckpt_path, checkpoint(epoch + 1, None), keep_previous=True)

            _on_main(dist, device, write_epoch)
            _log(config, dist, _summary(record, config.epochs))
            if epoch + 1 < config.epochs:  # a stop asked for during evaluation
                signum = _agreed_signal(stop, dist, device)
                if signum:
                    raise Interrupted("train", signum, str(ckpt_path), f"the end of epoch "
                                      f"{epoch + 1}/{config.epochs}")

    model = model.to(memory_format=torch.contiguous_format)
    _on_main(dist, device, lambda: save_pruned(out, model))
    if not record:  # resumed a finished run: report its last epoch
        record = next((r for r in reversed(read_jsonl(out / METRICS_FILE))
                       if r.get("phase") == "train"), {})
    record = {**record, "best_test_acc": best["test_acc"], "best_epoch": best["epoch"],
              "flops": count_flops(shape), "params": count_params(shape)}
    return TrainResult(model=model, metrics=record, out_dir=out, rank=dist.rank)


def augment_generator(seed: int, epoch: int, rank: int) -> torch.Generator | None:
    """The augmentation generator of `rank` in a torchrun run: None for rank 0, which
    draws from the epoch generator after the batch order (exactly as a single process
    does), a generator seeded from (seed, epoch, rank) for the others, so that no two
    ranks draw the same crops and flips."""
    if rank == 0:
        return None
    mixed = np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed))


def _load_for_resume(path: Path, dist: Dist, device: torch.device
                     ) -> tuple[dict[str, Any], Path]:
    """Rank 0 loads the newest readable checkpoint (`load_latest`); the other ranks load
    the same file."""
    error: CheckpointError | None = None
    choice = torch.zeros(1, dtype=torch.int64, device=device)  # 0: path, 1: .prev, 2: none
    if dist.is_main:
        try:
            state, used = load_latest(path, map_location=device)
            choice[0] = 0 if used == path else 1
        except CheckpointError as exc:
            error = exc
            choice[0] = 2
    dist.broadcast_(choice)
    if error is not None:
        raise error
    if int(choice[0]) == 2:
        raise CheckpointError(f"{path}: rank 0 could not read the checkpoint (see its error)")
    if not dist.is_main:
        used = path if int(choice[0]) == 0 else previous_path(path)
        state = load_checkpoint(used, map_location=device)
    return state, used


def _on_main(dist: Dist, device: torch.device, write: Callable[[], None]) -> None:
    """Run `write` on rank 0 only. Every rank returns once it is done (the flag's
    all-reduce is the barrier) and raises when it failed, so none waits forever."""
    error: Exception | None = None
    if dist.is_main:
        try:
            write()
        except Exception as exc:  # re-raised below, after telling the other ranks
            error = exc
    if dist.any(error is not None, device):
        if error is not None:
            raise error
        raise RuntimeError("rank 0 failed to write the run directory (see its error)")


def _agreed_signal(stop: StopRequest, dist: Dist, device: torch.device) -> int:
    """The stop signal caught by any rank (0 for none)."""
    signum = torch.tensor([float(stop.signum or 0)], device=device)
    if dist.enabled:
        torch_dist.all_reduce(signum, op=torch_dist.ReduceOp.MAX)
    return int(signum.item())


def _broadcast_buffers(model: nn.Module, dist: Dist) -> None:
    for buffer in model.buffers():
        dist.broadcast_(buffer.data)


def _rank_param_max_diff(model: nn.Module, dist: Dist) -> float:
    """The largest |parameter - rank 0's parameter| over all ranks (DDP keeps it 0)."""
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    reference = dist.broadcast_(flat.clone())
    diff = (flat - reference).abs().max().reshape(1)
    torch_dist.all_reduce(diff, op=torch_dist.ReduceOp.MAX)
    return float(diff.item())


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


def _check_resumable(state: dict[str, Any], path: Path, shape: Shape, config: TrainConfig,
                     teacher: ResNet | None, data: dict[str, Any]) -> None:
    if state.get("kind") != _CHECKPOINT_KIND:
        raise CheckpointError(f"{path}: not a tasprune training checkpoint")
    if Shape.from_dict(state["shape"]) != shape:
        raise CheckpointError(f"{path}: was written for another shape; resume with the same "
                              "--model/--shape or choose another output directory")
    saved = state["config"]
    diff = [f"{k}={saved.get(k)!r} (now {v!r})" for k, v in config.to_dict().items()
            if k not in _RESUME_MAY_CHANGE and saved.get(k) != v]
    if diff:
        raise CheckpointError(f"{path}: the run was started with other settings: "
                              f"{', '.join(diff)}; resume with the same settings")
    if state.get("data", data) != data:
        raise CheckpointError(f"{path}: the run was started on other data ({state['data']}, now "
                              f"{data}); resume with the same --data")
    saved_teacher = state.get("teacher_shape")
    now_teacher = teacher.shape.to_dict() if teacher is not None else None
    if (saved_teacher is None) != (now_teacher is None) or (
            saved_teacher is not None and saved_teacher != now_teacher):
        had = "with a teacher" if saved_teacher is not None else "without a teacher"
        raise CheckpointError(f"{path}: the run was started {had}; resume with the same "
                              "--teacher")
