"""A network with smaller layers: what a `PlanShape` turns the unpruned module into.

`build_pruned(model, shape)` copies the unpruned module and replaces every planned
Conv2d, BatchNorm2d and Linear by one of the pruned size (same class, same settings),
every skipped block by `nn.Identity`, and grows the projection of every free shortcut
whose ends differ in width; the new weights are initialised as the network initialises
its own (`reinitialise`). `shrink(model, shape)` does the same with weights: the kept
channels of a group are its first ones, so every tensor is a slice of the full one, of
`model`'s own or of a full-size state dict in its layout; a grown projection starts as
the identity on the channels both ends keep (the unpruned network's shortcut).

Every module built here carries its shape as `module.tasprune_shape`, which saving,
exporting and evaluating read.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from tasprune.net.plan import PlanLayer, PlanShape

SHAPE_ATTR = "tasprune_shape"


def carried_shape(model: nn.Module) -> PlanShape | None:
    """The shape a module built by tasprune carries (`tasprune_shape`), or None."""
    shape = getattr(model, SHAPE_ATTR, None)
    return shape if isinstance(shape, PlanShape) else None


def shape_of(model: nn.Module) -> PlanShape:
    """The shape a module built by tasprune carries (`tasprune_shape`)."""
    shape = carried_shape(model)
    if shape is None:
        raise ValueError(f"{type(model).__name__} was not built by tasprune (it has no "
                         f"{SHAPE_ATTR}); load it with tasprune.load_model or build it "
                         "with tasprune.create_model")
    return shape


def mark(model: nn.Module, shape: PlanShape) -> nn.Module:
    """Attach `shape` to `model` (see the module docstring); returns `model`."""
    object.__setattr__(model, SHAPE_ATTR, shape)
    return model


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at `path` (dotted) inside `model`."""
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _resized(old: nn.Module, sizes: Mapping[str, int], path: str) -> nn.Module:
    """A fresh module of `old`'s class and settings with the given sizes."""
    param = next(old.parameters(), None)
    factory = {"device": param.device, "dtype": param.dtype} if param is not None else {}
    if type(old) is nn.Conv2d:
        assert isinstance(old, nn.Conv2d)
        return nn.Conv2d(sizes["in_channels"], sizes["out_channels"], old.kernel_size,
                         old.stride, old.padding, old.dilation,  # type: ignore[arg-type]
                         sizes.get("groups", old.groups), old.bias is not None,
                         old.padding_mode, **factory)
    if type(old) is nn.BatchNorm2d:
        assert isinstance(old, nn.BatchNorm2d)
        return nn.BatchNorm2d(sizes["num_features"], old.eps, old.momentum, old.affine,
                              old.track_running_stats, **factory)
    if type(old) is nn.Linear:
        assert isinstance(old, nn.Linear)
        return nn.Linear(sizes["in_features"], sizes["out_features"], old.bias is not None,
                         **factory)
    raise ValueError(f"{path}: a {type(old).__name__} cannot be resized (only Conv2d, "
                     "BatchNorm2d and Linear)")


def reinitialise(model: nn.Module) -> nn.Module:
    """Initialise every weight anew: the network's own `reset_parameters` when it has one
    (tasprune's ResNets: He et al. 2015), else every submodule's."""
    reset = getattr(model, "reset_parameters", None)
    if callable(reset):
        reset()
        return model
    for m in model.modules():
        if m is not model and callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()  # type: ignore[operator]
    return model


def _shortcut_path(layer: PlanLayer) -> str:
    return layer.name.rsplit(".", 1)[0]


def _resize(model: nn.Module, shape: PlanShape) -> nn.Module:
    """`model` (a copy of the unpruned network) resized in place to `shape`, every new
    module freshly initialised by its class."""
    plan = shape.plan
    for path in shape.skipped():
        set_module(model, path, nn.Identity())
    sizes = shape.module_widths()
    for layer in plan.layers:
        if layer.name not in sizes:
            continue
        if layer.when is not None:
            if layer.kind == "conv":  # grow the block's projection: conv + BN
                block_path, _, attr = _shortcut_path(layer).rpartition(".")
                block = model.get_submodule(block_path)
                cin, cout = sizes[layer.name]["in_channels"], sizes[layer.name]["out_channels"]
                setattr(block, attr, block.make_shortcut(cin, cout))  # type: ignore[operator]
            continue
        try:
            old = model.get_submodule(layer.name)
        except AttributeError:
            raise ValueError(f"the shape names the module {layer.name}, which this network "
                             "does not have: it was searched on another network") from None
        set_module(model, layer.name, _resized(old, sizes[layer.name], layer.name))
    return model


def build_pruned(model: nn.Module, shape: PlanShape) -> nn.Module:
    """A copy of the unpruned `model` pruned to `shape`, freshly initialised."""
    pruned = _resize(copy.deepcopy(model), shape)
    return mark(reinitialise(pruned), shape)


def kept_inputs(shape: PlanShape, layer: PlanLayer, widths: list[int], full: list[int]
                ) -> torch.Tensor:
    """Indices of a layer's kept input channels (input features of a linear) in its full
    input: the first ones of every group it reads, group after group."""
    parts, offset = [], 0
    for i, g in enumerate(layer.reads):
        parts.append(torch.arange(offset, offset + shape.read_width(layer, i, widths)))
        offset += full[g]
    idx = torch.cat(parts)
    if layer.spatial > 1:  # a flattened map: channel c is features c*s .. c*s+s-1
        idx = (idx[:, None] * layer.spatial + torch.arange(layer.spatial)).flatten()
    return idx


def cut_layer(shape: PlanShape, layer: PlanLayer, tensors: Mapping[str, torch.Tensor],
              widths: list[int], full: list[int]) -> dict[str, torch.Tensor]:
    """The pruned tensors (weight, bias, BatchNorm statistics) of one layer from its full
    ones."""
    kept = kept_inputs(shape, layer, widths, full)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name == "num_batches_tracked":
            out[name] = t.clone()
        elif layer.kind == "bn" or layer.depthwise or name == "bias" and layer.writes is None:
            out[name] = t[kept.to(t.device)].clone()
        else:
            assert layer.writes is not None
            rows = t[: widths[layer.writes]]
            if name == "bias" or layer.groups > 1:  # grouped: every input channel is kept
                out[name] = rows.clone()
            else:
                out[name] = rows[:, kept.to(t.device)].clone()
    return out


def _identity_shortcut(conv: nn.Module, bn: nn.Module) -> None:
    """The unpruned network's identity, on the channels both ends keep (BatchNorm exactly
    the identity in eval mode)."""
    with torch.no_grad():
        w = conv.weight  # type: ignore[union-attr]
        w.copy_(torch.eye(w.shape[0], w.shape[1], dtype=w.dtype)[:, :, None, None])
        bn.weight.fill_(1.0)  # type: ignore[union-attr]
        bn.bias.zero_()  # type: ignore[union-attr]
        bn.running_mean.zero_()  # type: ignore[union-attr]
        bn.running_var.fill_(1.0 - bn.eps)  # type: ignore[union-attr, operator]


def shrink(model: nn.Module, shape: PlanShape,
           state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A copy of the unpruned `model` pruned to `shape`, its weights sliced from `state` (a
    full-size state dict in `model`'s layout; a free shortcut's projection from its own
    full-size entries when `state` has them) or from `model`'s own."""
    state = model.state_dict() if state is None else state
    plan = shape.plan
    widths, full = shape.group_widths(), [g.size for g in plan.groups]
    pruned = _resize(copy.deepcopy(model), shape)
    kept = shape.kept_blocks()
    with torch.no_grad():
        for layer in plan.layers:
            if not shape.active(layer, widths, kept):
                continue
            module = pruned.get_submodule(layer.name)
            prefix = layer.name + "."
            tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)
                       and "." not in k[len(prefix):]}
            if layer.when is not None and not tensors:
                if layer.kind == "conv":
                    assert layer.norm is not None
                    _identity_shortcut(module, pruned.get_submodule(layer.norm))
                continue
            for name, t in cut_layer(shape, layer, tensors, widths, full).items():
                getattr(module, name).copy_(t)
    return mark(pruned, shape)
