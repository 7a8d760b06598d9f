"""`tasprune prune`: the whole job in one run directory, resumable phase by phase.

Phases (each skipped when its finished output is there, resumed when its
checkpoint is):

1. teacher - load the user's trained unpruned net, or train one into `DIR/teacher/`;
2. search  - method "tas": TAS search into `DIR` (search.pt, shape.json, "search"/"derive"
             lines of metrics.jsonl), the supernet started from the teacher;
   shape   - a baseline method ("uniform", "l1", "random"; see `tasprune.baselines`)
             instead: shape.json and one "derive" line (method, FLOPs, target);
3. train   - train the shape with KD from the teacher (train.pt, best.pt,
             model.safetensors + shape.json: the deliverable); `train.kd_alpha=0`
             trains without KD (the teacher's forward is then skipped);
4. eval    - teacher and pruned net on the test split, FLOPs, params, CPU latency
             -> summary.json;
5. report  - report.md and PNG plots.

The resolved config is saved as `DIR/config.yaml`; re-running into a directory
made with other settings is refused rather than mixing two experiments.

Under torchrun every rank runs the teacher, search and train phases together
(each distributed, see `tasprune.dist`); rank 0 alone writes files and runs the
eval and report phases while the other ranks wait, then every rank returns the
same summary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from tasprune._io import atomic_write_text, read_json, read_jsonl
from tasprune.baselines import check_method_ratio, l1_shape, random_shape, uniform_shape
from tasprune.config import ConfigError, load_config, save_config, to_dict, yaml_problem
from tasprune.data import load_data, same_data
from tasprune.data.source import DataBundle
from tasprune.device import check_fits_data, resolve_device
from tasprune.dist import init_from_env
from tasprune.evaluation import evaluate_model, isolated_latency_report
from tasprune.export import (
    SHAPE_FILE,
    WEIGHTS_FILE,
    Teacher,
    as_teacher,
    load_model,
    read_shape,
    save_pruned,
)
from tasprune.models.network import full_network, network_plan
from tasprune.net.importance import inherit
from tasprune.net.plan import ModelSpec, PlanShape
from tasprune.net.surgery import carried_shape, mark, shape_of
from tasprune.phase import (
    METRICS_FILE,
    SEARCH_CHECKPOINT,
    TRAIN_CHECKPOINT,
    changed_settings,
    has_checkpoint,
    runtime_keys,
)
from tasprune.report import write_report
from tasprune.settings import PruneConfig, SearchConfig, TrainConfig
from tasprune.tas.budgets import build_budgets, check_budget, describe_budgets, space_of
from tasprune.tas.cost import Budget, normalized_cost
from tasprune.tas.searcher import search as run_search
from tasprune.tas.space import SearchSpace
from tasprune.tracking import log_record
from tasprune.training.trainer import train as run_train

RECIPES_DIR = Path(__file__).parent / "configs"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
MARKER_FILE = "run.json"  # kind of run and the hash of the config.yaml it wrote
# settings added after runs were made without them: a saved config.yaml lacking one ran
# with this value (the paired latency: rounds; threads as torch had them; deploy timing;
# the search space of free residual widths)
_ADDED_KEYS = {("latency", "rounds"): 5, ("latency", "threads"): None,
               ("latency", "deploy"): True, ("search", "couple_residual"): False}


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


def load_prune_config(recipe: str | None = None, overrides: Sequence[str] = (),
                      flags: dict[str, Any] | None = None) -> PruneConfig:
    """Defaults, then a recipe (path or shipped name), then the command line's flags (a
    nested mapping), then dotted key=value overrides."""
    return load_config(PruneConfig, recipe_path(recipe) if recipe else None, overrides,
                       flags=flags)


def _differences(saved: dict[str, Any], config: PruneConfig) -> list[str]:
    """The settings of a saved config.yaml that differ from `config`, but runtime ones and
    a data set named in another way."""
    now = to_dict(config)
    if isinstance(saved.get("data"), str) and same_data(saved["data"], config.data):
        saved = {**saved, "data": now["data"]}
    return changed_settings(saved, now, runtime_keys(config))


def _with_added_keys(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the settings added since it was written, at the value it ran with."""
    saved = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    for (section, key), value in _ADDED_KEYS.items():
        if isinstance(saved.get(section), dict):
            saved[section].setdefault(key, value)
    return saved


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_saved_config(path: Path) -> dict[str, Any]:
    """A run's config.yaml as a mapping; a damaged one is a ConfigError naming it."""
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        problem = (yaml_problem(exc) if isinstance(exc, yaml.YAMLError)
                   else "not UTF-8 text")
        raise ConfigError(f"{path}: the run's saved settings are damaged ({problem}); "
                          "restore the file, or choose another --out") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the run's saved settings are damaged (expected a mapping "
                          f"of settings, got {type(data).__name__}); restore the file, or "
                          "choose another --out")
    return data


def check_saved_config(config: PruneConfig, out: Path) -> None:
    """Refuse to continue a prune run in `out` whose saved config.yaml was edited or holds
    other settings than `config` (runtime ones aside)."""
    saved = out / CONFIG_FILE
    if not saved.is_file():
        return
    marker = out / MARKER_FILE
    if marker.is_file() and read_json(marker).get("config_sha256") != _sha256(saved):
        raise ConfigError(f"{saved} was edited after the run wrote it, so it no longer "
                          "describes the run's results; restore it, or choose another "
                          "--out for new settings")
    diff = _differences(_with_added_keys(_read_saved_config(saved)), config)
    if diff:
        raise ConfigError(f"{out} holds a run with other settings ({'; '.join(diff[:3])}); "
                          "choose another --out, or delete the directory to start over")


def save_run_config(config: PruneConfig, out: Path) -> None:
    """Write config.yaml and the run.json marker that makes `out` a prune run, once: a rerun
    (settings equal but for runtime ones) writes nothing, even on a read-only share."""
    saved = out / CONFIG_FILE
    if not saved.is_file():
        save_config(config, saved)
        atomic_write_text(out / MARKER_FILE, json.dumps(
            {"kind": "prune", "config_sha256": _sha256(saved)}) + "\n")


def _log(quiet: bool, message: str) -> None:
    if not quiet:
        print(f"[tasprune] {message}", file=sys.stderr, flush=True)


def _has_phase(path: Path, phase: str) -> bool:
    return path.is_file() and any(r.get("phase") == phase for r in read_jsonl(path))


def check_reachable(config: PruneConfig, space: SearchSpace, model: nn.Module,
                    quiet: bool = True) -> None:
    """Refuse a budget below the smallest shape the method can give, before any training
    (a latency budget times its table here; the search then reads it from the cache)."""
    search_config = config.search
    if search_config.flops_ratio is not None:
        if config.method == "tas":
            check_budget(space, search_config.flops_ratio)
        else:
            check_method_ratio(config.method, space, search_config.flops_ratio)
    if search_config.params_ratio is not None or search_config.latency_ratio is not None:
        build_budgets(search_config, space, quiet, model)


def _given_teacher(config: PruneConfig, spec: ModelSpec, data: DataBundle,
                   teacher: Teacher | None, free: bool) -> nn.Module | None:
    """The user's teacher (a model or state dict given in Python, else the path
    `config.teacher`), loaded and checked against the data and the network; else None."""
    if teacher is None and config.teacher is None:
        return None
    what = "teacher" if teacher is not None else f"teacher {config.teacher}"
    model = as_teacher(teacher if teacher is not None else config.teacher, spec, free)
    assert model is not None
    own = carried_shape(model)
    if own is not None:
        check_fits_data(own, data, what)
        if own.source is not None and own.source.name and own.source.name != spec.name:
            raise ValueError(f"the {what} is a {own.source.name}, not a {spec.name}; give a "
                             f"trained unpruned {spec.name}, or none to train one")
        if not own.is_full:
            raise ValueError(f"the {what} is a pruned network ({own.describe()}); give a "
                             f"trained unpruned {spec.name}, or none to train one")
    else:
        mark(model, network_plan(model, spec, free).full())
    return model


def _keep_teacher(teacher: nn.Module, tdir: Path) -> None:
    """A teacher given in Python is saved where prune keeps its teacher, so that the run
    directory holds what it was made from and a rerun finds it."""
    if (tdir / WEIGHTS_FILE).is_file():
        kept, given = load_model(tdir).state_dict(), teacher.state_dict()
        same = kept.keys() == given.keys() and all(
            torch.equal(kept[k], v.cpu()) for k, v in given.items())
        if not same:
            raise ValueError(f"{tdir} holds another teacher than the one given; choose another "
                             "output directory, or give no teacher to use the one there")
        return
    save_pruned(tdir, teacher)


def _teacher(config: PruneConfig, data: DataBundle, out: Path, quiet: bool) -> nn.Module:
    tdir = out / "teacher"
    if (tdir / WEIGHTS_FILE).is_file():
        _log(quiet, f"teacher: done ({tdir}), skipping")
        return load_model(tdir)
    resume = has_checkpoint(tdir / TRAIN_CHECKPOINT)
    _log(quiet, f"teacher: {'resuming' if resume else 'training'} the unpruned {config.model} "
         f"for {config.teacher_train.epochs} epochs into {tdir}")
    return run_train(config.model, data, config.teacher_train, tdir, resume=resume).model


def prune(config: PruneConfig, out_dir: str | os.PathLike[str], quiet: bool = False,
          teacher: Teacher | None = None) -> dict[str, Any]:
    """Run every phase into `out_dir` (see module doc); returns the summary dict.

    `teacher`: the trained unpruned model as a model, a state dict or the path of a saved
    one, instead of `config.teacher` (a path becomes `config.teacher`; a model or state
    dict is saved as `out_dir/teacher/model.safetensors`, where a rerun finds it)."""
    out = Path(out_dir)
    if isinstance(teacher, (str, os.PathLike)):
        config, teacher = dataclasses.replace(config, teacher=str(teacher)), None
    dist = init_from_env(resolve_device(config.train.device).type)
    quiet = quiet or not dist.is_main  # one progress display: rank 0's
    if quiet:  # silence the training phases' progress too (quiet is a runtime setting)
        config = dataclasses.replace(
            config, teacher_train=dataclasses.replace(config.teacher_train, quiet=True),
            train=dataclasses.replace(config.train, quiet=True))
    if str(out) in ("", "."):
        raise ValueError("--out is empty; give a directory for the run, e.g. runs/mine")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a directory; choose another "
                         "--out")
    if not out.absolute().parent.is_dir():
        raise FileNotFoundError(f"output directory parent {out.absolute().parent} does not "
                                "exist; create it first or choose another --out")
    if config.teacher and config.weights:
        raise ValueError("give the trained network once: --teacher (a tasprune run or "
                         "model) or --weights (a state dict), not both")
    data = load_data(config.data, quiet=quiet)
    spec = ModelSpec(config.model, data.num_classes, data.in_channels, data.resolution)
    free = not config.search.couple_residual
    check_saved_config(config, out)
    # every check that can fail comes before the first file is written and the first epoch
    for phase in ("teacher_train", "search", "train"):
        try:
            resolve_device(getattr(config, phase).device)
        except ValueError as exc:
            raise ValueError(f"{phase}.{exc}") from None
    say = None if quiet else (lambda line: _log(False, line))
    model, plan = full_network(spec, free, weights=config.weights,
                               seed=config.teacher_train.seed, say=say)
    space = space_of(config.search, plan)
    check_reachable(config, space, model, quiet or not dist.is_main)
    given = _given_teacher(config, spec, data, teacher, free)
    if given is None and config.weights:
        given = model  # the network with the user's trained weights
    if dist.is_main:
        out.mkdir(exist_ok=True)
        if teacher is not None:
            _keep_teacher(given, out / "teacher")
        save_run_config(config, out)
    dist.barrier()

    if given is not None:
        where = (config.teacher or f"--weights {config.weights}") if teacher is None \
            else f"given, kept in {out / 'teacher'}"
        _log(quiet, f"teacher: {where}")
    teacher = given if given is not None else _teacher(config, data, out, quiet)
    metrics = out / METRICS_FILE
    phase = "search" if config.method == "tas" else "shape"
    trained = (out / WEIGHTS_FILE).is_file() and (out / TRAIN_CHECKPOINT).is_file()
    if (out / SHAPE_FILE).is_file() and (_has_phase(metrics, "derive") or trained):
        # a trained model's shape is never derived again (its metrics may be lost)
        shape = read_shape(out / SHAPE_FILE)
        _log(quiet, f"{phase}: done ({out / SHAPE_FILE}), skipping")
        if not metrics.is_file():
            print(f"[tasprune] warning: {metrics} is missing; the report will lack the "
                  "search and training curves", file=sys.stderr)
    elif config.method != "tas":
        _log(quiet, f"shape: the {config.method} baseline at "
             f"{describe_budgets(config.search)}")
        budgets = build_budgets(config.search, space)
        shape = baseline_shape(config.method, config.search, space, teacher, budgets,
                               config.random_samples)  # equal on every rank
        if dist.is_main:
            _write_shape(config, shape, out, budgets)
    else:
        resume = has_checkpoint(out / SEARCH_CHECKPOINT)
        _log(quiet, f"search: {'resuming' if resume else 'searching'} at "
             f"{describe_budgets(config.search)} for {config.search.epochs} epochs")
        found = run_search(config.model, data, config.search, out, teacher=teacher,
                       resume=resume, quiet=quiet)
        shape = found.shape
        if found.adjusted and found.argmax_flops is not None:
            argmax = found.argmax_flops / found.full_flops
            _log(quiet, f"search: the most probable shape ({argmax:.4f} of the FLOPs) was "
                 "moved to the closest shape that is in the band and uses the budget "
                 f"({found.flops / found.full_flops:.4f})")

    if trained:
        _log(quiet, f"train: done ({out / WEIGHTS_FILE}), skipping")
        pruned = load_model(out)
    else:
        resume = has_checkpoint(out / TRAIN_CHECKPOINT)
        how = "with KD" if config.train.kd_alpha > 0 else "without KD (train.kd_alpha=0)"
        _log(quiet, f"train: {'resuming' if resume else 'training'} the {config.method} shape "
             f"{how} for {config.train.epochs} epochs")
        pruned = run_train(shape, data, config.train, out, teacher=teacher,
                           resume=resume).model

    summary_path = out / SUMMARY_FILE
    if dist.is_main:
        if summary_path.is_file():
            _log(quiet, f"eval: done ({summary_path}), skipping")
        else:
            _log(quiet, "eval: test accuracy and CPU latency of the unpruned and pruned nets")
            summary = summarize(config, teacher, pruned, data, space, quiet)
            atomic_write_text(summary_path, json.dumps(summary, indent=1) + "\n")
        report = out / "report.md"
        if not report.is_file() or report.stat().st_mtime < summary_path.stat().st_mtime:
            write_report(out)
        _log(quiet, f"report: {report}")
    dist.barrier()
    return read_json(summary_path)


def baseline_shape(method: str, config: SearchConfig, space: SearchSpace, teacher: nn.Module,
                   budgets: Sequence[Budget] | None = None, samples: int = 1000) -> PlanShape:
    """The shape of a baseline method (uniform, l1, random) at the budgets of the search
    `config` (`build_budgets` of them when not given); random draws `samples` shapes."""
    ratio = 1.0 if config.flops_ratio is None else config.flops_ratio
    if budgets is None:
        budgets = build_budgets(config, space)
    cost = None if [b.name for b in budgets] == ["flops"] else normalized_cost(budgets)
    if method == "uniform":
        return uniform_shape(space.full, ratio, cost=cost)
    if method == "random":
        return random_shape(space, ratio, samples=samples, seed=config.seed, cost=cost)
    if method == "l1":
        return l1_shape(space.full, teacher, ratio, cost=cost)
    raise ValueError(f"no baseline method {method!r}")


def _write_shape(config: PruneConfig, shape: PlanShape, out: Path,
                 budgets: Sequence[Budget]) -> None:
    """shape.json and the "derive" line of a baseline, as the search writes them."""
    shape.save(out / SHAPE_FILE)
    full = shape.plan.full()
    flops, full_flops = shape.count("flops"), full.count("flops")
    log_record(out / METRICS_FILE, {
        "phase": "derive", "method": config.method, "epoch": 0, "flops": flops,
        "params": shape.count("params"), "full_flops": full_flops,
        "full_params": full.count("params"),
        "target_flops": (config.search.flops_ratio or 1.0) * full_flops,
        "flops_ratio": flops / full_flops, "target_ratio": config.search.flops_ratio,
        "blocks": list(shape.blocks),
        "budgets": {b.name: {"ratio": b.fraction(shape), "target": b.ratio}
                    for b in budgets},
    }, config.log)


def summarize(config: PruneConfig, teacher: nn.Module, model: nn.Module, data: DataBundle,
              space: SearchSpace, quiet: bool) -> dict[str, Any]:
    """summary.json: unpruned vs pruned accuracy, FLOPs, params and latency.

    Latency is one paired measurement (`tasprune.evaluation.latency_report`) of the
    teacher ("dense"), the pruned net and, with latency.deploy, its folded form in
    PyTorch and ONNX Runtime: `latency` holds it all (ms and speed-ups with their
    spread, threads, rounds), `latency_ms` the medians by name and batch size.
    """
    device = resolve_device(config.train.device)
    dense = evaluate_model(teacher, data, device, latency=None, quiet=quiet, what="teacher")
    pruned = evaluate_model(model, data, device, latency=None, quiet=quiet, what="pruned")
    size = (data.in_channels, data.resolution, data.resolution)
    timed = isolated_latency_report(model, size, config.latency, dense=teacher, name="pruned")
    shape = shape_of(model)
    budgets = build_budgets(config.search, space)
    return {
        "model": config.model, "data": config.data, "method": config.method,
        "kd": config.train.kd_alpha > 0,
        "flops_full": dense["flops"], "flops_pruned": pruned["flops"],
        "flops_ratio_target": config.search.flops_ratio,
        "flops_ratio": pruned["flops"] / dense["flops"],
        "acc_full": dense["acc"], "acc_pruned": pruned["acc"],
        "params_full": dense["params"], "params_pruned": pruned["params"],
        "latency_ms": {name: {b: s["median"] for b, s in rows.items()}
                       for name, rows in timed["ms"].items()},
        "latency_threads": timed["threads"],
        "latency": timed,
        # every budget: the shape's cost over the unpruned net's (latency: the table's
        # prediction; the measured speed-up is in `latency`) and the target
        "budgets": {b.name: {"ratio": b.fraction(shape), "target": b.ratio} for b in budgets},
        "shape": shape.to_dict(),
    }


# a network given as a module in Python ---------------------------------------------------
@dataclass
class PruneModelResult:
    """What `prune_model` hands back beside the pruned module."""

    shape: PlanShape
    flops: int
    full_flops: int
    params: int
    full_params: int
    teacher_acc: float | None = None
    acc: float | None = None  # on the test split after fine-tuning
    out_dir: Path | None = None
    search_history: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        line = (f"FLOPs {self.flops:,} of {self.full_flops:,} ({self.flops / self.full_flops:.3f})"
                f", params {self.params:,} of {self.full_params:,} "
                f"({self.params / self.full_params:.3f})")
        if self.acc is not None:
            line += f", test accuracy {self.acc:.4f}"
            if self.teacher_acc is not None:
                line += f" (unpruned {self.teacher_acc:.4f})"
        return line


def prune_model(model: nn.Module, data: DataBundle, flops_ratio: float | None = None,
                params_ratio: float | None = None, *, search: SearchConfig | None = None,
                train: TrainConfig | None = None,
                out_dir: str | os.PathLike[str] = "runs/mine", method: str = "tas",
                quiet: bool = False) -> tuple[nn.Module, PruneModelResult]:
    """Prune `model` (a trained network of your own, any traceable CNN) to `flops_ratio` of
    its FLOPs and/or `params_ratio` of its parameters on `data` (given either, they replace
    the budgets of `search`; given neither, those hold: by default half the FLOPs);
    returns the pruned module and the result.

    The shape comes from the TAS search (`method` "tas", into `out_dir/search/`) or a
    baseline ("uniform", "l1", "random"); the pruned network keeps the model's channels
    of largest L1 norm (`tasprune.net.importance.inherit`) and is fine-tuned with
    distillation from `model` for `train.epochs` (no fine-tuning when it is None),
    with the checkpoints of `tasprune train`. Writes `out_dir/model.safetensors` +
    `shape.json` (load with `tasprune.load_model(out_dir, factory)`). Run again into the
    same `out_dir`, it continues where it stopped."""
    out = Path(out_dir)
    config = search or SearchConfig()
    if flops_ratio is not None or params_ratio is not None:
        config = dataclasses.replace(config, flops_ratio=flops_ratio, params_ratio=params_ratio)
    if method not in ("tas", "uniform", "l1", "random"):
        raise ValueError(f"method {method!r}: use tas, uniform, l1 or random")
    spec = ModelSpec(None, data.num_classes, data.in_channels, data.resolution)
    plan = network_plan(model, spec, free=not config.couple_residual)
    model = mark(model.eval(), plan.full())
    space = space_of(config, plan)
    history: list[dict[str, Any]] = []
    if method == "tas":
        resume = has_checkpoint(out / "search" / SEARCH_CHECKPOINT)
        result = run_search(model, data, config, out / "search", teacher=model,
                            resume=resume, quiet=quiet)
        shape, history = result.shape, result.history
    else:
        shape = baseline_shape(method, config, space, model)
    pruned = inherit(model, shape)
    mark(pruned, shape)
    teacher_acc = acc = None
    if train is not None:
        trained = run_train(pruned, data, dataclasses.replace(train, inherit=False), out,
                            teacher=model, resume=has_checkpoint(out / TRAIN_CHECKPOINT))
        pruned, acc = trained.model, trained.metrics.get("test_acc")
        teacher_acc = next((r["test_acc"] for r in read_jsonl(out / METRICS_FILE)
                            if r.get("phase") == "teacher"), None)
    else:
        save_pruned(out, pruned, shape)
    full = plan.full()
    return pruned, PruneModelResult(shape, shape.count("flops"), full.count("flops"),
                                    shape.count("params"), full.count("params"), teacher_acc,
                                    acc, out, history)
