"""FLOPs and parameters of a network, per layer and in total, read from its layer plan.

Convention (the TAS paper's and its code's): FLOPs are multiply-accumulates of every
convolution and linear layer. A conv counts `c_in / groups * c_out * kh * kw * H_out *
W_out` (its bias not counted); a linear layer counts `in * out + out`. BatchNorm, ReLU,
pooling and residual additions are not counted. Params count every learnable tensor:
conv and linear weights and biases, BatchNorm weight and bias.

The count itself is `tasprune.net.plan.plan_cost`, which also gives the search its
differentiable expected cost; this module names what a user counts: a `PlanShape`, a
module tasprune built (it carries its shape), or a built-in ResNet's `Shape`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from tasprune.models.network import from_view
from tasprune.models.shape import Shape
from tasprune.net.plan import ExactWidths, LayerPlan, PlanShape, plan_cost
from tasprune.net.surgery import shape_of

Countable = PlanShape | nn.Module | Shape


def as_shape(target: Countable) -> PlanShape:
    """The PlanShape of what a user counts (see the module docstring)."""
    if isinstance(target, PlanShape):
        return target
    if isinstance(target, Shape):
        return from_view(target)
    return shape_of(target)


def count_flops(target: Countable) -> int:
    """Exact multiply-accumulates of conv and linear layers (see the module docstring)."""
    return as_shape(target).count("flops")


def count_params(target: Countable) -> int:
    """Exact learnable parameters (conv/linear weights and biases, BN affine)."""
    return as_shape(target).count("params")


@dataclass(frozen=True)
class LayerCost:
    """One layer of a pruned network: its module path, kind, widths, kernel (kh * kw),
    output size, FLOPs and parameters, and the skippable block it belongs to ("" for
    none)."""

    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel: int
    pixels: int
    flops: int
    params: int
    block: str


def layer_table(target: Countable) -> list[LayerCost]:
    """Every layer the pruned network has, with its exact cost; the FLOPs sum to
    `count_flops`."""
    shape = as_shape(target)
    plan = shape.plan
    widths, kept = shape.group_widths(), shape.kept_blocks()
    exact = ExactWidths(shape)
    rows = []
    for layer in plan.layers:
        if not shape.active(layer, widths, kept):
            continue
        one = LayerPlan(plan.groups, (replace(layer, block=None),), plan.blocks,
                        plan.input_shape, plan.num_classes)
        cin = sum(shape.read_width(layer, i, widths) for i in range(len(layer.reads)))
        cout = cin if layer.writes is None else widths[layer.writes]
        rows.append(LayerCost(
            layer.name, layer.kind, cin, cout, layer.kernel, layer.pixels,
            int(plan_cost(one, exact, "flops")), int(plan_cost(one, exact, "params")),
            "" if layer.block is None else plan.blocks[layer.block].name))
    return rows
