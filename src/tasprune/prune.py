"""`tasprune prune`: the whole job in one run directory, resumable phase by phase.

Phases (each skipped when its finished output is there, resumed when its
checkpoint is):

1. teacher - load the user's trained unpruned net, or train one into `DIR/teacher/`;
2. search  - TAS search into `DIR` (search.pt, shape.json, "search"/"derive" lines
             of metrics.jsonl), the supernet started from the teacher;
3. train   - train the searched shape with KD from the teacher (train.pt, best.pt,
             model.safetensors + shape.json: the deliverable);
4. eval    - teacher and pruned net on the test split, FLOPs, params, CPU latency
             -> summary.json;
5. report  - report.md and PNG plots.

The resolved config is saved as `DIR/config.yaml`; re-running into a directory
made with other settings is refused rather than mixing two experiments.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from tasprune._io import atomic_write_text, read_json, read_jsonl
from tasprune.config import ConfigError, load_config, save_config, to_dict
from tasprune.data import load_data
from tasprune.data.source import DataBundle
from tasprune.evaluation import evaluate_model
from tasprune.export import load_pruned
from tasprune.latency import LatencyConfig
from tasprune.models import ResNet
from tasprune.report import write_report
from tasprune.search.searcher import SearchConfig, search
from tasprune.shape import Shape
from tasprune.train.trainer import TrainConfig, resolve_device, train

RECIPES_DIR = Path(__file__).parent / "configs"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
# settings that may change between a run and its resumption
_RUNTIME_KEYS = {"quiet", "device", "amp", "eval_every"}


@dataclass(frozen=True)
class PruneConfig:
    """Everything `prune` does. model/data: what to prune on what; teacher: path of a
    trained unpruned model (run dir or model.safetensors), None to train one with
    `teacher_train`; search: the TAS search (its flops_ratio is the budget); train: the
    training of the searched shape (KD from the teacher); latency: how to time models."""

    model: str = "resnet20"
    data: str = "demo"
    teacher: str | None = None
    teacher_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=200))
    search: SearchConfig = field(default_factory=SearchConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=300))
    latency: LatencyConfig = field(default_factory=LatencyConfig)


def recipe_path(name_or_path: str) -> Path:
    """A recipe file: a path, or the name of a recipe shipped in tasprune/configs."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(recipe_names())
    raise ConfigError(f"no recipe {name_or_path!r}: give a YAML path or one of: {names}")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_prune_config(recipe: str | None = None, overrides: tuple[str, ...] = ()) -> PruneConfig:
    """Defaults, then a recipe (path or shipped name), then dotted key=value overrides."""
    return load_config(PruneConfig, recipe_path(recipe) if recipe else None, overrides)


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            if key in _RUNTIME_KEYS:
                continue
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def _log(quiet: bool, message: str) -> None:
    if not quiet:
        print(f"[tasprune] {message}", file=sys.stderr, flush=True)


def _has_phase(path: Path, phase: str) -> bool:
    return path.is_file() and any(r.get("phase") == phase for r in read_jsonl(path))


def _teacher(config: PruneConfig, full: Shape, data: DataBundle, out: Path,
             quiet: bool) -> ResNet:
    if config.teacher is not None:
        _log(quiet, f"teacher: loading {config.teacher}")
        return load_pruned(config.teacher)
    tdir = out / "teacher"
    if (tdir / "model.safetensors").is_file():
        _log(quiet, f"teacher: done ({tdir}), skipping")
        return load_pruned(tdir)
    resume = (tdir / "train.pt").is_file()
    _log(quiet, f"teacher: {'resuming' if resume else 'training'} the unpruned {config.model} "
         f"for {config.teacher_train.epochs} epochs into {tdir}")
    return train(full, data, config.teacher_train, tdir, resume=resume).model


def prune(config: PruneConfig, out_dir: str | os.PathLike[str], quiet: bool = False
          ) -> dict[str, Any]:
    """Run every phase into `out_dir` (see module doc); returns the summary dict."""
    out = Path(out_dir)
    if not out.parent.exists():
        raise FileNotFoundError(f"{out.parent}: the parent of the output directory does not "
                                "exist; create it first or choose another --out")
    data = load_data(config.data, quiet=quiet)
    full = Shape.full(config.model, num_classes=data.num_classes,
                      in_channels=data.in_channels, resolution=data.resolution)
    saved = out / CONFIG_FILE
    if saved.is_file():
        diff = _differences(yaml.safe_load(saved.read_text()), to_dict(config))
        if diff:
            raise ConfigError(f"{out} holds a run with other settings ({'; '.join(diff[:3])}); "
                              "choose another --out, or delete the directory to start over")
    out.mkdir(exist_ok=True)
    save_config(config, saved)

    teacher = _teacher(config, full, data, out, quiet)
    metrics = out / "metrics.jsonl"
    if _has_phase(metrics, "derive") and (out / "shape.json").is_file():
        shape = Shape.load(out / "shape.json")
        _log(quiet, f"search: done ({out / 'shape.json'}), skipping")
    else:
        resume = (out / "search.pt").is_file()
        teacher_state = teacher.state_dict() if teacher.shape.replace(
            resolution=full.resolution) == full else None
        if teacher_state is None:
            _log(quiet, "search: the teacher is not the unpruned model; the supernet starts "
                 "from scratch")
        _log(quiet, f"search: {'resuming' if resume else 'searching'} at "
             f"{config.search.flops_ratio} of the FLOPs for {config.search.epochs} epochs")
        shape = search(full, data, config.search, out, teacher_state=teacher_state,
                       resume=resume, quiet=quiet).shape

    if (out / "model.safetensors").is_file() and (out / "train.pt").is_file():
        _log(quiet, f"train: done ({out / 'model.safetensors'}), skipping")
        model = load_pruned(out)
    else:
        resume = (out / "train.pt").is_file()
        _log(quiet, f"train: {'resuming' if resume else 'training'} the searched shape with "
             f"KD for {config.train.epochs} epochs")
        model = train(shape, data, config.train, out, teacher=teacher, resume=resume).model

    summary_path = out / SUMMARY_FILE
    if summary_path.is_file():
        _log(quiet, f"eval: done ({summary_path}), skipping")
        summary = read_json(summary_path)
    else:
        _log(quiet, "eval: test accuracy and CPU latency of the unpruned and pruned nets")
        summary = summarize(config, teacher, model, data, quiet)
        atomic_write_text(summary_path, json.dumps(summary, indent=1) + "\n")
    write_report(out)
    _log(quiet, f"report: {out / 'report.md'}")
    return summary


def summarize(config: PruneConfig, teacher: ResNet, model: ResNet, data: DataBundle,
              quiet: bool) -> dict[str, Any]:
    """summary.json: unpruned vs pruned accuracy, FLOPs, params and latency."""
    device = resolve_device(config.train.device)
    dense = evaluate_model(teacher, data, device, latency=config.latency, quiet=quiet,
                           what="teacher")
    pruned = evaluate_model(model, data, device, latency=config.latency, quiet=quiet,
                            what="pruned")
    return {
        "model": config.model, "data": config.data,
        "flops_full": dense["flops"], "flops_pruned": pruned["flops"],
        "flops_ratio_target": config.search.flops_ratio,
        "flops_ratio": pruned["flops"] / dense["flops"],
        "acc_full": dense["acc"], "acc_pruned": pruned["acc"],
        "params_full": dense["params"], "params_pruned": pruned["params"],
        "latency_ms": {"dense": dense["latency_ms"], "pruned": pruned["latency_ms"]},
        "latency_threads": torch.get_num_threads(),
        "shape": model.shape.to_dict(),
    }
