"""A user's own network with smaller layers: what a `PlanShape` turns it into.

`shrink(model, shape)` copies the module and replaces every planned Conv2d, BatchNorm2d
and Linear by one of the pruned size (same class, same settings), and every skipped
block by `nn.Identity`. The kept channels of a group are its first ones (the search
moves the important ones first), so the weights are slices of the full tensors: of
`model`'s own, or of a full-size state dict in the module's layout.
`resize_modules(model, modules, skipped)` does the same without weights, from the
per-module sizes saved beside a pruned model, so loading needs no tracing.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from tasprune.plan import LayerPlan, PlanLayer, PlanShape


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _resized(old: nn.Module, sizes: Mapping[str, int], path: str) -> nn.Module:
    """A fresh module of `old`'s class and settings with the given sizes."""
    param = next(old.parameters(), None)
    factory = {"device": param.device, "dtype": param.dtype} if param is not None else {}
    if type(old) is nn.Conv2d:
        assert isinstance(old, nn.Conv2d)
        return nn.Conv2d(sizes["in_channels"], sizes["out_channels"], old.kernel_size,
                         old.stride, old.padding, old.dilation,
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
    raise ValueError(f"{path}: a {type(old).__name__} cannot be resized (the saved widths "
                     "name a Conv2d, BatchNorm2d or Linear)")


def resize_modules(model: nn.Module, modules: Mapping[str, Mapping[str, int]],
                   skipped: list[str]) -> nn.Module:
    """Replace (in place) the named modules by freshly initialised ones of the given sizes
    and the skipped blocks by identities; returns `model`."""
    for path in skipped:
        _set(model, path, nn.Identity())
    for path, sizes in modules.items():
        try:
            old = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"the saved widths name the module {path}, which this network "
                             "does not have: the factory builds another network") from None
        _set(model, path, _resized(old, sizes, path))
    return model


def kept_channels(layer: PlanLayer, widths: list[int], full: list[int]) -> torch.Tensor:
    """Indices of a layer's kept input channels (input features of a linear) in its full
    input: the first `widths[g]` of every group it reads, group after group."""
    parts, offset = [], 0
    for g in layer.reads:
        parts.append(torch.arange(offset, offset + widths[g]))
        offset += full[g]
    idx = torch.cat(parts)
    if layer.spatial > 1:  # a flattened map: channel c is features c*s .. c*s+s-1
        idx = (idx[:, None] * layer.spatial + torch.arange(layer.spatial)).flatten()
    return idx


def cut_layer(layer: PlanLayer, tensors: Mapping[str, torch.Tensor], widths: list[int],
              full: list[int]) -> dict[str, torch.Tensor]:
    """The pruned tensors (weight, bias, BatchNorm statistics) of one layer from its full
    ones."""
    kept = kept_channels(layer, widths, full)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name == "num_batches_tracked":
            out[name] = t.clone()
        elif layer.kind == "bn" or layer.depthwise or name == "bias" and layer.writes is None:
            out[name] = t[kept.to(t.device)].clone()
        else:
            assert layer.writes is not None
            rows = t[: widths[layer.writes]]
            out[name] = (rows if name == "bias" else rows[:, kept.to(t.device)]).clone()
    return out


def shrink(model: nn.Module, shape: PlanShape,
           state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A copy of `model` pruned to `shape`, its weights sliced from `state` (a full-size
    state dict in `model`'s layout) or from `model`'s own."""
    state = model.state_dict() if state is None else state
    widths, full = shape.group_widths(), [g.size for g in shape.plan.groups]
    pruned = resize_modules(copy.deepcopy(model), shape.module_widths(), shape.skipped())
    kept = shape.kept_blocks()
    with torch.no_grad():
        for layer in shape.plan.layers:
            if layer.block is not None and layer.block not in kept:
                continue
            module = pruned.get_submodule(layer.name)
            prefix = layer.name + "."
            tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)
                       and "." not in k[len(prefix):]}
            for name, t in cut_layer(layer, tensors, widths, full).items():
                getattr(module, name).copy_(t)
    return pruned


def importance(model: nn.Module, plan: LayerPlan) -> dict[int, torch.Tensor]:
    """A score per channel of every searched group: the summed |gamma| of the BatchNorms
    that normalise it where there are some (network slimming, Liu et al. 2017), else the
    L1 norms of the rows that write it (Li et al. 2017)."""
    searched = set(plan.searched)
    bn: dict[int, torch.Tensor] = {}
    rows: dict[int, torch.Tensor] = {}
    for layer in plan.layers:
        module = model.get_submodule(layer.name)
        weight = module.weight.detach().float().cpu()
        if layer.kind == "bn" and len(layer.reads) == 1 and layer.reads[0] in searched:
            g = layer.reads[0]
            bn[g] = bn.get(g, 0) + weight.abs()
        elif layer.writes is not None and layer.writes in searched:
            g = layer.writes
            rows[g] = rows.get(g, 0) + weight.abs().flatten(1).sum(1)
    return {g: bn[g] if g in bn else rows[g] for g in plan.searched if g in bn or g in rows}


def reorder(model: nn.Module, plan: LayerPlan,
            scores: Mapping[int, torch.Tensor] | None = None) -> nn.Module:
    """A copy of `model` computing the same function with the channels of every searched
    group sorted by `scores` (default `importance`), most important first: so the first
    c channels of a group, which a pruned network keeps, are its best c."""
    scores = importance(model, plan) if scores is None else scores
    order = {g: torch.argsort(s, descending=True, stable=True) for g, s in scores.items()}
    out = copy.deepcopy(model)
    full = [g.size for g in plan.groups]
    with torch.no_grad():
        for layer in plan.layers:
            module = out.get_submodule(layer.name)
            parts, offset = [], 0  # the permutation of the input positions
            for g in layer.reads:
                parts.append(offset + (order[g] if g in order else torch.arange(full[g])))
                offset += full[g]
            inputs = torch.cat(parts)
            if layer.spatial > 1:
                inputs = (inputs[:, None] * layer.spatial + torch.arange(layer.spatial)).flatten()
            for name, t in list(module.named_parameters(recurse=False)) + list(
                    module.named_buffers(recurse=False)):
                if t.dim() == 0:
                    continue
                if layer.kind == "bn" or layer.depthwise:
                    t.copy_(t[inputs.to(t.device)])
                    continue
                if layer.writes in order:
                    t.copy_(t[order[layer.writes].to(t.device)])
                if name == "weight":
                    t.copy_(t[:, inputs.to(t.device)])
    return out
