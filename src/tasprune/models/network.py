"""A network as every phase takes it: built from its name for the data, traced into its
layer plan, pruned to a `PlanShape`; and the `Shape` view of the built-in ResNets.

`full_network(spec)` builds the unpruned module of a `ModelSpec` (and loads weights),
traces its plan (with free shortcuts for the TAS paper's space, `free=True`) and marks
the module with the plan's full shape. `instantiate(shape)` builds the pruned network of
a shape afresh. `from_view` and `to_view` turn the widths of a built-in ResNet's `Shape`
(a TAS .config, an earlier tasprune's shape.json) into a `PlanShape` and back.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from tasprune.models.registry import (
    build,
    default_classes,
    default_resolution,
    is_builtin_resnet,
)
from tasprune.models.shape import Shape
from tasprune.net.plan import LayerPlan, ModelSpec, PlanShape
from tasprune.net.surgery import build_pruned, mark
from tasprune.net.trace import PlanError, trace_plan


def example_input(input_shape: tuple[int, int, int], batch: int = 2) -> torch.Tensor:
    """A zero batch of images of `input_shape` (C, H, W)."""
    return torch.zeros(batch, *input_shape)


def network_plan(model: nn.Module, spec: ModelSpec, free: bool = False) -> LayerPlan:
    """The plan of `model` (built for `spec`), checked against the data it is for."""
    shape = (spec.in_channels, spec.resolution, spec.resolution)
    plan, _ = trace_plan(model, example_input(shape), free_shortcuts=free, source=spec)
    if plan.num_classes != spec.num_classes:
        what = f"--model {spec.name}" if spec.name else type(model).__name__
        raise PlanError(f"{what} gives {plan.num_classes} outputs per image but the data has "
                        f"{spec.num_classes} classes; build its classifier for "
                        f"{spec.num_classes} (does the factory pass num_classes= to it?)")
    return plan


def full_network(spec: ModelSpec, free: bool = False,
                 weights: str | os.PathLike[str] | None = None, seed: int | None = None,
                 say: Callable[[str], None] | None = None) -> tuple[nn.Module, LayerPlan]:
    """The unpruned network of `spec` (freshly initialised under `seed` when given, then
    `weights` loaded) and its plan; the module carries the plan's full shape."""
    if spec.name is None:
        raise ValueError("this network was given as a module in Python; pass the module "
                         "(or its factory) again to rebuild it")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = build(spec.name, spec.num_classes, spec.in_channels, spec.resolution,
                      weights, say)
    plan = network_plan(model, spec, free)
    return mark(model, plan.full()), plan


def create_model(name: str, num_classes: int | None = None, in_channels: int | None = None,
                 resolution: int | None = None, seed: int | None = None) -> nn.Module:
    """The unpruned network of a registered name or a factory, freshly initialised, with its
    shape (`tasprune_shape`), e.g. create_model("resnet56", num_classes=10) or
    create_model("mobilenet_v2", 10, 1, 28). Classes, channels and input size default to
    the model's own (1000 classes at 224 px for the ImageNet ResNets; 10, 3 and 32 for the
    others); see `tasprune.list_models()` for the names."""
    spec = ModelSpec(name, default_classes(name) if num_classes is None else num_classes,
                     3 if in_channels is None else in_channels,
                     default_resolution(name) if resolution is None else resolution)
    return full_network(spec, seed=seed)[0]


def instantiate(shape: PlanShape, seed: int | None = None) -> nn.Module:
    """The pruned network of `shape`, freshly initialised (under `seed` when given)."""
    spec = shape.plan.source
    if spec is None or spec.name is None:
        raise ValueError("the shape does not say which network it prunes (it was searched on "
                         "a module given in Python); build it with "
                         "tasprune.net.surgery.build_pruned(model, shape)")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = build(spec.name, spec.num_classes, spec.in_channels, spec.resolution)
        if shape.is_full:
            return mark(model, shape)
        return build_pruned(model, shape)


def build_model(shape: PlanShape | Shape, seed: int | None = None) -> nn.Module:
    """The network of a shape (a PlanShape, or a built-in ResNet's Shape), freshly
    initialised (under `seed` when given)."""
    return instantiate(shape if isinstance(shape, PlanShape) else from_view(shape), seed)


# the view of the built-in ResNets -------------------------------------------------------
def _slot_names(shape: Shape) -> list[str]:
    """The conv writing every width slot of a built-in ResNet, in slot order."""
    names = ["conv1"]
    for s, stage in enumerate(shape.skeleton.stages):
        for blk in stage:
            names.extend(f"layer{s + 1}.{blk.index}.conv{j + 1}" for j in range(len(blk.convs)))
    return names


def _stage_of(plan: LayerPlan, stage: int) -> int:
    """The ResNet stage (0-based) of a plan stage (named layer<s>.<b>)."""
    name = plan.blocks[plan.stages[stage][0]].name
    return int(name.split(".")[0].removeprefix("layer")) - 1


def view_plan(shape: Shape, free: bool | None = None) -> LayerPlan:
    """The plan of the unpruned built-in ResNet a Shape prunes: with free shortcuts (any
    widths) unless `free` says otherwise; by default coupled for an unpruned Shape, whose
    streams keep one width (the plan `tasprune train --model` gives it)."""
    spec = ModelSpec(shape.model_name, shape.num_classes, shape.in_channels, shape.resolution)
    _, plan = full_network(spec, free=not shape.is_full if free is None else free)
    return plan


def from_view(shape: Shape, plan: LayerPlan | None = None) -> PlanShape:
    """The PlanShape of a built-in ResNet's Shape, on `plan` (default: `view_plan`); a
    coupled plan refuses widths that differ along a residual stream."""
    plan = view_plan(shape) if plan is None else plan
    width: dict[int, int] = {}
    for name, w in zip(_slot_names(shape), shape.widths, strict=True):
        g = plan.layer(name).writes
        assert g is not None
        if width.setdefault(g, w) != w:
            raise ValueError(f"{name}: width {w} differs from {width[g]} of another conv of "
                             f"its residual stream, which this search space gives one width")
    blocks = tuple(shape.blocks[_stage_of(plan, s)] for s in range(len(plan.stages)))
    return PlanShape(plan, tuple(width[g] for g in plan.searched), blocks)


def to_view(shape: PlanShape) -> Shape:
    """The Shape (TAS .config view) of a built-in ResNet's PlanShape."""
    spec = shape.plan.source
    if spec is None or not is_builtin_resnet(spec.name):
        raise ValueError("only the built-in ResNets have a TAS shape view")
    assert spec.name is not None
    full = Shape.full(spec.name, spec.num_classes, spec.in_channels, spec.resolution)
    widths = shape.group_widths()
    plan = shape.plan
    slots = tuple(widths[plan.layer(name).writes or 0] for name in _slot_names(full))
    blocks = list(full.blocks)
    for s, d in enumerate(shape.blocks):
        blocks[_stage_of(plan, s)] = d
    return full.replace(widths=slots, blocks=tuple(blocks))
