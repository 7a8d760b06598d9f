"""The pruned model the user takes away: safetensors + shape, ONNX (BatchNorm folded into
the convs, see `tasprune.deploy`), TorchScript, a `torch.export` program (.pt2); and how
every phase takes a network and its teacher.

The deliverable of a run is `model.safetensors` (the weights, with the shape also stored
in its metadata) next to `shape.json`. The shape names the network it prunes (a
registered model or a factory) and the width of every channel group, so `load_model`
rebuilds the network and loads the weights in one call, without unpickling anything. A
network given to tasprune as a module in Python is rebuilt from its factory, passed to
`load_model`. Training checkpoints (`train.pt`, `best.pt`) load too, with
`torch.load(weights_only=True)`. Shapes of earlier versions (a built-in ResNet's
`tasprune.shape` file) load as well.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from tasprune._io import atomic_write, read_json
from tasprune.checkpoint import (
    DIGEST_FIELD,
    SHAPE_META_KEY,
    CheckpointError,
    load_checkpoint,
    load_state_checked,
    read_safetensors,
    tensor_digest,
)
from tasprune.data.source import DataBundle
from tasprune.deploy import fold_batchnorm
from tasprune.device import check_fits_data
from tasprune.models.network import example_input, from_view, full_network, network_plan
from tasprune.models.registry import (
    call_factory,
    default_classes,
    default_resolution,
    load_factory,
)
from tasprune.models.shape import PAPER_SHAPES_DIR, Shape, paper_shape_names
from tasprune.net.plan import FORMAT as PLAN_FORMAT
from tasprune.net.plan import LayerPlan, ModelSpec, PlanShape
from tasprune.net.surgery import build_pruned, carried_shape, mark, shape_of

WEIGHTS_FILE = "model.safetensors"
SHAPE_FILE = "shape.json"
EXPORT_FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt",
                  "pt2": "model.pt2"}
Factory = Callable[..., nn.Module] | str


def save_pruned(out_dir: str | os.PathLike[str], model: nn.Module,
                shape: PlanShape | None = None) -> Path:
    """Write `out_dir/model.safetensors` and `out_dir/shape.json` atomically; return the first.

    `shape` defaults to the one the model carries; it is also embedded in the safetensors
    metadata, so the weights file alone is enough to rebuild the model, with the digest of
    the tensors, which `load_model` checks."""
    shape = shape_of(model) if shape is None else shape
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {SHAPE_META_KEY: json.dumps({**shape.to_dict(),
                                        DIGEST_FIELD: tensor_digest(state)})}
    path = out / WEIGHTS_FILE
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
    shape.save(out / SHAPE_FILE)
    return path


def _json_file(path: Path) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a shape (expected a JSON object)")
    return data


def _comparable(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in ("modules", "skipped", "flops",
                                                      "params", DIGEST_FIELD)}


def _shape_data(path: Path, meta: dict[str, str]) -> dict[str, Any]:
    """The shape of a weights file: its metadata's, which the shape.json beside it must
    match when there is one."""
    beside = path.parent / SHAPE_FILE
    if SHAPE_META_KEY in meta:
        try:
            data = json.loads(meta[SHAPE_META_KEY])
        except ValueError as exc:
            raise CheckpointError(f"{path}: the shape in its metadata is damaged ({exc}); "
                                  "remove the file or rewrite it from the run") from None
        if beside.is_file() and _comparable(_json_file(beside)) != _comparable(data):
            raise CheckpointError(f"{path}: its metadata holds another shape than {beside}; "
                                  "the two files come from different runs: put the matching "
                                  "shape.json beside it")
        return {k: v for k, v in data.items() if k != DIGEST_FIELD}
    if beside.is_file():
        return _json_file(beside)
    raise FileNotFoundError(f"{path}: no shape in its metadata and no {SHAPE_FILE} beside it; "
                            f"put the run's {SHAPE_FILE} next to the weights")


def _module_of(spec: ModelSpec, factory: Factory | None) -> nn.Module | None:
    """The unpruned module of `spec` from `factory` (a callable or a --model spec) when
    given, else None (built from the spec's name)."""
    if factory is None:
        return None
    fn = load_factory(factory) if isinstance(factory, str) else factory
    label = factory if isinstance(factory, str) else getattr(factory, "__name__", "factory")
    return call_factory(fn, str(label), spec.num_classes, spec.in_channels)


def shape_from_data(data: dict[str, Any], factory: Factory | None = None,
                    where: str = "the shape") -> tuple[PlanShape, nn.Module]:
    """The PlanShape a shape.json (any version) describes and the unpruned module it prunes
    (freshly built; from `factory` when given, which a network given as a module needs)."""
    fmt = data.get("format")
    if fmt == "tasprune.shape":  # a built-in ResNet's shape of an earlier version
        try:
            view = Shape.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: invalid shape: {exc}") from None
        spec = ModelSpec(view.model_name, view.num_classes, view.in_channels, view.resolution)
        model, plan = full_network(spec, free=not view.is_full)
        return from_view(view, plan), model
    if fmt != PLAN_FORMAT:
        old = " (a network of your own saved by an earlier tasprune: train it again)" \
            if fmt == "tasprune.plan-shape/1" else ""
        raise ValueError(f"{where}: not a tasprune shape (format {fmt!r}){old}")
    try:
        spec = ModelSpec.from_dict(data["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: the shape does not say which network it prunes "
                         f"({exc})") from None
    free = bool(data.get("free_shortcuts"))
    module = _module_of(spec, factory)
    if module is not None:
        plan = network_plan(module, spec, free)
    elif spec.name is None:
        raise ValueError(f"{where}: the network was given as a module in Python; pass its "
                         "factory to load it (tasprune.load_model(path, factory))")
    else:
        module, plan = full_network(spec, free)
    try:
        return PlanShape.from_dict(plan, data), module
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def read_shape(path: str | os.PathLike[str], factory: Factory | None = None) -> PlanShape:
    """The shape of a shape.json (or a TAS .config) file."""
    path = Path(path)
    if path.suffix == ".config":
        return from_view(Shape.from_tas_config(path))
    return shape_from_data(_json_file(path), factory, str(path))[0]


def load_shape(target: str, num_classes: int | None = None, resolution: int | None = None,
               in_channels: int | None = None) -> PlanShape:
    """What `tasprune flops` and `train --shape` take: a registered model name or a
    factory (its unpruned network), a published TAS shape name, a shape.json or a TAS
    .config file; the classes, input size and channels given replace the file's (the
    network is traced again for them)."""
    changes = {k: v for k, v in (("num_classes", num_classes), ("resolution", resolution),
                                 ("in_channels", in_channels)) if v is not None}
    path = Path(target)
    if target in paper_shape_names():
        path = PAPER_SHAPES_DIR / f"{target}.config"
    if path.suffix in (".json", ".config") or path.exists():
        if not path.is_file():
            raise ValueError(f"{target}: no such file")
        if path.suffix == ".config":
            return from_view(Shape.from_tas_config(path).replace(**changes))
        data = _json_file(path)
        if changes and data.get("format") == "tasprune.shape":
            data = {**data, **changes}
        elif changes and isinstance(data.get("model"), dict):
            data = {**data, "model": {**data["model"], **changes}}
        return shape_from_data(data, None, str(path))[0]
    spec = ModelSpec(target, default_classes(target) if num_classes is None else num_classes,
                     3 if in_channels is None else in_channels,
                     default_resolution(target) if resolution is None else resolution)
    return full_network(spec)[1].full()


def _check_finite(state: Mapping[str, torch.Tensor], path: Path) -> None:
    bad = next((k for k, v in state.items() if v.is_floating_point()
                and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise CheckpointError(f"{path}: the weights hold NaN or infinite values (first in "
                              f"{bad!r}); the training that wrote them diverged: retrain, or "
                              "load an earlier checkpoint (best.pt)")


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu",
               factory: Factory | None = None) -> nn.Module:
    """Rebuild a saved network, pruned or not, and load its weights, in eval mode; the
    module carries its shape (`tasprune_shape`).

    `path` is a run directory (holding model.safetensors and shape.json), a
    `.safetensors` file, or a training checkpoint (`train.pt` / `best.pt`). `factory`
    (a callable or FILE.py:FACTORY) builds the unpruned network when it was given to
    tasprune as a module."""
    path = Path(path)
    if path.is_dir():
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            found = [p.name for p in (path / "best.pt", path / "train.pt") if p.is_file()]
            more = (f"; it holds {' and '.join(found)} (training not finished?), pass one of "
                    "those instead" if found else "")
            raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE} in this directory{more}")
        path = weights
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.suffix == ".safetensors":
        state, meta = read_safetensors(path)
        data = _shape_data(path, meta)
    else:
        ckpt = load_checkpoint(path)
        if "shape" not in ckpt or "model" not in ckpt:
            raise CheckpointError(f"{path}: not a tasprune training checkpoint (it has no "
                                  "'shape' and 'model' entries)")
        data, state = ckpt["shape"], ckpt["model"]
    _check_finite(state, path)
    shape, full = shape_from_data(data, factory, str(path))
    model = mark(full, shape) if shape.is_full else build_pruned(full, shape)
    load_state_checked(model, state, str(path))
    return model.to(device).eval()


load_pruned = load_model  # the name of earlier versions


def load_pruned_model(path: str | os.PathLike[str], factory: Factory | None = None,
                      device: str | torch.device = "cpu") -> nn.Module:
    """`load_model` of a network of your own (the name of earlier versions)."""
    return load_model(path, device, factory)

Teacher = nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike[str]


def as_teacher(teacher: Teacher | None, spec: ModelSpec, free: bool = False,
               seed: int | None = None) -> nn.Module | None:
    """A teacher as every phase takes it: a module, a state dict of the unpruned network of
    `spec`, or the path of a saved unpruned model (`load_model`); None stays None."""
    if teacher is None or isinstance(teacher, nn.Module):
        return teacher
    if isinstance(teacher, (str, os.PathLike)):
        model = load_model(teacher)
        shape = shape_of(model)
        if not shape.is_full:
            raise ValueError(f"the teacher {teacher} is a pruned network "
                             f"({shape.describe()}); give the trained unpruned network")
        return model
    if isinstance(teacher, Mapping):
        model, _ = full_network(spec, free=free, seed=seed)
        load_state_checked(model, teacher, "the teacher's state dict")
        return model.eval()
    raise TypeError(f"a teacher is a module, a state dict or the path of a saved model, not "
                    f"{type(teacher).__name__}")


def spec_for(network: str | nn.Module | Shape, data: DataBundle) -> ModelSpec:
    """The spec of `network` (a registered name or factory, the Shape of an unpruned
    built-in ResNet, or a module: its own name when tasprune built it) for the images and
    classes of `data`."""
    name: str | None
    if isinstance(network, str):
        name = network
    elif isinstance(network, Shape):
        if not network.is_full:
            raise ValueError(f"{network.describe()} is pruned; give the unpruned network "
                             "(Shape.full) or its name")
        check_fits_data(from_view(network), data, "network")
        name = network.model_name
    else:
        shape = carried_shape(network)
        name = shape.source.name if shape is not None and shape.source else None
    return ModelSpec(name, data.num_classes, data.in_channels, data.resolution)


def resolve_network(network: str | nn.Module | Shape, data: DataBundle, teacher: Teacher | None,
                    free: bool, seed: int = 0, weights: str | os.PathLike[str] | None = None
                    ) -> tuple[nn.Module, LayerPlan, nn.Module | None]:
    """(the unpruned module to start from, its plan for `data`, the teacher module or None)
    of a phase given `network` (a registered name, a factory, or a module, which is its own
    teacher unless another is given), `teacher`, and `weights` (a state dict file of the
    network: the network with them is the teacher)."""
    spec = spec_for(network, data)
    given = network if isinstance(network, nn.Module) else None
    if weights is not None:
        if teacher is not None or given is not None:
            raise ValueError("give the trained network once: a teacher, or weights of the "
                             "network named")
        model, plan = full_network(spec, free=free, weights=weights, seed=seed)
        return model, plan, model
    model = as_teacher(teacher, spec, free, seed)
    if model is not None:
        own = carried_shape(model)
        source = own.source if own is not None else None
        if source is not None and spec.name and source.name and source.name != spec.name:
            raise ValueError(f"the teacher is a {source.name}, not a {spec.name}; give the "
                             f"trained unpruned {spec.name} (train one with `tasprune train "
                             f"--model {spec.name}`)")
        if source is not None and (source.num_classes, source.in_channels) != (
                spec.num_classes, spec.in_channels):
            raise ValueError(f"the teacher has {source.num_classes} classes and "
                             f"{source.in_channels} input channels but the data "
                             f"{data.name!r} has {spec.num_classes} and {spec.in_channels}; "
                             "give a teacher trained on this data")
    teacher_model = model if model is not None else given
    if teacher_model is None:
        module, plan = full_network(spec, free=free, seed=seed)
        return module, plan, None
    plan = network_plan(teacher_model, spec, free)
    return teacher_model, plan, teacher_model


def _example_input(model: nn.Module, batch: int = 1) -> torch.Tensor:
    s = shape_of(model)
    param = next(model.parameters())
    x = example_input((s.in_channels, s.resolution, s.resolution), batch)
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(param.device)


def export_onnx(model: nn.Module, path: str | os.PathLike[str],
                example: torch.Tensor | None = None, fold: bool = True) -> Path:
    """Write the inference form of `model` as an ONNX graph (input `images` [N, C, H, W]
    with a dynamic batch, output `logits`).

    The graph is of `tasprune.deploy.fold_batchnorm(model)`: every BatchNorm folded into
    the conv before it (the model itself is left as it is). Uses the torch.export-based
    exporter (needs the `onnx` and `onnxscript` packages). A network of your own passes
    an `example` batch (of 2 or more) and `fold=False` (ONNX Runtime folds BatchNorm itself).
    """
    path = Path(path)
    example = _example_input(model, 2) if example is None else example
    model = fold_batchnorm(model) if fold else model.eval()
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    try:
        # the exporter logs about absent torchvision ops and warns about torch internals;
        # neither concerns these networks
        onnx_log.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(
                model, (example,), dynamo=True, verbose=False,
                input_names=["images"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
            )
    except ImportError as exc:
        raise ModuleNotFoundError(f"ONNX export needs the onnx and onnxscript packages "
                                  f"(pip install 'tasprune[dev]'): {exc}") from None
    finally:
        onnx_log.setLevel(level)
    atomic_write(path, lambda tmp: program.save(str(tmp)))
    return path


def export_torchscript(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write a traced TorchScript module (`torch.jit.load` reads it, no tasprune needed).

    The network has no data-dependent control flow, so tracing is exact. PyTorch
    deprecates TorchScript; its warning is silenced here since the format was asked for.
    """
    path = Path(path)
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, _example_input(model))
        atomic_write(path, lambda tmp: traced.save(str(tmp)))
    return path


def export_pt2(model: nn.Module, path: str | os.PathLike[str],
               example: torch.Tensor | None = None) -> Path:
    """Write a `torch.export` program with a dynamic batch dimension; it loads with
    `torch.export.load(path).module()` and needs no tasprune."""
    path = Path(path)
    example = _example_input(model, 2) if example is None else example
    program = torch.export.export(model.eval(), (example,),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    atomic_write(path, lambda tmp: torch.export.save(program, str(tmp)))
    return path


def export_model(model: nn.Module, fmt: str, path: str | os.PathLike[str]) -> Path:
    """Export in `fmt` ("onnx", "torchscript" or "pt2") to `path`."""
    if fmt == "onnx":
        return export_onnx(model, path)
    if fmt == "torchscript":
        return export_torchscript(model, path)
    if fmt == "pt2":
        return export_pt2(model, path)
    raise ValueError(f"unknown export format {fmt!r}; expected one of {sorted(EXPORT_FORMATS)}")
