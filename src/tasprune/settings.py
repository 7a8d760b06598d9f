"""The settings of the three phases and of the whole job: `SearchConfig`, `TrainConfig`
and `PruneConfig`.

Every field carries its one-line doc (`tasprune.config.doc`), which is also the `--help` of the
flag the command line generates for it (`tasprune.flags`), so the Python API, the
recipes, the `key=value` overrides and the flags share one set of names, defaults and
checks. Each config checks itself when built and names the field that is wrong.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

from tasprune.config import setting, to_dict
from tasprune.device import AMP_CHOICES, parse_device
from tasprune.latency import LatencyConfig
from tasprune.tas.sampling import SCHEDULES
from tasprune.tas.space import DEFAULT_RATIOS
from tasprune.tracking import check_sinks
from tasprune.training.distill import DistillConfig
from tasprune.training.optim import check_sgd_settings

Method = Literal["tas", "uniform", "l1", "random"]
METHODS: tuple[str, ...] = typing.get_args(Method)

MAX_SEED = 2**63  # torch.Generator takes seeds below this


@dataclass(frozen=True)
class SearchConfig:
    """How to search a pruned shape (docs/search.md explains each choice and its default).

    The paper recipes set the paper's procedure (relaxation "gumbel", no KD, no
    reordering, no warm-up, per-epoch tau, the argmax's FLOP loss, no entropy term, no
    fill); the defaults add what lets a short search learn. Device, amp, compile,
    checkpoint_every and log may change when a search is resumed; nothing else may.
    """

    flops_ratio: float | None = setting(0.5, "FLOP budget: target FLOPs as a fraction of the "
                                        "unpruned network's, in (0, 1] (null: no FLOP budget)")
    params_ratio: float | None = setting(None, "parameter budget, a fraction of the unpruned "
                                         "network's parameter count (null: none)")
    latency_ratio: float | None = setting(None, "latency budget, a fraction of the unpruned "
                                          "network's latency at every latency batch size, "
                                          "priced by a measured per-layer table (null: none)")
    latency_batch_sizes: tuple[int, ...] = setting((1, 64), "batch sizes the latency budget "
                                                   "holds at")
    latency_threads: int = setting(0, "CPU threads the latency table is timed with (0: "
                                   "torch's count)")
    latency_device: str = setting("cpu", "device the latency table is timed on: cpu, cuda "
                                  "or cuda:N")
    epochs: int = setting(600, "search epochs")
    batch_size: int = setting(256, "images of each half per step (the global batch)")
    lr: float = setting(0.03, "peak learning rate of the weights (SGD, warm-up then cosine)")
    momentum: float = setting(0.9, "SGD momentum of the weights")
    nesterov: bool = setting(True, "Nesterov momentum for the weights")
    weight_decay: float = setting(5e-4, "weight decay of the weights (BN included, as TAS)")
    arch_lr: float = setting(0.05, "Adam learning rate of the width and depth logits")
    arch_betas: tuple[float, float] = setting((0.5, 0.999), "Adam betas of the logits")
    arch_weight_decay: float = setting(1e-3, "weight decay of the logits")
    tau_max: float = setting(5.0, "Gumbel-softmax temperature at the start")
    tau_min: float = setting(0.1, "Gumbel-softmax temperature at the end")
    tau_schedule: str = setting("cosine", "how tau falls from tau_max to tau_min: "
                                + ", ".join(SCHEDULES))
    flop_weight: float = setting(2.0, "lambda: weight of the cost loss in the architecture "
                                 "loss")
    tolerance: float = setting(0.05, "width of the zero-loss band below each target, as a "
                               "fraction of the unpruned cost")
    topk: int = setting(2, "width candidates per slot and forward of the paper's relaxation "
                        "(1: a hard sample)")
    width_ratios: tuple[float, ...] = setting(DEFAULT_RATIOS, "width choices of every conv, "
                                              "as fractions of its unpruned width")
    channel_multiple: int = setting(1, "round every width choice to a multiple of N "
                                    "(1: no rounding)")
    couple_residual: bool = setting(True, "one width per residual stream, so no stride-1 "
                                    "projection is added (the paper recipes: false)")
    split_fraction: float = setting(0.5, "share of every class in the weight step's half of "
                                    "the training set")
    seed: int = setting(0, "seed of the split, the batch order, the augmentation and the "
                        "Gumbel noise")
    device: str = setting("auto", "auto (CUDA when present), cpu, cuda or cuda:N", runtime=True)
    checkpoint_every: int = setting(0, "also write search.pt every N steps (0: at epoch "
                                    "ends only)", runtime=True)
    kd_alpha: float = setting(0.9, "weight of distillation from the teacher in the weight "
                              "step, in [0, 1] (0: cross-entropy, as the paper)")
    kd_temperature: float = setting(4.0, "distillation temperature")
    reorder: bool = setting(True, "sort the teacher's channels by importance before the "
                            "search, so the first c channels are its best c")
    weight_warmup: float = setting(0.2, "fraction of the steps that train the weights only, "
                                   "before the first architecture step")
    tau_per: Literal["step", "epoch"] = setting(
        "step", "anneal tau per step (after the warm-up) or per epoch "
                           "(the paper): step or epoch")
    flop_loss: Literal["anneal", "expected", "argmax"] = setting(
        "anneal", "where the cost loss's direction comes from: argmax "
                             "(the paper), expected, or anneal from expected to argmax")
    arch_lr_steps: int = setting(150, "> 0: scale arch_lr by arch_lr_steps / architecture "
                                 "steps, so a short search moves as far as a long one "
                                 "(0: arch_lr as given)")
    relaxation: Literal["expected", "gumbel"] = setting(
        "expected", "expected (one sampled sub-network per weight step, "
                              "the expected network in the architecture step) or gumbel "
                              "(the paper's)")
    entropy_weight: float = setting(1.0, "weight of the distributions' mean entropy in the "
                                    "architecture loss at the last step (rising from 0)")
    health_images: int = setting(2000, "held-out images on which every epoch measures the "
                                 "most probable shape's accuracy (0: off)")
    fill: bool = setting(True, "widen the derived shape while a widening fits the budget "
                         "(false: the argmax, as the paper)")
    amp: Literal["auto", "off", "bf16", "fp16"] = setting(
        "auto", "mixed precision: auto (bf16 or fp16 on CUDA, off on CPU), "
                       "off, bf16 or fp16", runtime=True)
    compile: bool = setting(False, "torch.compile the teacher's forward", runtime=True)
    log: tuple[str, ...] = setting((), "trackers besides metrics.jsonl: csv, tensorboard",
                                   runtime=True)

    def __post_init__(self) -> None:
        def fail(name: str, rule: str) -> None:
            raise ValueError(f"search config {name} = {getattr(self, name)!r}: {rule}")

        for name, what in (("flops_ratio", "FLOPs"), ("params_ratio", "parameters"),
                           ("latency_ratio", "latency")):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not 0 < value <= 1):
                fail(name, f"a budget is a fraction of the unpruned network's {what} in (0, 1],"
                     " e.g. 0.5 for half")
        if not 0 <= self.seed < MAX_SEED:
            fail("seed", "a seed is an integer in [0, 2**63)")
        if self.flops_ratio is None and self.params_ratio is None and self.latency_ratio is None:
            fail("flops_ratio", "give at least one budget: flops_ratio, params_ratio or "
                 "latency_ratio")
        object.__setattr__(self, "latency_batch_sizes",
                           tuple(self.latency_batch_sizes))
        if not self.latency_batch_sizes or not all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 1
                for b in self.latency_batch_sizes):
            fail("latency_batch_sizes", "batch sizes >= 1, e.g. [1, 64]")
        if isinstance(self.latency_threads, bool) or not isinstance(self.latency_threads, int) \
                or self.latency_threads < 0:
            fail("latency_threads", "an integer >= 0 (0: torch's thread count)")
        try:
            parse_device(self.latency_device)
        except ValueError:
            fail("latency_device", "use 'cpu', 'cuda' or 'cuda:N'")
        for name in ("epochs", "batch_size", "topk", "channel_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(name, "must be an integer >= 1")
        for name, rule in (("checkpoint_every", "(0: checkpoint at epoch ends only)"),
                           ("arch_lr_steps", "(0: use arch_lr as given)"),
                           ("health_images", "(0: no accuracy check per epoch)")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                fail(name, f"an integer >= 0 {rule}")
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
        if not 0 <= self.kd_alpha <= 1:
            fail("kd_alpha", "the weight of distillation in the weight step, in [0, 1] "
                 "(0: cross-entropy only, as the paper)")
        if not (math.isfinite(self.kd_temperature) and self.kd_temperature > 0):
            fail("kd_temperature", "a temperature > 0, e.g. 4")
        if not 0 <= self.weight_warmup < 1:
            fail("weight_warmup", "a fraction of the steps in [0, 1) (0: no warm-up)")
        if self.tau_per not in ("step", "epoch"):
            fail("tau_per", "expected step or epoch")
        if self.flop_loss not in ("anneal", "expected", "argmax"):
            fail("flop_loss", "expected 'anneal', 'expected' or 'argmax'")
        if self.relaxation not in ("expected", "gumbel"):
            fail("relaxation", "expected 'expected' or 'gumbel' (the paper's)")
        if not (math.isfinite(self.entropy_weight) and self.entropy_weight >= 0):
            fail("entropy_weight", "must be a number >= 0 (0: no entropy term)")
        if self.nesterov and self.momentum == 0:
            fail("momentum", "Nesterov momentum needs momentum > 0 (or set nesterov false)")
        if self.device != "auto":
            try:
                parse_device(self.device)
            except ValueError:
                fail("device", "use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.amp not in AMP_CHOICES:
            fail("amp", f"expected one of {', '.join(AMP_CHOICES)}")
        object.__setattr__(self, "log", check_sinks(self.log))
        object.__setattr__(self, "width_ratios", tuple(float(r) for r in self.width_ratios))
        object.__setattr__(self, "arch_betas", tuple(float(b) for b in self.arch_betas))




@dataclass(frozen=True)
class TrainConfig:
    """How to train a shape. Defaults follow the TAS recipe (SGD 0.1 Nesterov, wd 5e-4,
    warm-up then cosine, KD alpha 0.9 T 4), with the warm-up shortened for short runs.
    quiet, device, amp, compile, eval_every, checkpoint_every and log may change when a
    run is resumed; nothing else may."""

    epochs: int = setting(dataclasses.MISSING, "training epochs")
    batch_size: int = setting(128, "images per step (the global batch: under torchrun each "
                              "of W processes runs batch_size / W)")
    lr: float = setting(0.1, "peak learning rate (SGD, warm-up then cosine)")
    momentum: float = setting(0.9, "SGD momentum")
    nesterov: bool = setting(True, "Nesterov momentum")
    weight_decay: float = setting(5e-4, "weight decay")
    decay_norm_and_bias: bool = setting(False, "apply weight decay to BN parameters and "
                                        "biases too")
    warmup_epochs: float | None = setting(None, "linear warm-up epochs (null: 5, capped at "
                                          "10% of the run)")
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy")
    kd_alpha: float = setting(0.9, "weight of distillation from the teacher, in [0, 1] "
                              "(0: cross-entropy only)")
    kd_temperature: float = setting(4.0, "distillation temperature")
    inherit: bool = setting(False, "start from the teacher's weights (largest-L1 channels, "
                            "first blocks) instead of from scratch")
    seed: int = setting(0, "seed of the initialisation, batch order and augmentation")
    device: str = setting("auto", "auto (CUDA when present), cpu, cuda or cuda:N", runtime=True)
    amp: Literal["auto", "off", "bf16", "fp16"] = setting(
        "auto", "mixed precision: auto (bf16 or fp16 on CUDA, off on CPU), "
                       "off, bf16 or fp16", runtime=True)
    compile: bool = setting(False, "torch.compile the training steps", runtime=True)
    eval_every: int = setting(1, "evaluate on the test split every N epochs (and after the "
                              "last)", runtime=True)
    checkpoint_every: int = setting(0, "also write train.pt every N optimiser steps (0: at "
                                    "epoch ends only)", runtime=True)
    quiet: bool = setting(False, "no progress display", runtime=True)
    log: tuple[str, ...] = setting((), "trackers besides metrics.jsonl: csv, tensorboard",
                                   runtime=True)

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.warmup_epochs is not None and not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warm-up ({self.warmup_epochs} epochs) must be >= 0 and shorter "
                             f"than the run ({self.epochs} epochs)")
        if not 0 <= self.seed < MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0: only at epoch ends), "
                             f"got {self.checkpoint_every}")
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {AMP_CHOICES}, got {self.amp!r}")
        object.__setattr__(self, "log", check_sinks(self.log))
        if self.device != "auto":
            parse_device(self.device)
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



@dataclass(frozen=True)
class PruneConfig:
    """Everything `prune` does: train (or load) the teacher, find the shape (by TAS or a
    baseline method), train it with KD, evaluate and report. "l1" always inherits the
    teacher's weights (train.inherit is set to true, and saved so in config.yaml): its
    shape is made of the teacher's filters."""

    model: str = setting("resnet20", "model to prune: a registered name (see `tasprune "
                         "models`), or a network of your own as FILE.py:FACTORY or "
                         "package.module:FACTORY (called with num_classes=, in_channels=)")
    weights: str | None = setting(None, "trained weights of a FILE.py:FACTORY model (a state "
                                  "dict: .safetensors, .pt or .pth); null: train them with "
                                  "teacher_train")
    data: str = setting("demo", "dataset spec (see `tasprune data info`)")
    method: Method = setting("tas", "how the shape is found: tas (the search), or the "
                             "baselines uniform, l1 and random")
    teacher: str | None = setting(None, "trained unpruned model (run dir or "
                                  "model.safetensors); null: train one with teacher_train")
    teacher_train: TrainConfig = setting(None, "training of the teacher when none is given",
                                         factory=lambda: TrainConfig(epochs=200))
    search: SearchConfig = setting(None, "the search; its budgets are the baselines' too",
                                   factory=SearchConfig)
    train: TrainConfig = setting(None, "training of the pruned shape (KD from the teacher)",
                                 factory=lambda: TrainConfig(epochs=300))
    latency: LatencyConfig = setting(None, "how the report times the models",
                                     factory=LatencyConfig)
    random_samples: int = setting(1000, "shapes the random baseline draws (it keeps the "
                                  "best under the budget)")
    log: tuple[str, ...] = setting((), "trackers every phase writes to besides "
                                   "metrics.jsonl (csv, tensorboard); replaces the phases' "
                                   "own log settings", runtime=True)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.random_samples, bool) or self.random_samples < 1:
            raise ValueError(f"random_samples must be an integer >= 1, got "
                             f"{self.random_samples!r}")
        if self.method == "l1" and not self.train.inherit:
            object.__setattr__(self, "train", dataclasses.replace(self.train, inherit=True))
        object.__setattr__(self, "log", check_sinks(self.log))
        if self.log:
            for phase in ("teacher_train", "search", "train"):
                object.__setattr__(self, phase, dataclasses.replace(getattr(self, phase),
                                                                    log=self.log))


