"""Prune a network of your own: trace it (`tasprune.trace`), search its widths and depths
with TAS, cut it to the searched shape (`tasprune.surgery`) and fine-tune it with
distillation from the original.

`prune_model(model, data, flops_ratio=0.5)` is the one call; the pieces are public for a
user who keeps their own training loop: `plan_of`, `tasprune.search(plan.full(), data,
config, out, teacher=model)`, `tasprune.surgery.shrink`, `tasprune.distill_loss`.

A pruned network is saved as `model.safetensors` plus `shape.json` (the width of every
searched channel group, and what rebuilds it: the sizes of every pruned module and the
skipped blocks). `load_pruned_model(dir, factory)` applies those sizes to a fresh
network from the user's factory and loads the weights; the ONNX and `torch.export`
files (`export_formats`) load without the user's code.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tasprune._io import append_jsonl, atomic_write
from tasprune.checkpoint import load_state_checked
from tasprune.data.source import DataBundle
from tasprune.export import export_onnx, export_pt2
from tasprune.phase import SEARCH_CHECKPOINT, has_checkpoint
from tasprune.plan import LayerPlan, PlanShape, read_module_widths
from tasprune.settings import SearchConfig, TrainConfig
from tasprune.surgery import reorder, resize_modules, shrink
from tasprune.trace import PlanError, trace_plan
from tasprune.training.distill import DistillConfig
from tasprune.training.loop import LoopOptions, evaluate, train_one_epoch
from tasprune.training.optim import WarmupCosine, make_sgd

Factory = Callable[..., nn.Module]
WEIGHTS = "model.safetensors"
SHAPE = "shape.json"
METHODS = ("tas", "uniform", "l1")  # how a network of your own can be pruned


# the user's network ---------------------------------------------------------------------
def load_factory(spec: str) -> Factory:
    """The factory a `--model` names: `path/to/file.py:name` or `package.module:name`."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ValueError(f"--model {spec!r}: expected FILE.py:FACTORY or package.module:FACTORY "
                         "(or a built-in name, see `tasprune models`)")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"--model {spec!r}: no file {path}")
        module_name = f"tasprune_user_{abs(hash(str(path.resolve())))}"
        loader = importlib.util.spec_from_file_location(module_name, path)
        assert loader is not None and loader.loader is not None
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module
        loader.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise ValueError(f"--model {spec!r}: cannot import {where}: {err}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"--model {spec!r}: {where} has no callable {name!r}")
    return factory


def is_factory_spec(name: str) -> bool:
    """Whether a `--model` value names a factory (has a colon) rather than a built-in."""
    return ":" in name


def build(factory: Factory, num_classes: int, in_channels: int) -> nn.Module:
    """Call the factory with `num_classes` and `in_channels` as keyword arguments."""
    try:
        model = factory(num_classes=num_classes, in_channels=in_channels)
    except TypeError as err:
        raise ValueError(f"the model factory {getattr(factory, '__name__', factory)} must "
                         f"accept num_classes= and in_channels= keyword arguments: {err}"
                         ) from None
    if not isinstance(model, nn.Module):
        raise TypeError(f"the model factory returned a {type(model).__name__}, not an "
                        "nn.Module")
    return model


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a state dict file (.safetensors, or .pt/.pth read with weights_only=True) into
    `model`, strictly (every key, every shape)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"--weights {path}: cannot be read as a state dict ({err})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"],
                                                                          dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"--weights {path}: holds a {type(state).__name__}, not a state dict")
    load_state_checked(model, state, str(path))
    return model


def example_input(data: DataBundle | Sequence[int], batch: int = 2) -> torch.Tensor:
    """A zero batch shaped like the data's images (or like `[C, H, W]`)."""
    if isinstance(data, DataBundle):
        c, h, w = data.in_channels, data.resolution, data.resolution
    else:
        c, h, w = data
    return torch.zeros(batch, c, h, w)


def plan_of(model: nn.Module, data: DataBundle | Sequence[int]) -> LayerPlan:
    """The layer plan of `model` for the images of `data` (a DataBundle or [C, H, W])."""
    plan, _ = trace_plan(model, example_input(data))
    if not plan.searched:
        raise PlanError(f"{type(model).__name__}: no channel group can be pruned (every "
                        "group is fixed)")
    return plan


# the whole job --------------------------------------------------------------------------
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
                train: TrainConfig | None = None, out_dir: str | os.PathLike[str] = "runs/mine",
                method: str = "tas", quiet: bool = False) -> tuple[nn.Module, PruneModelResult]:
    """Prune `model` (trained, any traceable CNN) to `flops_ratio` of its FLOPs and/or
    `params_ratio` of its parameters on `data` (given either, they replace the budgets of
    `search`; given neither, those of `search` hold, by default half the FLOPs); returns
    the pruned module and the result.

    Sorts every channel group by importance (`tasprune.surgery.reorder`, which leaves
    the function unchanged), runs the TAS search (`search`: a `SearchConfig`, whose
    budgets the ratios given here replace; into `out_dir/search/`), cuts the model to the
    derived shape keeping the first channels of every group, and fine-tunes it with
    distillation from `model` for `train.epochs` (no fine-tuning when `train` is None).
    Writes `out_dir/model.safetensors`, `out_dir/shape.json` and `out_dir/metrics.jsonl`.
    Run again into the same `out_dir`, it continues the search from its checkpoint (same
    settings) and fine-tunes anew.

    `method` "uniform" and "l1" are the baselines at the same FLOP budget: one width
    ratio for every group, all blocks kept (`uniform_shape`); "uniform" trains it from
    a fresh initialisation, "l1" from the teacher's channels of largest L1 norm.
    """
    from tasprune.tas.searcher import search as run_search

    out = Path(out_dir)
    config = search or SearchConfig()
    if flops_ratio is not None or params_ratio is not None:
        config = dataclasses.replace(config, flops_ratio=flops_ratio, params_ratio=params_ratio)
    _check_method(method)
    plan = plan_of(model, data)
    history: list[dict[str, Any]] = []
    if method == "tas":
        model = reorder(model.eval(), plan)
        # a rerun continues (or re-derives) the search of an earlier one
        resume = has_checkpoint(out / "search" / SEARCH_CHECKPOINT)
        result = run_search(plan.full(), data, config, out / "search", teacher=model,
                            resume=resume, quiet=quiet)
        shape = result.shape
        history = result.history
        pruned = shrink(model, shape)
    else:
        if config.flops_ratio is None:
            raise ValueError(f"the {method} baseline needs a FLOP budget (flops_ratio)")
        shape = uniform_shape(plan, config.flops_ratio)
        model = model.eval()
        if method == "l1":
            pruned = shrink(reorder(model, plan, l1_importance(model, plan)), shape)
        else:
            pruned = _fresh(shrink(model, shape), config.seed)
    device = next(model.parameters()).device
    teacher_acc = acc = None
    if train is not None:
        options = LoopOptions(batch_size=train.batch_size, device=device, quiet=quiet,
                              desc="fine-tune")
        teacher_acc = evaluate(model, data.test, data.transform, options)["acc"]
        pruned, acc = fine_tune(pruned, model, data, train, out, quiet)
    full = plan.full()
    summary = PruneModelResult(shape, shape.count("flops"), full.count("flops"),
                               shape.count("params"), full.count("params"), teacher_acc, acc,
                               out, history)
    save_pruned_model(out, pruned, shape)
    append_jsonl(out / "metrics.jsonl", {"phase": "result", "flops": summary.flops,
                                          "full_flops": summary.full_flops,
                                          "params": summary.params,
                                          "full_params": summary.full_params,
                                          "acc": acc, "teacher_acc": teacher_acc})
    return pruned, summary


def uniform_shape(plan: LayerPlan, flops_ratio: float) -> PlanShape:
    """Every searched group at one width ratio r (floor(r * C), at least 1), all blocks
    kept: the largest r (to 1e-4) whose FLOPs stay at or under the budget."""
    full = plan.full()
    target = flops_ratio * full.count("flops")

    def at(r: float) -> PlanShape:
        sizes = [plan.groups[g].size for g in plan.searched]
        return full.replace(widths=[max(1, math.floor(r * c + 1e-9)) for c in sizes])

    if at(0.0).count("flops") > target:
        low = at(0.0).count("flops") / full.count("flops")
        raise ValueError(f"flops ratio {flops_ratio} is below the smallest uniform shape's "
                         f"{low:.4f}")
    lo, hi = 0.0, 1.0
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if at(mid).count("flops") <= target else (lo, mid)
    return at(lo)


def l1_importance(model: nn.Module, plan: LayerPlan) -> dict[int, torch.Tensor]:
    """Every searched group's channels scored by the L1 norm of the rows that write them
    (Li et al. 2017, "Pruning Filters for Efficient ConvNets")."""
    scores: dict[int, torch.Tensor] = {}
    searched = set(plan.searched)
    for layer in plan.layers:
        if layer.kind != "bn" and layer.writes in searched:
            w = model.get_submodule(layer.name).weight.detach().float().cpu()
            g = layer.writes
            scores[g] = scores.get(g, 0) + w.abs().flatten(1).sum(1)
    return scores


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method {method!r}: a network of your own is pruned by "
                         f"{', '.join(METHODS)}")


def _fresh(model: nn.Module, seed: int) -> nn.Module:
    """`model` with every layer initialised anew (its own reset_parameters)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
    return model


def fine_tune(model: nn.Module, teacher: nn.Module | None, data: DataBundle,
              config: TrainConfig, out_dir: Path, quiet: bool = False, phase: str = "fine-tune"
              ) -> tuple[nn.Module, float]:
    """Train `model` for `config.epochs` with KD from `teacher` (none: cross-entropy; SGD,
    warm-up then cosine); one `phase` line per epoch in `out_dir/metrics.jsonl`. Returns
    the model and its final test accuracy."""
    device = next(model.parameters()).device
    out_dir.mkdir(parents=True, exist_ok=True)
    optimizer = make_sgd(model, config.lr, config.momentum, config.nesterov,
                         config.weight_decay, config.decay_norm_and_bias)
    steps = max(len(data.train) // config.batch_size, 1)
    warmup = config.warmup_epochs if config.warmup_epochs is not None else min(
        5.0, config.epochs / 10)
    scheduler = WarmupCosine(optimizer, config.epochs * steps, int(warmup * steps))
    loss = DistillConfig(config.kd_alpha, config.kd_temperature, config.label_smoothing)
    generator = torch.Generator().manual_seed(config.seed)
    if teacher is not None:
        teacher.eval()
    acc = float("nan")
    for epoch in range(config.epochs):
        options = LoopOptions(batch_size=config.batch_size, device=device, quiet=quiet,
                              desc=f"{phase} {epoch + 1}/{config.epochs}")
        use = teacher if teacher is not None and config.kd_alpha > 0 else None
        stats = train_one_epoch(model, data.train, data.transform, optimizer, generator,
                                options, loss if use is not None else DistillConfig(0.0),
                                scheduler, teacher=use)
        test = evaluate(model, data.test, data.transform, options)
        acc = test["acc"]
        append_jsonl(out_dir / "metrics.jsonl", {"phase": phase, "epoch": epoch + 1,
                                                  "train_loss": stats["loss"],
                                                  "train_acc": stats["acc"],
                                                  "test_acc": acc})
        if not quiet:
            print(f"{phase} epoch {epoch + 1}/{config.epochs}: train acc "
                  f"{stats['acc']:.3f}  test acc {acc:.4f}", file=sys.stderr, flush=True)
    return model.eval(), acc


# saving and loading ---------------------------------------------------------------------
def save_pruned_model(out_dir: str | os.PathLike[str], model: nn.Module, shape: PlanShape
                      ) -> Path:
    """Write `out_dir/model.safetensors` and `out_dir/shape.json` atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"tasprune.plan_shape": json.dumps(shape.to_dict())}
    path = out / WEIGHTS
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
    shape.save(out / SHAPE)
    return path


def load_pruned_model(path: str | os.PathLike[str], factory: Factory | str,
                      num_classes: int | None = None, in_channels: int | None = None
                      ) -> nn.Module:
    """A pruned network of your own: a fresh `factory(num_classes=, in_channels=)` with
    the saved module sizes applied and the saved weights loaded (eval mode). `path` is
    the run directory (or its model.safetensors); `factory` a callable or a `--model`
    spec; classes and channels default to those the network was searched with."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    modules, skipped = read_module_widths(folder / SHAPE)
    raw = json.loads((folder / SHAPE).read_text())
    fn = load_factory(factory) if isinstance(factory, str) else factory
    c = in_channels if in_channels is not None else int(raw["input_shape"][0])
    classes = num_classes if num_classes is not None else _saved_classes(raw)
    model = resize_modules(build(fn, classes, c), modules, skipped)
    load_state_checked(model, load_file(str(folder / WEIGHTS)), str(folder / WEIGHTS))
    return model.eval()


def _saved_classes(raw: dict[str, Any]) -> int:
    sizes = [m["out_features"] for m in raw["modules"].values() if "out_features" in m]
    if not sizes:
        raise ValueError("the saved shape does not say how many classes the network has; "
                         "pass num_classes")
    return int(sizes[-1])


def export_formats(model: nn.Module, out_dir: str | os.PathLike[str],
                   input_shape: Sequence[int]) -> dict[str, Path]:
    """Write `model.onnx` and `model.pt2` into `out_dir` (inputs [N, *input_shape], the
    batch dynamic); they load without the user's code."""
    out = Path(out_dir)
    example = example_input(tuple(input_shape))
    return {"onnx": export_onnx(model, out / "model.onnx", example=example, fold=False),
            "pt2": export_pt2(model, out / "model.pt2", example=example)}


# the command line's job -----------------------------------------------------------------
def run_prune(config: Any, out_dir: str | os.PathLike[str], weights: str | None = None,
              quiet: bool = False, data: DataBundle | None = None) -> dict[str, Any]:
    """`tasprune prune --model FILE.py:FACTORY`: build the network for the data, load
    `weights` (or train it with `config.teacher_train`, once: a rerun takes the teacher it
    trained and continues the search), prune it by `config.method`,
    export ONNX and .pt2 (checked against PyTorch), time dense against pruned, and write
    report.md. `config` is a PruneConfig; `data` the loaded `config.data` (loaded here
    when None). Returns the summary (also summary.json)."""
    from tasprune.data import load_data
    from tasprune.latency import paired_latency
    from tasprune.pipeline import check_saved_config, save_run_config

    if config.teacher:
        raise ValueError("teacher names a tasprune run of a registered model; the trained "
                         "weights of a FILE.py:FACTORY network are given with --weights")
    _check_method(config.method)
    out = Path(out_dir)
    check_saved_config(config, out)
    data = data if data is not None else load_data(config.data, quiet=quiet)
    model = build(load_factory(config.model), data.num_classes, data.in_channels)
    plan_of(model, data)  # refuse an unprunable network before any training
    out.mkdir(parents=True, exist_ok=True)
    save_run_config(config, out)  # makes `out` a prune run: a rerun continues it
    trained = out / "teacher" / WEIGHTS
    if weights:
        load_weights(model, weights)
    elif trained.is_file():  # a rerun: the teacher an earlier run trained
        load_weights(model, trained)
    else:
        model, _ = fine_tune(model, None, data, config.teacher_train, trained.parent, quiet,
                             phase="teacher")
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write(trained, lambda tmp: save_file(state, str(tmp)))
    pruned, result = prune_model(model, data, search=config.search, train=config.train,
                                 out_dir=out, method=config.method, quiet=quiet)
    input_shape = (data.in_channels, data.resolution, data.resolution)
    files = export_formats(pruned.cpu(), out, input_shape)
    check = check_exports(pruned.cpu(), files, input_shape)
    latency = paired_latency({"dense": model.cpu(), "pruned": pruned}, input_shape,
                             config.latency)
    summary = {"model": config.model, "data": config.data, "method": config.method,
               "flops": result.flops, "full_flops": result.full_flops, "params": result.params,
               "full_params": result.full_params, "acc": result.acc,
               "teacher_acc": result.teacher_acc, "export_max_abs_diff": check,
               "latency": latency.to_dict("dense")}
    atomic_write(out / "summary.json",
                 lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n"))
    write_report(out / "report.md", result, summary)
    return summary


def check_exports(model: nn.Module, files: dict[str, Path], input_shape: Sequence[int]
                  ) -> dict[str, float]:
    """The largest absolute difference between PyTorch's logits and each export's, on a
    random batch of 3."""
    x = torch.randn(3, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.eval()(x)
        out = {"pt2": float((torch.export.load(str(files["pt2"])).module()(x) - want)
                            .abs().max())}
    try:
        import onnxruntime as ort
    except ImportError:
        return out
    session = ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    out["onnx"] = float((torch.from_numpy(got) - want).abs().max())
    return out


def write_report(path: Path, result: PruneModelResult, summary: dict[str, Any]) -> None:
    """report.md: costs and accuracy, the width of every channel group and the blocks every
    stage keeps, the exports and the measured latency."""
    shape, plan = result.shape, result.shape.plan
    lines = [f"# {summary['model']} pruned by {summary['method']} on {summary['data']}", "",
             "| | unpruned | pruned | ratio |", "|---|---|---|---|",
             f"| FLOPs (MACs) | {result.full_flops:,} | {result.flops:,} | "
             f"{result.flops / result.full_flops:.3f} |",
             f"| params | {result.full_params:,} | {result.params:,} | "
             f"{result.params / result.full_params:.3f} |"]
    if result.acc is not None:
        teacher = "" if result.teacher_acc is None else f"{result.teacher_acc:.4f}"
        lines.append(f"| test accuracy | {teacher} | {result.acc:.4f} | |")
    lat = summary.get("latency", {})
    for batch, ms in (lat.get("ms", {}).get("pruned", {}) or {}).items():
        dense = lat["ms"]["dense"][batch]["median"]
        lines.append(f"| latency, batch {batch} (ms, median) | {dense:.3f} | "
                     f"{ms['median']:.3f} | {ms['median'] / dense:.3f} |")
    lines += ["", "## Channel groups", "", "| group (first module writing it) | full | kept |",
              "|---|---|---|"]
    for g, w in zip(plan.searched, shape.widths, strict=True):
        lines.append(f"| {plan.groups[g].name} | {plan.groups[g].size} | {w} |")
    fixed = [grp for grp in plan.groups if grp.fixed]
    if fixed:
        lines += ["", "Fixed groups (not pruned): " + "; ".join(
            f"{grp.name} ({grp.size}, {grp.fixed})" for grp in fixed)]
    lines += ["", "## Blocks", "", "| stage | skippable blocks | kept |", "|---|---|---|"]
    for s, k in enumerate(shape.blocks):
        lines.append(f"| {plan.stage_name(s)} | {len(plan.stages[s])} | {k} |")
    if not shape.blocks:
        lines.append("| (none: no block with an identity shortcut) | | |")
    diffs = summary.get("export_max_abs_diff", {})
    lines += ["", "## Files", "",
              "- model.safetensors + shape.json: `tasprune.load_pruned_model(DIR, factory)`",
              "- model.onnx, model.pt2: load without your code; largest difference from "
              "PyTorch's logits: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())]
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))


def user_model(spec: str, num_classes: int, in_channels: int,
               weights: str | os.PathLike[str] | None = None) -> nn.Module:
    """The network a `--model FILE.py:FACTORY` names, built for the data, with `weights`
    loaded when given (eval mode)."""
    model = build(load_factory(spec), num_classes, in_channels)
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def train_shape(spec: str, weights: str | os.PathLike[str], shape_path: str | os.PathLike[str],
                data: DataBundle, config: TrainConfig, out_dir: str | os.PathLike[str],
                quiet: bool = False) -> tuple[nn.Module, float]:
    """`tasprune train --model FILE.py:FACTORY --weights W --shape S`: the network of
    `weights` (the searched teacher) sorted as the search sorted it, cut to the shape of
    `shape_path` (a search's shape.json) and fine-tuned with KD from it into `out_dir`
    (model.safetensors, shape.json, metrics.jsonl, model.onnx, model.pt2)."""
    out = Path(out_dir)
    teacher = user_model(spec, data.num_classes, data.in_channels, weights)
    plan = plan_of(teacher, data)
    try:
        shape = PlanShape.from_dict(plan, json.loads(Path(shape_path).read_text()))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--shape {shape_path}: cannot be read ({err})") from None
    teacher = reorder(teacher, plan)
    model, acc = fine_tune(shrink(teacher, shape), teacher, data, config, out, quiet)
    save_pruned_model(out, model, shape)
    export_formats(model.cpu(), out, (data.in_channels, data.resolution, data.resolution))
    return model, acc


def train_full(spec: str, data: DataBundle, config: TrainConfig,
               out_dir: str | os.PathLike[str], weights: str | None = None,
               quiet: bool = False) -> float:
    """`tasprune train --model FILE.py:FACTORY`: train the unpruned network (from `weights`
    when given) into `out_dir/model.safetensors` (a plain state dict: the --weights of
    prune and search). Returns its test accuracy."""
    out = Path(out_dir)
    model = user_model(spec, data.num_classes, data.in_channels, weights)
    plan_of(model, data)  # refuse an unprunable network before training it
    model, acc = fine_tune(model, None, data, config, out, quiet, phase="train")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    return acc
