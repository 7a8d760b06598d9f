"""The layer plan: one description of a prunable network that its cost, its supernet and
its pruned form are all read from.

A plan lists every Conv2d, BatchNorm2d and Linear of a network (by module path) with
the *channel groups* it reads and writes. A group is a set of channels that must keep
the same width: the output of a conv together with everything tied to it (a residual
add ties both operands' groups; a depthwise conv writes the group it reads; a
BatchNorm normalises the group it reads). A concatenation is a tensor whose channels
are several groups in a row, so a layer `reads` a tuple of groups. Fixed groups keep
their full width: the image channels, the network's outputs, the channels of a
grouped (non-depthwise) conv. Residual blocks whose shortcut is the identity can be
skipped (replaced by an identity); runs of such blocks that are siblings in one
container form the *stages* of the depth search, which keep their first k blocks.

`tasprune.trace` builds a plan for any traceable `nn.Module`. `PlanShape` is a search
result on a plan (a width per searched group, a kept-block count per stage): it counts
its FLOPs and parameters with the same function that gives the differentiable
expectation under width and depth distributions (`plan_cost`), and says which width
every module of the pruned network has (`module_widths`).

Cost convention (the TAS paper's): FLOPs are multiply-accumulates of every conv and
linear layer; a conv counts `c_in / groups * c_out * kh * kw * H_out * W_out` (its bias
is not counted), a linear `in * out + out` with a bias. BatchNorm, activations, pooling
and additions are not counted. Params count every learnable tensor: conv and linear
weights and biases, BatchNorm weight and bias.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tasprune._io import atomic_write_text, read_json
from tasprune.flops import DepthDist, WidthDist

Number = int | float | torch.Tensor
FORMAT = "tasprune.plan-shape/1"


@dataclass(frozen=True)
class Group:
    """Channels pruned as one: `name` (the first module that writes them, or "input"),
    `size` in the unpruned network, and why it is `fixed` ("" when it is searched)."""

    name: str
    size: int
    fixed: str = ""


@dataclass(frozen=True)
class PlanLayer:
    """One Conv2d, BatchNorm2d or Linear.

    `reads`: the groups of its input channels, in order (several for a concatenation);
    `writes`: its output group (None for BatchNorm and depthwise convs, which keep the
    channels they read); `kernel`: kh * kw; `pixels`: output positions (H_out * W_out;
    1 for a linear); `spatial`: a linear's input positions per channel (a flattened
    map); `block`: the skippable block it belongs to (index into `LayerPlan.blocks`)."""

    name: str
    kind: str  # "conv", "bn" or "linear"
    reads: tuple[int, ...]
    writes: int | None
    kernel: int = 1
    pixels: int = 1
    groups: int = 1
    depthwise: bool = False
    bias: bool = False
    spatial: int = 1
    block: int | None = None
    normed: bool = False  # a conv whose one consumer is a BatchNorm


@dataclass(frozen=True)
class Block:
    """A skippable residual block: its module path, its stage and its place in it."""

    name: str
    stage: int
    index: int


@dataclass(frozen=True)
class LayerPlan:
    """Groups, layers and skippable blocks of a network (see the module docstring)."""

    groups: tuple[Group, ...]
    layers: tuple[PlanLayer, ...]
    blocks: tuple[Block, ...]
    input_shape: tuple[int, int, int]  # C, H, W of one example
    num_classes: int  # channels of the network's output

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    @property
    def resolution(self) -> int:
        return self.input_shape[1]

    @property
    def searched(self) -> tuple[int, ...]:
        """The groups whose width is searched, in plan order."""
        return tuple(g for g, group in enumerate(self.groups) if not group.fixed)

    @property
    def stages(self) -> tuple[tuple[int, ...], ...]:
        """Block indices of every stage."""
        out: dict[int, list[int]] = {}
        for b, block in enumerate(self.blocks):
            out.setdefault(block.stage, []).append(b)
        return tuple(tuple(out[s]) for s in sorted(out))

    def stage_name(self, stage: int) -> str:
        names = [self.blocks[b].name for b in self.stages[stage]]
        return names[0] if len(names) == 1 else f"{names[0]}..{names[-1].rsplit('.', 1)[-1]}"

    def full(self) -> PlanShape:
        """The unpruned network: every searched group at full width, every block kept."""
        return PlanShape(self, tuple(self.groups[g].size for g in self.searched),
                         tuple(len(s) for s in self.stages))

    def describe(self) -> str:
        return (f"{len(self.layers)} layers, {len(self.searched)} searched channel groups, "
                f"{len(self.blocks)} skippable blocks in {len(self.stages)} stages")


# cost ----------------------------------------------------------------------------------
def plan_cost(plan: LayerPlan, mean: Callable[[int], Number],
              product: Callable[[int, int], Number], keep: Callable[[int], Number],
              what: str) -> Number:
    """FLOPs (`what` "flops") or params ("params") of a plan, from the mean width of every
    group, E[width(a) * width(b)] of two groups and the probability that block b is kept.
    Ints give the exact count; tensors of expectations the differentiable expected one."""
    total: Number = 0
    for layer in plan.layers:
        p = 1 if layer.block is None else keep(layer.block)
        if isinstance(p, int) and p == 0:
            continue
        out = 0 if layer.writes is None else mean(layer.writes)
        if layer.kind == "bn":
            value = 0 if what == "flops" else 2 * sum(mean(g) for g in layer.reads)
        elif layer.depthwise:
            c = sum(mean(g) for g in layer.reads)
            value = c * layer.kernel * (layer.pixels if what == "flops" else 1)
            value = value + (c if layer.bias and what == "params" else 0)
        else:
            assert layer.writes is not None
            cross = sum(product(g, layer.writes) for g in layer.reads)
            if layer.groups > 1:  # fixed groups: exact ints
                cross = cross // layer.groups
            macs = cross * layer.kernel * layer.spatial
            if what == "flops":
                value = macs * layer.pixels + (out if layer.kind == "linear" and layer.bias
                                                else 0)
            else:
                value = macs + (out if layer.bias else 0)
        total = total + p * value
    return total


def _exact(shape: PlanShape, what: str) -> int:
    widths = shape.group_widths()
    kept = shape.kept_blocks()
    return int(plan_cost(shape.plan, widths.__getitem__, lambda a, b: widths[a] * widths[b],
                         lambda b: int(b in kept), what))


def expected_plan_cost(plan: LayerPlan, widths: Sequence[WidthDist],
                       depths: Sequence[DepthDist], what: str = "flops") -> torch.Tensor:
    """E[cost] under independent width distributions of the searched groups (plan order)
    and depth distributions of the stages (kept-block counts): differentiable, and equal
    to the exact count at one-hot distributions."""
    dist = dict(zip(plan.searched, widths, strict=True))
    means = {g: d.mean() for g, d in dist.items()}

    def mean(g: int) -> Number:
        return means[g] if g in means else plan.groups[g].size

    def product(a: int, b: int) -> Number:
        if a == b and a in dist:
            d = dist[a]
            return (d.values * d.values * d.probs).sum()
        return mean(a) * mean(b)

    def keep(b: int) -> Number:
        block = plan.blocks[b]
        return depths[block.stage].keep_prob(block.index)

    total = plan_cost(plan, mean, product, keep, what)
    assert isinstance(total, torch.Tensor)
    return total


def expected_plan_flops(plan: LayerPlan, widths: Sequence[WidthDist],
                        depths: Sequence[DepthDist]) -> torch.Tensor:
    return expected_plan_cost(plan, widths, depths, "flops")


def expected_plan_params(plan: LayerPlan, widths: Sequence[WidthDist],
                         depths: Sequence[DepthDist]) -> torch.Tensor:
    return expected_plan_cost(plan, widths, depths, "params")


# the search result ---------------------------------------------------------------------
@dataclass(frozen=True)
class PlanShape:
    """A pruned form of a planned network: the width of every searched group (in
    `plan.searched` order) and the number of blocks every stage keeps (its first ones)."""

    plan: LayerPlan = field(compare=False, repr=False)
    widths: tuple[int, ...]
    blocks: tuple[int, ...]

    def __post_init__(self) -> None:
        plan = self.plan
        if len(self.widths) != len(plan.searched):
            raise ValueError(f"{len(self.widths)} widths for {len(plan.searched)} searched "
                             "channel groups")
        if len(self.blocks) != len(plan.stages):
            raise ValueError(f"{len(self.blocks)} block counts for {len(plan.stages)} stages")
        for g, w in zip(plan.searched, self.widths, strict=True):
            if not 1 <= w <= plan.groups[g].size:
                raise ValueError(f"group {plan.groups[g].name}: width {w} is not in [1, "
                                 f"{plan.groups[g].size}]")
        for s, k in enumerate(self.blocks):
            if not 0 <= k <= len(plan.stages[s]):
                raise ValueError(f"stage {plan.stage_name(s)}: keeps {k} of "
                                 f"{len(plan.stages[s])} blocks")

    # what the search loop reads of a shape ----------------------------------------------
    @property
    def skeleton(self) -> LayerPlan:
        """The plan (named as a ResNet Shape's skeleton, which the cost functions take)."""
        return self.plan

    @property
    def is_full(self) -> bool:
        return self == self.plan.full()

    @property
    def in_channels(self) -> int:
        return self.plan.in_channels

    @property
    def num_classes(self) -> int:
        return self.plan.num_classes

    @property
    def resolution(self) -> int:
        return self.plan.resolution

    def replace(self, **changes: Any) -> PlanShape:
        return PlanShape(self.plan, tuple(changes.get("widths", self.widths)),
                         tuple(changes.get("blocks", self.blocks)))

    def describe(self) -> str:
        return (f"planned network ({len(self.widths)} channel groups, blocks "
                f"{'-'.join(str(k) for k in self.blocks) or 'none'})")

    def count(self, what: str) -> int:
        """Exact FLOPs ("flops") or parameters ("params")."""
        return _exact(self, what)

    # widths of the pruned network ------------------------------------------------------
    def group_widths(self) -> list[int]:
        """The width of every group of the plan (fixed ones at full size)."""
        out = [g.size for g in self.plan.groups]
        for g, w in zip(self.plan.searched, self.widths, strict=True):
            out[g] = w
        return out

    def kept_blocks(self) -> set[int]:
        stages = self.plan.stages
        return {b for s, k in enumerate(self.blocks) for b in stages[s][:k]}

    def skipped(self) -> list[str]:
        """Module paths of the blocks the pruned network replaces by identities."""
        kept = self.kept_blocks()
        return [blk.name for b, blk in enumerate(self.plan.blocks) if b not in kept]

    def used_groups(self) -> set[int]:
        """Positions (in `widths`) of the searched groups a layer outside the skipped
        blocks writes or reads."""
        kept = self.kept_blocks()
        used: set[int] = set()
        for layer in self.plan.layers:
            if layer.block is None or layer.block in kept:
                used.update(layer.reads)
                if layer.writes is not None:
                    used.add(layer.writes)
        return {i for i, g in enumerate(self.plan.searched) if g in used}

    def module_widths(self) -> dict[str, dict[str, int]]:
        """Every planned module outside the skipped blocks with its pruned sizes: convs
        `in_channels`, `out_channels` (and `groups` for depthwise ones), BatchNorms
        `num_features`, linears `in_features`, `out_features`."""
        widths, kept = self.group_widths(), self.kept_blocks()
        out: dict[str, dict[str, int]] = {}
        for layer in self.plan.layers:
            if layer.block is not None and layer.block not in kept:
                continue
            cin = sum(widths[g] for g in layer.reads)
            cout = cin if layer.writes is None else widths[layer.writes]
            if layer.kind == "bn":
                out[layer.name] = {"num_features": cin}
            elif layer.kind == "linear":
                out[layer.name] = {"in_features": cin * layer.spatial, "out_features": cout}
            else:
                out[layer.name] = {"in_channels": cin, "out_channels": cout}
                if layer.depthwise:
                    out[layer.name]["groups"] = cin
        return out

    # files ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON form: the widths by group name, the kept blocks by stage, and what rebuilds
        the pruned network without tracing (per-module sizes, skipped blocks)."""
        plan = self.plan
        return {
            "format": FORMAT,
            "groups": {plan.groups[g].name: w for g, w in zip(plan.searched, self.widths,
                                                                strict=True)},
            "full_groups": {plan.groups[g].name: plan.groups[g].size for g in plan.searched},
            "stages": {plan.stage_name(s): k for s, k in enumerate(self.blocks)},
            "input_shape": list(plan.input_shape),
            "modules": self.module_widths(),
            "skipped": self.skipped(),
        }

    @classmethod
    def from_dict(cls, plan: LayerPlan, data: dict[str, Any]) -> PlanShape:
        """The shape a `to_dict` of the same plan describes (checked against the plan)."""
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} shape (format {data.get('format')!r})")
        names = {plan.groups[g].name: g for g in plan.searched}
        groups = data["groups"]
        if set(groups) != set(names):
            missing, extra = sorted(set(names) - set(groups)), sorted(set(groups) - set(names))
            raise ValueError("the shape was searched on another network: channel groups "
                             f"missing {missing[:3]}, unknown {extra[:3]}")
        widths = tuple(int(groups[plan.groups[g].name]) for g in plan.searched)
        stages = data["stages"]
        blocks = tuple(int(stages.get(plan.stage_name(s), len(plan.stages[s])))
                       for s in range(len(plan.stages)))
        return cls(plan, widths, blocks)

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")


def read_module_widths(path: str | os.PathLike[str]) -> tuple[dict[str, dict[str, int]],
                                                                list[str]]:
    """The per-module sizes and skipped blocks of a saved PlanShape (no plan needed)."""
    data = read_json(Path(path))
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a pruned-model shape of a user network ({FORMAT})")
    return data["modules"], list(data["skipped"])


def layers_of(plan: LayerPlan, kind: str) -> Iterator[PlanLayer]:
    return (layer for layer in plan.layers if layer.kind == kind)
