"""Train a network of a given Shape, optionally with KD from a teacher, into a run directory.

`train(shape, data, config, out_dir)` writes:

* `train.pt`     resumable checkpoint after every epoch (model, optimiser,
                 scheduler, loss scaler, epoch, best accuracy, RNG states, config),
                 written atomically;
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
(seed, epoch), so resuming from `train.pt` replays the remaining epochs exactly
as an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from tasprune._io import append_jsonl, drop_records, read_jsonl
from tasprune.config import save_config, to_dict
from tasprune.data.source import DataBundle
from tasprune.export import SHAPE_FILE, save_pruned
from tasprune.flops import count_flops, count_params
from tasprune.models import ResNet, build_model
from tasprune.shape import Shape
from tasprune.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_state_checked,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tasprune.train.distill import DistillConfig
from tasprune.train.inherit import inherit_weights
from tasprune.train.loop import LoopOptions, evaluate, steps_per_epoch, train_one_epoch
from tasprune.train.optim import WarmupCosine, check_sgd_settings, make_sgd

CHECKPOINT_FILE = "train.pt"
BEST_FILE = "best.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "train_config.yaml"
_CHECKPOINT_KIND = "tasprune.train"
# settings that may change when resuming (they do not change what is computed on CPU)
_RESUME_MAY_CHANGE = frozenset({"quiet", "device", "amp", "eval_every"})
_AMP_CHOICES = ("auto", "off", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """How to train a shape. Defaults follow the TAS recipe (SGD 0.1 Nesterov, wd 5e-4,
    warm-up then cosine, KD alpha 0.9 T 4), with the warm-up shortened for short runs.

    warmup_epochs: None = 5 epochs (TAS), capped at 10% of the run.
    decay_norm_and_bias: apply weight decay to BN parameters and biases too (off by default).
    device: "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:N".
    amp: "auto" (bf16 on CUDA where supported, else fp16; off on CPU), "off", "bf16", "fp16".
    eval_every: evaluate on the test split every N epochs (and always after the last).
    """

    epochs: int
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = False
    warmup_epochs: float | None = None
    label_smoothing: float = 0.0
    kd_alpha: float = 0.9
    kd_temperature: float = 4.0
    inherit: bool = False
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    eval_every: int = 1
    quiet: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.warmup_epochs is not None and not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warm-up ({self.warmup_epochs} epochs) must be >= 0 and shorter "
                             f"than the run ({self.epochs} epochs)")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.amp not in _AMP_CHOICES:
            raise ValueError(f"amp must be one of {_AMP_CHOICES}, got {self.amp!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device {self.device!r} is not a torch device; use 'auto', "
                                 "'cpu', 'cuda' or 'cuda:N'") from None
        self.distill_config()  # validates alpha, temperature, label smoothing
        check_sgd_settings(self.lr, self.momentum, self.nesterov, self.weight_decay)

    def distill_config(self) -> DistillConfig:
        return DistillConfig(alpha=self.kd_alpha, temperature=self.kd_temperature,
                             label_smoothing=self.label_smoothing)

    def warmup(self) -> float:
        """Warm-up epochs actually used."""
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return min(5.0, 0.1 * self.epochs)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


@dataclass
class TrainResult:
    """The trained model, the last epoch's metrics record and the run directory."""

    model: ResNet
    metrics: dict[str, Any]
    out_dir: Path


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; a CUDA device that is absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine; "
                         "use --device cpu")
    return device


def resolve_amp(amp: str, device: torch.device) -> str:
    if amp != "auto":
        return amp
    if device.type != "cuda":
        return "off"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's batch order and augmentation (same seed -> same epoch)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)


def check_fits_data(shape: Shape, data: DataBundle, what: str) -> None:
    """Classes and input channels of a network must be the dataset's."""
    if shape.num_classes != data.num_classes or shape.in_channels != data.in_channels:
        raise ValueError(
            f"the {what} has {shape.num_classes} classes and {shape.in_channels} input channels "
            f"but the data {data.name!r} has {data.num_classes} classes and {data.in_channels} "
            f"channels; use the data the network was made for, or a shape built for this data "
            f"(shape.replace(num_classes={data.num_classes}, in_channels={data.in_channels}))"
        )


def _log(config: TrainConfig, message: str) -> None:
    if not config.quiet:
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

    With `resume`, continue from `out_dir/train.pt` if it exists (the settings
    must match the checkpoint's, except quiet/device/amp/eval_every); without it,
    an existing `train.pt` is an error rather than being overwritten.
    """
    out = Path(out_dir)
    ckpt_path = out / CHECKPOINT_FILE
    check_fits_data(shape, data, "shape")
    if teacher is not None:
        check_fits_data(teacher.shape, data, "teacher")
    if config.inherit and teacher is None:
        raise ValueError("weight inheritance (--inherit) needs a teacher (--teacher)")
    if ckpt_path.exists() and not resume:
        raise ValueError(f"{out} already holds a training run ({CHECKPOINT_FILE}); pass "
                         "--resume to continue it, or choose another output directory")
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    options = LoopOptions(batch_size=config.batch_size, device=device,
                          amp=resolve_amp(config.amp, device),
                          channels_last=True, quiet=config.quiet)
    memory_format = torch.channels_last if options.channels_last else torch.preserve_format

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = inherit_weights(shape, teacher.cpu()) if config.inherit else build_model(shape)
    model = model.to(device, memory_format=memory_format)
    if teacher is not None:
        teacher = teacher.to(device, memory_format=memory_format).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    steps = steps_per_epoch(len(data.train), config.batch_size)
    optimizer = make_sgd(model, config.lr, config.momentum, config.nesterov,
                         config.weight_decay, config.decay_norm_and_bias)
    scheduler = WarmupCosine(optimizer, total_steps=config.epochs * steps,
                             warmup_steps=round(config.warmup() * steps))
    scaler = torch.amp.GradScaler(device.type) if options.amp == "fp16" else None

    start_epoch, best = 0, {"test_acc": -1.0, "epoch": 0}
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=device)
        _check_resumable(state, ckpt_path, shape, config, teacher, _data_id(data))
        load_state_checked(model, state["model"], str(ckpt_path))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start_epoch, best = int(state["epoch"]), dict(state["best"])
        drop_records(out / METRICS_FILE, ("train",), start_epoch)
        _log(config, f"resuming {out} after epoch {start_epoch}/{config.epochs}")
    else:
        drop_records(out / METRICS_FILE, ("train", "teacher"))
        shape.save(out / SHAPE_FILE)
        save_config(config, out / CONFIG_FILE)
        if teacher is not None:
            teacher_eval = evaluate(teacher, data.test, data.transform,
                                    dataclasses.replace(options, desc="teacher"))
            append_jsonl(out / METRICS_FILE, {"phase": "teacher", "epoch": 0,
                                              "test_loss": teacher_eval["loss"],
                                              "test_acc": teacher_eval["acc"],
                                              "test_top5": teacher_eval["top5"]})

    record: dict[str, Any] = {}
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        stats = train_one_epoch(
            model, data.train, data.transform, optimizer, epoch_generator(config.seed, epoch),
            dataclasses.replace(options, desc=f"epoch {epoch + 1}/{config.epochs}"),
            loss_config=config.distill_config(), scheduler=scheduler,
            teacher=teacher if config.kd_alpha > 0 else None, scaler=scaler)
        record = {"phase": "train", "epoch": epoch + 1, **stats}
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            test = evaluate(model, data.test, data.transform,
                            dataclasses.replace(options, desc="test"))
            record.update(test_loss=test["loss"], test_acc=test["acc"], test_top5=test["top5"])
        record["time_s"] = time.perf_counter() - started
        append_jsonl(out / METRICS_FILE, record)
        if record.get("test_acc", -1.0) > best["test_acc"]:
            best = {"test_acc": record["test_acc"], "epoch": epoch + 1}
            save_checkpoint(out / BEST_FILE, {"kind": "tasprune.best", "model": _cpu_state(model),
                                              "shape": shape.to_dict(), **best})
        save_checkpoint(ckpt_path, {
            "kind": _CHECKPOINT_KIND, "epoch": epoch + 1, "model": _cpu_state(model),
            "shape": shape.to_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "config": config.to_dict(), "best": best, "rng": rng_state(),
            "teacher_shape": teacher.shape.to_dict() if teacher is not None else None,
            "data": _data_id(data),
        })
        _log(config, _summary(record, config.epochs))

    model = model.to(memory_format=torch.contiguous_format)
    save_pruned(out, model)
    if not record:  # resumed a finished run: report its last epoch
        record = next((r for r in reversed(read_jsonl(out / METRICS_FILE))
                       if r.get("phase") == "train"), {})
    record = {**record, "best_test_acc": best["test_acc"], "best_epoch": best["epoch"],
              "flops": count_flops(shape), "params": count_params(shape)}
    return TrainResult(model=model, metrics=record, out_dir=out)


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
