"""The layer plan: the one description of a prunable network that its costs, its search
space, its supernet, its pruned form and its reports are all read from.

A plan lists every Conv2d, BatchNorm2d and Linear of a network (by module path) with
the *channel groups* it reads and writes. A group is a set of channels that must keep
the same width: the output of a conv together with everything tied to it (a residual
add ties both operands' groups; a depthwise conv writes the group it reads; a
BatchNorm normalises the group it reads). A concatenation is a tensor whose channels
are several groups in a row, so a layer `reads` a tuple of groups. Fixed groups keep
their full width: the image channels, the network's outputs, the channels around a
grouped (non-depthwise) conv.

Residual blocks whose shortcut is the identity can be skipped (replaced by an
identity); runs of such blocks that follow each other in one container form the
*stages* of the depth search. A stage keeps its first d blocks, counting the block
that opens it (the one before its skippable blocks, never skipped): d in
`depth_choices(M + 1)` for M skippable blocks.

A *free shortcut* (the TAS paper's space for its ResNets) is an identity shortcut
whose two ends are searched as separate groups: the block may give back another width
than it reads, and then grows a 1x1 projection (conv + BatchNorm). In the plan that
projection is a pair of *conditional* layers (`PlanLayer.when`), which exist exactly
when the widths of the two groups differ; such a block `enters` one group and `leaves`
another, so a layer after the stage reads the group the last kept block leaves
(`PlanLayer.after`).

`tasprune.net.trace` builds a plan for any traceable `nn.Module`. `PlanShape` is a
pruned form of a planned network (a width per searched group, a block count per
stage). `plan_cost` counts FLOPs and parameters: with the widths of a shape it is the
exact count; with width and depth distributions it is the differentiable expectation.

Cost convention (the TAS paper's): FLOPs are multiply-accumulates of every conv and
linear layer; a conv counts `c_in / groups * c_out * kh * kw * H_out * W_out` (its bias
is not counted), a linear `in * out + out` with a bias. BatchNorm, activations, pooling
and additions are not counted. Params count every learnable tensor: conv and linear
weights and biases, BatchNorm weight and bias.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tasprune._io import atomic_write_text, read_json

Number = int | float | torch.Tensor
FORMAT = "tasprune.plan-shape/2"


@dataclass(frozen=True)
class ModelSpec:
    """How to build the unpruned network a plan describes: `name` (a registered model, or
    a factory as FILE.py:FACTORY or package.module:FACTORY; None for a module given in
    Python, which loading then needs again) and the data it is built for."""

    name: str | None
    num_classes: int
    in_channels: int
    resolution: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes,
                "in_channels": self.in_channels, "resolution": self.resolution}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(data.get("name"), int(data["num_classes"]), int(data["in_channels"]),
                   int(data["resolution"]))


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
    map); `block`: the skippable block it belongs to (index into `LayerPlan.blocks`);
    `norm`: the BatchNorm2d that is the one consumer of a conv's output (and `norm_of`,
    of a BatchNorm, that conv); `when`: the
    two groups whose widths must differ for the layer to exist (a free shortcut's
    projection), else None; `after`: per read, the stage whose output it reads when
    that output depends on how many blocks the stage keeps (free shortcuts), else None;
    `geometry`: a conv's (kh, kw, stride h, stride w, pad h, pad w, dilation h, dilation
    w, input h, input w), what its latency depends on besides the widths."""

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
    norm: str | None = None
    norm_of: str | None = None
    when: tuple[int, int] | None = None
    after: tuple[int | None, ...] = ()
    geometry: tuple[int, ...] = ()

    def stage_read(self, i: int) -> int | None:
        """The stage whose output read `i` is, when it depends on the stage's depth."""
        return self.after[i] if self.after else None


@dataclass(frozen=True)
class Block:
    """A skippable residual block: its module path, its stage and its place among the
    stage's skippable blocks; with a free shortcut, the group it `enters` and the one it
    `leaves` (None when it gives back the groups it reads)."""

    name: str
    stage: int
    index: int
    enters: int | None = None
    leaves: int | None = None


@dataclass(frozen=True)
class LayerPlan:
    """Groups, layers and skippable blocks of a network (see the module docstring);
    `source`: how to build the network; `free`: traced with free shortcuts."""

    groups: tuple[Group, ...]
    layers: tuple[PlanLayer, ...]
    blocks: tuple[Block, ...]
    input_shape: tuple[int, int, int]  # C, H, W of one example
    num_classes: int  # channels of the network's output
    source: ModelSpec | None = None
    free: bool = False

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

    def stage_outputs(self, stage: int) -> tuple[int | None, ...]:
        """The group of the stage's output when it keeps k skippable blocks, for k = 0..M
        (None for blocks that give back the groups they read)."""
        blocks = [self.blocks[b] for b in self.stages[stage]]
        return (blocks[0].enters, *(b.leaves for b in blocks))

    def width_bounds(self) -> tuple[int, ...]:
        """The widest every group may be, per group: its own width or that of a group a
        layer joins it to, whichever is wider (a bottleneck's inner convs may grow to the
        block's outer width, as the published TAS ResNet-50 shape has them)."""
        bounds = [group.size for group in self.groups]
        for layer in self.layers:
            if layer.writes is None:
                continue
            for g in layer.reads:
                bounds[g] = max(bounds[g], self.groups[layer.writes].size)
                bounds[layer.writes] = max(bounds[layer.writes], self.groups[g].size)
        return tuple(bounds)

    def full(self) -> PlanShape:
        """The unpruned network: every searched group at full width, every block kept."""
        return PlanShape(self, tuple(self.groups[g].size for g in self.searched),
                         tuple(len(s) + 1 for s in self.stages))

    def describe(self) -> str:
        free = (f", {sum(1 for layer in self.layers if layer.when and layer.kind == 'conv')}"
                " free shortcuts") if self.free else ""
        return (f"{len(self.layers)} layers, {len(self.searched)} searched channel groups, "
                f"{len(self.blocks)} skippable blocks in {len(self.stages)} stages{free}")

    def layer(self, name: str) -> PlanLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


# cost ----------------------------------------------------------------------------------
class Widths:
    """What a cost needs to know of the widths (ints: one shape; tensors: expectations
    under width and depth distributions)."""

    def mean(self, g: int) -> Number:
        raise NotImplementedError

    def product(self, a: int, b: int) -> Number:
        """E[width(a) * width(b)]."""
        raise NotImplementedError

    def differ(self, a: int, b: int, with_a: bool) -> Number:
        """E[width(a) * width(b) * (a != b)] (without `with_a`: E[width(b) * (a != b)])."""
        raise NotImplementedError

    def keep(self, block: int) -> Number:
        """Probability that block `block` is kept."""
        raise NotImplementedError

    def stage(self, stage: int) -> list[tuple[int, Number]]:
        """(k, probability) of every number of skippable blocks the stage may keep."""
        raise NotImplementedError


def plan_cost(plan: LayerPlan, widths: Widths, what: str) -> Number:
    """FLOPs (`what` "flops") or params ("params") of a plan under `widths`."""
    total: Number = 0
    for layer in plan.layers:
        p = 1 if layer.block is None else widths.keep(layer.block)
        if isinstance(p, int) and p == 0:
            continue
        value: Number = 0
        for reads, weight in _read_alternatives(plan, layer, widths):
            value = value + weight * _layer_cost(layer, reads, widths, what)
        total = total + p * value
    return total


def _read_alternatives(plan: LayerPlan, layer: PlanLayer, widths: Widths
                       ) -> list[tuple[tuple[int, ...], Number]]:
    """The groups a layer reads, as alternatives with their probabilities: one unless a
    read is the output of a stage whose depth decides which group it is."""
    out: list[tuple[tuple[int, ...], Number]] = [((), 1)]
    for i, g in enumerate(layer.reads):
        s = layer.stage_read(i)
        if s is None:
            out = [((*r, g), w) for r, w in out]
            continue
        groups = plan.stage_outputs(s)
        choices = [(groups[k], p) for k, p in widths.stage(s)]
        out = [((*r, h if h is not None else g), w * p) for r, w in out for h, p in choices]
    return out


def _layer_cost(layer: PlanLayer, reads: tuple[int, ...], w: Widths, what: str) -> Number:
    flops = what == "flops"
    if layer.when is not None:  # a free shortcut's projection: only where the widths differ
        a, b = layer.when
        if layer.kind == "bn":
            return 0 if flops else 2 * w.differ(a, b, with_a=False)
        macs = w.differ(a, b, with_a=True) * layer.kernel
        return macs * layer.pixels if flops else macs
    if layer.kind == "bn":
        return 0 if flops else 2 * sum(w.mean(g) for g in reads)
    if layer.depthwise:
        c = sum(w.mean(g) for g in reads)
        value = c * layer.kernel * (layer.pixels if flops else 1)
        return value + (c if layer.bias and not flops else 0)
    assert layer.writes is not None
    out = w.mean(layer.writes)
    cross = sum(w.product(g, layer.writes) for g in reads)
    if layer.groups > 1:  # grouped convs keep every channel: ints
        cross = cross // layer.groups
    macs = cross * layer.kernel * layer.spatial
    if flops:
        return macs * layer.pixels + (out if layer.kind == "linear" and layer.bias else 0)
    return macs + (out if layer.bias else 0)


class ExactWidths(Widths):
    """The widths of one shape."""

    def __init__(self, shape: PlanShape) -> None:
        self.w = shape.group_widths()
        self.kept = shape.kept_blocks()
        self.depth = [d - 1 for d in shape.blocks]

    def mean(self, g: int) -> int:
        return self.w[g]

    def product(self, a: int, b: int) -> int:
        return self.w[a] * self.w[b]

    def differ(self, a: int, b: int, with_a: bool) -> int:
        if self.w[a] == self.w[b]:
            return 0
        return self.w[b] * (self.w[a] if with_a else 1)

    def keep(self, block: int) -> int:
        return int(block in self.kept)

    def stage(self, stage: int) -> list[tuple[int, Number]]:
        return [(self.depth[stage], 1)]


@dataclass(frozen=True)
class WidthDist:
    """A distribution over the width of one group: candidate `values`, their `probs`."""

    values: torch.Tensor
    probs: torch.Tensor

    def mean(self) -> torch.Tensor:
        return (self.values * self.probs).sum()


@dataclass(frozen=True)
class DepthDist:
    """A distribution over how many blocks a stage keeps: `choices` (d, counting the
    block that opens the stage), their `probs`."""

    choices: tuple[int, ...]
    probs: torch.Tensor

    def keep_prob(self, index: int) -> torch.Tensor:
        """P(skippable block `index` (0-based) is kept) = P(d > index + 1)."""
        mask = torch.tensor([d > index + 1 for d in self.choices], device=self.probs.device)
        return (self.probs * mask).sum()


class ExpectedWidths(Widths):
    """Independent width distributions of the searched groups and depth distributions of
    the stages: every cost is differentiable in the probabilities."""

    def __init__(self, plan: LayerPlan, widths: Sequence[WidthDist],
                 depths: Sequence[DepthDist]) -> None:
        self.plan = plan
        self.dist = dict(zip(plan.searched, widths, strict=True))
        self.means = {g: d.mean() for g, d in self.dist.items()}
        self.depths = depths

    def mean(self, g: int) -> Number:
        return self.means[g] if g in self.means else self.plan.groups[g].size

    def product(self, a: int, b: int) -> Number:
        if a == b and a in self.dist:
            d = self.dist[a]
            return (d.values * d.values * d.probs).sum()
        return self.mean(a) * self.mean(b)

    def _dist(self, g: int, like: WidthDist) -> WidthDist:
        if g in self.dist:
            return self.dist[g]
        return WidthDist(like.values.new_tensor([float(self.plan.groups[g].size)]),
                         like.probs.new_ones(1))

    def differ(self, a: int, b: int, with_a: bool) -> Number:
        if a == b:  # one variable: never differs from itself
            return 0
        if a not in self.dist and b not in self.dist:
            sa, sb = self.plan.groups[a].size, self.plan.groups[b].size
            return 0 if sa == sb else sb * (sa if with_a else 1)
        like = self.dist.get(a) or self.dist[b]
        da, db = self._dist(a, like), self._dist(b, like)
        same = (da.values[:, None] == db.values[None, :]).to(da.probs.dtype)
        both = da.probs[:, None] * db.probs[None, :] * db.values[None, :]
        if with_a:
            return da.mean() * db.mean() - (same * both * da.values[:, None]).sum()
        return db.mean() - (same * both).sum()

    def keep(self, block: int) -> Number:
        blk = self.plan.blocks[block]
        return self.depths[blk.stage].keep_prob(blk.index)

    def stage(self, stage: int) -> list[tuple[int, Number]]:
        d = self.depths[stage]
        return [(c - 1, d.probs[i]) for i, c in enumerate(d.choices)]


def expected_plan_cost(plan: LayerPlan, widths: Sequence[WidthDist],
                       depths: Sequence[DepthDist], what: str = "flops") -> torch.Tensor:
    """E[cost] under independent width distributions of the searched groups (plan order)
    and depth distributions of the stages: differentiable, and equal to the exact count
    at one-hot distributions."""
    total = plan_cost(plan, ExpectedWidths(plan, widths, depths), what)
    assert isinstance(total, torch.Tensor)
    return total


def expected_plan_flops(plan: LayerPlan, widths: Sequence[WidthDist],
                        depths: Sequence[DepthDist]) -> torch.Tensor:
    return expected_plan_cost(plan, widths, depths, "flops")


def expected_plan_params(plan: LayerPlan, widths: Sequence[WidthDist],
                         depths: Sequence[DepthDist]) -> torch.Tensor:
    return expected_plan_cost(plan, widths, depths, "params")


# the pruned network --------------------------------------------------------------------
@dataclass(frozen=True)
class PlanShape:
    """A pruned form of a planned network: the width of every searched group (in
    `plan.searched` order) and how many blocks every stage keeps, counting the block that
    opens it (1 to its skippable blocks + 1; the first ones are kept)."""

    plan: LayerPlan = field(repr=False)
    widths: tuple[int, ...]
    blocks: tuple[int, ...]

    def __post_init__(self) -> None:
        plan = self.plan
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "blocks", tuple(int(d) for d in self.blocks))
        if len(self.widths) != len(plan.searched):
            raise ValueError(f"{len(self.widths)} widths for {len(plan.searched)} searched "
                             "channel groups")
        if len(self.blocks) != len(plan.stages):
            raise ValueError(f"{len(self.blocks)} block counts for {len(plan.stages)} stages")
        bounds = plan.width_bounds()
        for g, w in zip(plan.searched, self.widths, strict=True):
            if not 1 <= w <= bounds[g]:
                raise ValueError(f"group {plan.groups[g].name}: width {w}, not 1 to "
                                 f"{bounds[g]} (the widest layer it joins in the unpruned "
                                 "network)")
        for s, d in enumerate(self.blocks):
            if not 1 <= d <= len(plan.stages[s]) + 1:
                raise ValueError(f"stage {plan.stage_name(s)}: keeps {d} blocks, not 1 to "
                                 f"{len(plan.stages[s]) + 1}")

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

    @property
    def source(self) -> ModelSpec | None:
        return self.plan.source

    def replace(self, **changes: Any) -> PlanShape:
        return PlanShape(self.plan, tuple(changes.get("widths", self.widths)),
                         tuple(changes.get("blocks", self.blocks)))

    def describe(self) -> str:
        name = self.source.name if self.source is not None and self.source.name else "network"
        depth = "-".join(str(d) for d in self.blocks) or "no skippable blocks"
        return f"{name} ({len(self.widths)} channel groups, blocks per stage {depth})"

    def count(self, what: str) -> int:
        """Exact FLOPs ("flops") or parameters ("params")."""
        return int(plan_cost(self.plan, ExactWidths(self), what))

    def flops(self) -> int:
        return self.count("flops")

    def params(self) -> int:
        return self.count("params")

    # widths of the pruned network ------------------------------------------------------
    def group_widths(self) -> list[int]:
        """The width of every group of the plan (fixed ones at full size)."""
        out = [g.size for g in self.plan.groups]
        for g, w in zip(self.plan.searched, self.widths, strict=True):
            out[g] = w
        return out

    def kept_blocks(self) -> set[int]:
        stages = self.plan.stages
        return {b for s, d in enumerate(self.blocks) for b in stages[s][:d - 1]}

    def skipped(self) -> list[str]:
        """Module paths of the blocks the pruned network replaces by identities."""
        kept = self.kept_blocks()
        return [blk.name for b, blk in enumerate(self.plan.blocks) if b not in kept]

    def read_width(self, layer: PlanLayer, i: int, widths: list[int] | None = None) -> int:
        """The width of read `i` of `layer` in the pruned network (a stage's output is the
        group its last kept block leaves)."""
        widths = self.group_widths() if widths is None else widths
        return widths[self.read_group(layer, i)]

    def read_group(self, layer: PlanLayer, i: int) -> int:
        s = layer.stage_read(i)
        if s is None:
            return layer.reads[i]
        g = self.plan.stage_outputs(s)[self.blocks[s] - 1]
        return layer.reads[i] if g is None else g

    def active(self, layer: PlanLayer, widths: list[int] | None = None,
               kept: set[int] | None = None) -> bool:
        """Whether the pruned network has `layer`: its block is kept and, for a free
        shortcut's projection, the widths of its ends differ."""
        kept = self.kept_blocks() if kept is None else kept
        if layer.block is not None and layer.block not in kept:
            return False
        if layer.when is None:
            return True
        widths = self.group_widths() if widths is None else widths
        return widths[layer.when[0]] != widths[layer.when[1]]

    def used_groups(self) -> set[int]:
        """Positions (in `widths`) of the searched groups the pruned network uses."""
        widths, kept = self.group_widths(), self.kept_blocks()
        used: set[int] = set()
        for layer in self.plan.layers:
            if self.active(layer, widths, kept):
                used.update(self.read_group(layer, i) for i in range(len(layer.reads)))
                if layer.writes is not None:
                    used.add(layer.writes)
        return {i for i, g in enumerate(self.plan.searched) if g in used}

    def module_widths(self) -> dict[str, dict[str, int]]:
        """Every planned module of the pruned network with its sizes: convs `in_channels`,
        `out_channels` (and `groups` for depthwise ones), BatchNorms `num_features`,
        linears `in_features`, `out_features` (a free shortcut's projection included
        where it exists)."""
        widths, kept = self.group_widths(), self.kept_blocks()
        out: dict[str, dict[str, int]] = {}
        for layer in self.plan.layers:
            if not self.active(layer, widths, kept):
                continue
            cin = sum(self.read_width(layer, i, widths) for i in range(len(layer.reads)))
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
        """JSON form: the network it prunes, the widths by group name, the blocks kept by
        stage, and (for reading, not needed to load) every module's pruned size."""
        plan = self.plan
        return {
            "format": FORMAT,
            "model": None if plan.source is None else plan.source.to_dict(),
            "free_shortcuts": plan.free,
            "groups": {plan.groups[g].name: w for g, w in zip(plan.searched, self.widths,
                                                                strict=True)},
            "full_groups": {plan.groups[g].name: plan.groups[g].size for g in plan.searched},
            "stages": {plan.stage_name(s): d for s, d in enumerate(self.blocks)},
            "input_shape": list(plan.input_shape),
            "flops": self.count("flops"),
            "params": self.count("params"),
            "modules": self.module_widths(),
            "skipped": self.skipped(),
        }

    @classmethod
    def from_dict(cls, plan: LayerPlan, data: dict[str, Any]) -> PlanShape:
        """The shape a `to_dict` of the same network describes (checked against `plan`)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} shape (format "
                             f"{data.get('format') if isinstance(data, dict) else None!r})")
        names = {plan.groups[g].name: g for g in plan.searched}
        groups = data.get("groups")
        if not isinstance(groups, dict) or set(groups) != set(names):
            got = set(groups) if isinstance(groups, dict) else set()
            missing, extra = sorted(set(names) - got), sorted(got - set(names))
            raise ValueError("the shape was searched on another network: channel groups "
                             f"missing {missing[:3]}, unknown {extra[:3]}")
        stages = data.get("stages") or {}
        if not isinstance(stages, dict):
            raise ValueError("'stages' must map stage names to block counts")
        for where, values in (("groups", groups), ("stages", stages)):
            bad = {k: v for k, v in values.items() if isinstance(v, bool) or not isinstance(v, int)}
            if bad:
                name, value = next(iter(bad.items()))
                raise ValueError(f"{where}[{name!r}] = {value!r}: must be an integer")
        widths = tuple(groups[plan.groups[g].name] for g in plan.searched)
        blocks = tuple(stages.get(plan.stage_name(s), len(plan.stages[s]) + 1)
                       for s in range(len(plan.stages)))
        return cls(plan, widths, blocks)

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")


def read_shape_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A shape.json as a mapping (a damaged file is a ValueError naming it)."""
    data = read_json(Path(path))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a shape (expected a JSON object)")
    return data


def layers_of(plan: LayerPlan, kind: str) -> Iterator[PlanLayer]:
    return (layer for layer in plan.layers if layer.kind == kind)
