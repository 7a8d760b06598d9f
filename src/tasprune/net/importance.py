"""How important every channel of a planned network is, and the reordering that puts the
important ones first.

A score is given per channel of every searched group, from the layers that *write*
the group (a conv or linear whose output is those channels; the group of a residual
stream has several). Each writer's scores are normalised to sum 1 before they are
summed, so every writer votes equally whatever its scale:

* `l1_scores`: the L1 norm of each writer's row, per weight (mean |w|; Li et al.,
  "Pruning Filters for Efficient ConvNets", 2017);
* `taylor_scores`: the first-order Taylor estimate of how much the loss changes when the
  channel is removed, |sum over pixels of a * dL/da| summed over images, where `a` is
  the writer's output after its BatchNorm (Molchanov et al., "Importance Estimation for
  Neural Network Pruning", CVPR 2019).

`reorder(model, plan, scores)` permutes the channels of every group by descending score
without changing the function the network computes, so the first c channels of a group,
which a pruned network keeps, are its best c. Groups joined by a free shortcut are one
identity in the unpruned network, so they share one permutation (their scores summed).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from tasprune.net.plan import LayerPlan, PlanLayer, PlanShape
from tasprune.net.surgery import carried_shape, shrink

Scores = dict[int, torch.Tensor]


def _writers(plan: LayerPlan) -> list[PlanLayer]:
    searched = set(plan.searched)
    return [layer for layer in plan.layers if layer.kind != "bn" and layer.when is None
            and layer.writes in searched]


def _normalised(values: torch.Tensor) -> torch.Tensor:
    values = values.detach().double().cpu()
    return values / values.sum().clamp_min(1e-12)


def _add(scores: Scores, g: int, values: torch.Tensor) -> None:
    scores[g] = scores[g] + values if g in scores else values


def l1_scores(model: nn.Module, plan: LayerPlan, normalise: bool = True) -> Scores:
    """Per searched group: the mean |weight| of every writer's row per channel (each
    writer normalised to sum 1 unless `normalise` is false: then the writers' raw means
    are averaged, comparable across groups)."""
    scores: Scores = {}
    count: dict[int, int] = {}
    for layer in _writers(plan):
        w = model.get_submodule(layer.name).weight.detach().abs().flatten(1).mean(1)
        assert layer.writes is not None
        _add(scores, layer.writes, _normalised(w) if normalise else w.double().cpu())
        count[layer.writes] = count.get(layer.writes, 0) + 1
    if not normalise:
        scores = {g: s / count[g] for g, s in scores.items()}
    return scores


def taylor_scores(model: nn.Module, plan: LayerPlan,
                  batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Scores:
    """Per searched group: the Taylor importance of every writer's output channels (see
    the module docstring) on `batches` of (images, labels) on the model's device, with the
    cross-entropy loss."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = []
    writers = _writers(plan)
    for layer in writers:
        where = layer.norm or layer.name

        def keep(_: nn.Module, __: Any, out: torch.Tensor, name: str = layer.name) -> None:
            out.retain_grad()
            outputs[name] = out
        hooks.append(model.get_submodule(where).register_forward_hook(keep))
    was_training = model.training
    model.eval()
    raw: dict[str, torch.Tensor] = {}
    try:
        for images, labels in batches:
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(images), labels).backward()
            for name, out in outputs.items():
                assert out.grad is not None
                dims = tuple(range(2, out.dim()))
                s = (out * out.grad).sum(dims).abs().sum(0).detach() if dims else \
                    (out * out.grad).abs().sum(0).detach()
                raw[name] = raw[name] + s if name in raw else s
            outputs.clear()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    scores: Scores = {}
    for layer in writers:
        if layer.name in raw:
            assert layer.writes is not None
            _add(scores, layer.writes, _normalised(raw[layer.name]))
    return scores


def linked(plan: LayerPlan) -> dict[int, int]:
    """Group -> the first group of its identity stream: groups joined by a free shortcut
    are one tensor in the unpruned network."""
    parent = list(range(len(plan.groups)))

    def find(g: int) -> int:
        while parent[g] != g:
            g = parent[g]
        return g

    for layer in plan.layers:
        if layer.when is not None:
            a, b = (find(g) for g in layer.when)
            parent[max(a, b)] = min(a, b)
    return {g: find(g) for g in range(len(plan.groups))}


def orders(plan: LayerPlan, scores: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """The permutation (most important first) of every group that has scores; linked groups
    (see `linked`) share one, from their summed scores."""
    root = linked(plan)
    summed: Scores = {}
    for g, s in scores.items():
        _add(summed, root[g], s.detach().double().cpu())
    by_root = {r: torch.argsort(s, descending=True, stable=True) for r, s in summed.items()}
    return {g: by_root[r] for g, r in root.items() if r in by_root}


def reorder(model: nn.Module, plan: LayerPlan, scores: Mapping[int, torch.Tensor]
            ) -> nn.Module:
    """A copy of the unpruned `model` computing the same function with the channels of
    every scored group sorted by descending score (see the module docstring)."""
    order = orders(plan, scores)
    out = copy.deepcopy(model)
    full = [g.size for g in plan.groups]
    with torch.no_grad():
        for layer in plan.layers:
            if layer.when is not None:
                continue  # no such layer in the unpruned network
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
                if name == "weight" and layer.groups == 1:
                    t.copy_(t[:, inputs.to(t.device)])
    return out


def inherit(teacher: nn.Module, shape: PlanShape) -> nn.Module:
    """The network of `shape` initialised from its unpruned `teacher`: every group keeps the
    teacher's channels of largest L1 norm (`l1_scores`), a grown shortcut projection starts
    as the teacher's identity on the channels both ends keep."""
    own = carried_shape(teacher)
    if own is not None and not own.is_full:
        raise ValueError("weight inheritance needs the unpruned teacher; this one is pruned "
                         f"({own.describe()})")
    plan = shape.plan
    for layer in plan.layers:
        if layer.when is not None or layer.kind == "bn":
            continue
        try:
            weight = teacher.get_submodule(layer.name).weight
        except AttributeError:
            raise ValueError(f"cannot inherit weights: the teacher has no {layer.name}; it is "
                             "another network than the one the shape prunes (give that "
                             "network as teacher, or drop --inherit)") from None
        size = plan.groups[layer.writes].size if layer.writes is not None else None
        if size is not None and weight.shape[0] != size:
            raise ValueError(f"cannot inherit weights: the teacher's {layer.name} has "
                             f"{weight.shape[0]} outputs, the network the shape prunes "
                             f"{size}; give that network as teacher, or drop --inherit")
    widths = shape.group_widths()
    for g in plan.searched:
        if widths[g] > plan.groups[g].size:
            raise ValueError(f"cannot inherit weights: {plan.groups[g].name} keeps "
                             f"{widths[g]} channels but the teacher has only "
                             f"{plan.groups[g].size} there; train this shape from scratch "
                             "(drop --inherit)")
    return shrink(reorder(teacher.cpu(), plan, l1_scores(teacher, plan)), shape)
