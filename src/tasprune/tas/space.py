"""The search space: which widths every channel group and which depths every stage of a
layer plan may take.

Width choices of a group of `C` channels in the full network are `floor(r * C)` for
every ratio `r` (default 0.3, 0.4, ..., 1.0), at least 1, duplicates removed, sorted.
With `multiple_of > 1` (8 is the hardware-friendly choice) every choice is first rounded
to the nearest multiple, at least one multiple and never above `C`. Depth choices of a
stage of `N` blocks (the one that opens it and its skippable ones) are all of 1..N when
N <= 3, otherwise {1, 3, 5, ...} plus N; the kept blocks are always the first d.

Which channels are one group comes from the plan: with free shortcuts (the TAS paper's
space) every conv of a built-in ResNet is a group of its own and a block whose widths
differ grows a projection; without, a residual stream is one group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tasprune.net.plan import LayerPlan, PlanShape

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


def _position(choices: tuple[int, ...], value: int, what: str) -> int:
    if value not in choices:
        raise ValueError(f"{what} is not in the search space (choices {list(choices)})")
    return choices.index(value)


@dataclass(frozen=True)
class SearchSpace:
    """Width choices of every searched channel group (in `plan.searched` order) and depth
    choices of every stage (blocks kept, counting the one that opens it) of a plan."""

    plan: LayerPlan
    widths: tuple[tuple[int, ...], ...]
    depths: tuple[tuple[int, ...], ...]

    @classmethod
    def from_plan(cls, plan: LayerPlan, ratios: Sequence[float] = DEFAULT_RATIOS,
                  multiple_of: int = 1) -> SearchSpace:
        widths = tuple(width_choices(plan.groups[g].size, ratios, multiple_of)
                       for g in plan.searched)
        depths = tuple(depth_choices(len(s) + 1) for s in plan.stages)
        return cls(plan=plan, widths=widths, depths=depths)

    @property
    def full(self) -> PlanShape:
        return self.plan.full()

    @property
    def num_groups(self) -> int:
        return len(self.widths)

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    def shape(self, width_index: Sequence[int], depth_index: Sequence[int]) -> PlanShape:
        """The shape that picks choice `width_index[g]` of every group and `depth_index[s]`
        of every stage."""
        if len(width_index) != len(self.widths):
            raise ValueError(f"{len(width_index)} width choices for {len(self.widths)} groups")
        widths = tuple(c[i] for c, i in zip(self.widths, width_index, strict=True))
        blocks = tuple(d[i] for d, i in zip(self.depths, depth_index, strict=True))
        return PlanShape(self.plan, widths, blocks)

    def smallest(self) -> PlanShape:
        """Every group at its narrowest choice, every stage at its shallowest."""
        return self.shape([0] * self.num_groups, [0] * self.num_stages)

    def min_flops_ratio(self) -> float:
        """FLOPs of the smallest shape over those of the full network."""
        return self.smallest().count("flops") / self.full.count("flops")

    def used(self, shape: PlanShape) -> set[int]:
        """Positions of the groups the network of `shape` uses."""
        return shape.used_groups()

    def width_index(self, group: int, width: int) -> int:
        """Position of `width` among the choices of searched group `group` (position)."""
        return _position(self.widths[group], width, f"width {width} of group "
                         f"{self.plan.groups[self.plan.searched[group]].name}")

    def depth_index(self, stage: int, blocks: int) -> int:
        return _position(self.depths[stage], blocks,
                         f"{blocks} blocks of stage {self.plan.stage_name(stage)}")

    def indices_of(self, shape: PlanShape) -> tuple[list[int], list[int]]:
        """Choice indices (widths, depths) of a shape of this space (groups the shape does
        not use and whose width is not a choice map to the full width)."""
        if shape.plan != self.plan:
            raise ValueError(f"shape {shape.describe()} is not of this search space "
                             f"({self.full.describe()})")
        used = shape.used_groups()
        widths = [self.width_index(i, w) if i in used or w in c else len(c) - 1
                  for i, (c, w) in enumerate(zip(self.widths, shape.widths, strict=True))]
        depths = [self.depth_index(s, d) for s, d in enumerate(shape.blocks)]
        return widths, depths
