"""The search space: which widths every conv slot and which depths every stage may take.

Width choices of a conv with `C` output channels in the full network are
`floor(r * C)` for every ratio `r` (default 0.3, 0.4, ..., 1.0), at least 1,
duplicates removed, sorted. With `multiple_of > 1` (8 is the hardware-friendly
choice) every choice is first rounded to the nearest multiple, at least one
multiple and never above `C`. Depth choices of a stage of `N` blocks are all of
1..N when N <= 3, otherwise {1, 3, 5, ...} plus N; the kept blocks are always
the first d.

With `coupled`, every residual stream has one width: a stride-1 block whose
shortcut is the identity in the full network writes the width it reads, so the
stem and the outputs of the blocks of a stage share one distribution (the
searched shape never grows a stride-1 projection the dense net does not have).
`ties[l]` is the slot whose choice slot `l` takes (itself when not tied).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tasprune.flops import DepthDist, WidthDist, count_flops, expected_flops
from tasprune.plan import LayerPlan, PlanShape, expected_plan_cost
from tasprune.shape import Shape

DEFAULT_RATIOS: tuple[float, ...] = tuple(round(0.1 * i, 10) for i in range(3, 11))


def width_choices(channels: int, ratios: Sequence[float] = DEFAULT_RATIOS,
                  multiple_of: int = 1) -> tuple[int, ...]:
    """Candidate output widths of a conv with `channels` outputs in the full network."""
    if channels < 1:
        raise ValueError(f"a conv has at least one channel, got {channels}")
    _check_ratios(ratios)
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1 (1 = no rounding), got {multiple_of}")
    out = set()
    for r in ratios:
        # the epsilon keeps products like 0.7 * 30 = 20.999... from dropping a channel
        c = max(1, math.floor(r * channels + 1e-9))
        if multiple_of > 1:
            c = min(channels, max(multiple_of, multiple_of * math.floor(c / multiple_of + 0.5)))
        out.add(c)
    return tuple(sorted(out))


def depth_choices(blocks: int) -> tuple[int, ...]:
    """Candidate block counts of a stage of `blocks` blocks (always includes `blocks`)."""
    if blocks < 1:
        raise ValueError(f"a stage has at least one block, got {blocks}")
    if blocks <= 3:
        return tuple(range(1, blocks + 1))
    return tuple(sorted(set(range(1, blocks + 1, 2)) | {blocks}))


def _check_ratios(ratios: Sequence[float]) -> None:
    if len(ratios) == 0:
        raise ValueError("width ratios: give at least one ratio in (0, 1], e.g. 0.5 1.0")
    bad = [r for r in ratios if not 0 < r <= 1]
    if bad:
        raise ValueError(f"width ratios must be in (0, 1], got {bad}")


class _Counts:
    """How many width rows and depth rows a space has."""

    widths: tuple[tuple[int, ...], ...]
    depths: tuple[tuple[int, ...], ...]

    @property
    def num_slots(self) -> int:
        return len(self.widths)

    @property
    def num_stages(self) -> int:
        return len(self.depths)


@dataclass(frozen=True)
class SearchSpace(_Counts):
    """Width choices of every conv slot and depth choices of every stage of `full`."""

    full: Shape
    widths: tuple[tuple[int, ...], ...]
    depths: tuple[tuple[int, ...], ...]
    ties: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.ties:
            object.__setattr__(self, "ties", tuple(range(len(self.widths))))

    @classmethod
    def from_shape(cls, full: Shape, ratios: Sequence[float] = DEFAULT_RATIOS,
                   multiple_of: int = 1, coupled: bool = False) -> SearchSpace:
        """The space of an unpruned network (a Shape with `is_full`); `coupled` ties the
        widths of every residual stream (see the module docstring)."""
        if not full.is_full:
            raise ValueError(
                "the search space is built from the unpruned network; got a pruned shape "
                f"({full.describe()}); use Shape.full(model_name)"
            )
        widths = tuple(width_choices(c, ratios, multiple_of) for c in full.widths)
        depths = tuple(depth_choices(n) for n in full.depths)
        ties = residual_ties(full) if coupled else ()
        return cls(full=full, widths=widths, depths=depths, ties=ties)

    @property
    def coupled(self) -> bool:
        """Whether some slots take another slot's choice."""
        return any(t != s for s, t in enumerate(self.ties))

    def shape(self, width_index: Sequence[int], depth_index: Sequence[int]) -> Shape:
        """The Shape that picks choice `width_index[l]` of every slot and `depth_index[s]`
        of every stage (a tied slot takes the choice of the slot it is tied to)."""
        if len(width_index) != len(self.widths):
            raise ValueError(f"{len(width_index)} width choices for {len(self.widths)} slots")
        widths = tuple(c[width_index[t]] for c, t in zip(self.widths, self.ties, strict=True))
        blocks = tuple(d[i] for d, i in zip(self.depths, depth_index, strict=True))
        return self.full.replace(widths=widths, blocks=blocks)

    expected_flops = staticmethod(expected_flops)

    def used(self, shape: Shape) -> set[int]:
        """Conv slots that the network of `shape` builds."""
        return used_slots(shape)

    def smallest(self) -> Shape:
        """Every slot at its narrowest choice, every stage at its shallowest."""
        return self.shape([0] * self.num_slots, [0] * self.num_stages)

    def min_flops_ratio(self) -> float:
        """FLOPs of the smallest shape over those of the full network."""
        return count_flops(self.smallest()) / count_flops(self.full)

    def width_index(self, slot: int, width: int) -> int:
        """Position of `width` among the choices of `slot` (error if it is not one)."""
        return _position(self.widths[slot], width, f"width {width} of slot {slot}")

    def depth_index(self, stage: int, blocks: int) -> int:
        """Position of `blocks` among the depth choices of `stage` (error if not one)."""
        return _position(self.depths[stage], blocks, f"{blocks} blocks in stage {stage}")

    def indices_of(self, shape: Shape) -> tuple[list[int], list[int]]:
        """Choice indices (widths, depths) of a shape of this space.

        Slots of dropped blocks whose width is not a choice map to the full width."""
        if (shape.family, shape.block, shape.depths) != (self.full.family, self.full.block,
                                                        self.full.depths):
            raise ValueError(f"shape {shape.describe()} is not of this search space "
                             f"({self.full.describe()})")
        used = used_slots(shape)
        widths = [self.width_index(s, w) if s in used or w in self.widths[s]
                  else len(self.widths[s]) - 1 for s, w in enumerate(shape.widths)]
        depths = [self.depth_index(s, b) for s, b in enumerate(shape.blocks)]
        return widths, depths


def _position(choices: tuple[int, ...], value: int, what: str) -> int:
    if value not in choices:
        raise ValueError(f"{what} is not in the search space (choices {list(choices)})")
    return choices.index(value)


def residual_ties(full: Shape) -> tuple[int, ...]:
    """For every slot, the first slot of its residual stream: a stride-1 block whose input
    and output widths are equal in `full` adds its input to its output unchanged, so its
    output slot joins the stream of the slot it reads."""
    skel = full.skeleton
    ties = list(range(skel.num_slots))
    reads = skel.stem.slot
    for stage in skel.stages:
        for blk in stage:
            out = blk.out_slot
            if blk.stride == 1 and full.widths[reads] == full.widths[out]:
                ties[out] = ties[reads]
            reads = out
    return tuple(ties)


def used_slots(shape: Shape) -> set[int]:
    """Conv slots that the network of `shape` builds (stem and kept blocks)."""
    used = {shape.skeleton.stem.slot}
    for s, stage in enumerate(shape.skeleton.stages):
        for blk in stage[: shape.blocks[s]]:
            used.update(c.slot for c in blk.convs)
    return used


@dataclass(frozen=True)
class PlanSpace(_Counts):
    """Width choices of every searched channel group and kept-block choices of every stage
    of a planned network (`tasprune.plan`): what `SearchSpace` is for the built-in
    ResNets. A stage of `M` skippable blocks keeps k of them for k + 1 in
    `depth_choices(M + 1)` (the block before a stage is never skipped, as a ResNet stage's
    first block)."""

    full: PlanShape
    widths: tuple[tuple[int, ...], ...]
    depths: tuple[tuple[int, ...], ...]
    ties: tuple[int, ...] = ()
    coupled = False

    def __post_init__(self) -> None:
        if not self.ties:
            object.__setattr__(self, "ties", tuple(range(len(self.widths))))

    @classmethod
    def from_plan(cls, plan: LayerPlan, ratios: Sequence[float] = DEFAULT_RATIOS,
                  multiple_of: int = 1) -> PlanSpace:
        widths = tuple(width_choices(plan.groups[g].size, ratios, multiple_of)
                       for g in plan.searched)
        depths = tuple(tuple(d - 1 for d in depth_choices(len(s) + 1)) for s in plan.stages)
        return cls(full=plan.full(), widths=widths, depths=depths)

    @staticmethod
    def expected_flops(plan: LayerPlan, widths: Sequence[WidthDist],
                       depths: Sequence[DepthDist]) -> Any:
        return expected_plan_cost(plan, widths, depths, "flops")

    def shape(self, width_index: Sequence[int], depth_index: Sequence[int]) -> PlanShape:
        widths = tuple(c[i] for c, i in zip(self.widths, width_index, strict=True))
        blocks = tuple(d[i] for d, i in zip(self.depths, depth_index, strict=True))
        return self.full.replace(widths=widths, blocks=blocks)

    def smallest(self) -> PlanShape:
        return self.shape([0] * self.num_slots, [0] * self.num_stages)

    def min_flops_ratio(self) -> float:
        return self.smallest().count("flops") / self.full.count("flops")

    def used(self, shape: PlanShape) -> set[int]:
        return shape.used_groups()

    def indices_of(self, shape: PlanShape) -> tuple[list[int], list[int]]:
        """Choice indices of a shape of this space (groups of skipped blocks whose width
        is not a choice map to the full width)."""
        used = shape.used_groups()
        widths = [_position(c, w, f"width {w} of group {g}") if g in used or w in c
                  else len(c) - 1 for g, (c, w) in enumerate(zip(self.widths, shape.widths,
                                                                  strict=True))]
        depths = [_position(d, k, f"{k} blocks of stage {s}")
                  for s, (d, k) in enumerate(zip(self.depths, shape.blocks, strict=True))]
        return widths, depths
