"""The pruned model the user takes away: safetensors + shape, ONNX (BatchNorm folded into
the convs, see `tasprune.deploy`), TorchScript, a `torch.export` program (.pt2).

The deliverable of a run is `model.safetensors` (the weights, with the shape
also stored in its metadata) next to `shape.json`. `load_model` rebuilds the
network from the shape and loads the weights in one call, without unpickling
anything. Training checkpoints (`train.pt`, `best.pt`) load too, with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tasprune._io import atomic_write
from tasprune.checkpoint import CheckpointError, load_checkpoint, load_state_checked
from tasprune.deploy import fold_batchnorm
from tasprune.models import ResNet, build_model
from tasprune.plan import PlanShape
from tasprune.shape import Shape

WEIGHTS_FILE = "model.safetensors"
SHAPE_FILE = "shape.json"
_SHAPE_KEY = "tasprune.shape"
EXPORT_FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt",
                  "pt2": "model.pt2"}


def save_pruned(out_dir: str | os.PathLike[str], model: ResNet) -> Path:
    """Write `out_dir/model.safetensors` and `out_dir/shape.json` atomically; return the first.

    The shape is also embedded in the safetensors metadata, so the weights file
    alone is enough to rebuild the model.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {_SHAPE_KEY: json.dumps(model.shape.to_dict())}
    path = out / WEIGHTS_FILE
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
    model.shape.save(out / SHAPE_FILE)
    return path


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        return load_file(str(path)), meta
    except Exception as exc:  # safetensors raises its own error types for bad files
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or "
                              f"corrupt?): {exc}") from None


def _shape_for_weights(path: Path, meta: dict[str, str]) -> Shape:
    beside = path.parent / SHAPE_FILE
    if _SHAPE_KEY in meta:
        try:
            shape = Shape.from_dict(json.loads(meta[_SHAPE_KEY]))
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{path}: the shape in its metadata is damaged ({exc}); "
                                  f"remove the file or rewrite it from the run") from None
        if beside.is_file() and Shape.load(beside) != shape:
            raise CheckpointError(f"{path}: its metadata holds another shape than "
                                  f"{beside} ({shape.describe()} vs "
                                  f"{Shape.load(beside).describe()}); the two files come "
                                  "from different runs: put the matching shape.json beside it")
        return shape
    if beside.is_file():
        return Shape.load(beside)
    raise FileNotFoundError(f"{path}: no shape in its metadata and no {SHAPE_FILE} beside it; "
                            f"put the run's {SHAPE_FILE} next to the weights")


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> ResNet:
    """Rebuild a saved network, pruned or not, and load its weights, in eval mode.

    `path` is a run directory (holding model.safetensors and shape.json), a
    `.safetensors` file, or a training checkpoint (`train.pt` / `best.pt`).
    """
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
        state, meta = _read_safetensors(path)
        shape = _shape_for_weights(path, meta)
    else:
        ckpt = load_checkpoint(path)
        if "shape" not in ckpt or "model" not in ckpt:
            raise CheckpointError(f"{path}: not a tasprune training checkpoint (it has no "
                                  "'shape' and 'model' entries)")
        shape, state = Shape.from_dict(ckpt["shape"]), ckpt["model"]
    bad = next((k for k, v in state.items() if v.is_floating_point()
                and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise CheckpointError(f"{path}: the weights hold NaN or infinite values (first in "
                              f"{bad!r}); the training that wrote them diverged: retrain, or "
                              "load an earlier checkpoint (best.pt)")
    model = build_model(shape)
    load_state_checked(model, state, str(path))
    return model.to(device).eval()


load_pruned = load_model  # the name of earlier versions

Teacher = ResNet | Mapping[str, torch.Tensor] | str | os.PathLike[str]


def as_teacher(teacher: Teacher | None, shape_full: Shape | PlanShape) -> nn.Module | None:
    """A teacher as every phase takes it: a model, a state dict of the unpruned network
    `shape_full`, or the path of a saved model (`load_model`); None stays None."""
    if teacher is None or isinstance(teacher, ResNet):
        return teacher
    if isinstance(shape_full, PlanShape):
        if isinstance(teacher, nn.Module):
            return teacher
        raise TypeError("a network of your own is searched from the module itself: pass the "
                        f"model (with its trained weights), not a {type(teacher).__name__}")
    if isinstance(teacher, (str, os.PathLike)):
        return load_model(teacher)
    if isinstance(teacher, Mapping):
        model = build_model(shape_full)
        load_state_checked(model, teacher, "the teacher's state dict")
        return model.eval()
    raise TypeError(f"a teacher is a tasprune model, a state dict or the path of a saved "
                    f"model, not {type(teacher).__name__}")


def _example_input(model: nn.Module, batch: int = 1) -> torch.Tensor:
    s = model.shape  # type: ignore[union-attr]
    param = next(model.parameters())
    return torch.randn(batch, s.in_channels, s.resolution, s.resolution, device=param.device)


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
        # neither concerns a ResNet
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


def export_torchscript(model: ResNet, path: str | os.PathLike[str]) -> Path:
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


def export_model(model: ResNet, fmt: str, path: str | os.PathLike[str]) -> Path:
    """Export in `fmt` ("onnx", "torchscript" or "pt2") to `path`."""
    if fmt == "onnx":
        return export_onnx(model, path)
    if fmt == "torchscript":
        return export_torchscript(model, path)
    if fmt == "pt2":
        return export_pt2(model, path)
    raise ValueError(f"unknown export format {fmt!r}; expected one of {sorted(EXPORT_FORMATS)}")
