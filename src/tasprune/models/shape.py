"""Shape: a (pruned) built-in ResNet named by its widths, the view of the TAS `.config`
files.

A Shape says how many blocks each stage of a built-in ResNet keeps and how many output
channels every conv keeps, in the order of the original TAS code's files. It reads and
writes those files (the twelve published shapes ship with tasprune) and the `shape.json`
of earlier tasprune versions; everything else reads the network's layer plan
(`tasprune.net.plan.PlanShape`), into which `tasprune.models.network.from_view` turns
it. Widths are listed for every conv of the *full* network (slot order of
`tasprune.models.families`); entries of dropped blocks are kept so slot numbers never
move, and are ignored by the built network.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tasprune._io import atomic_write_text, read_json
from tasprune.models.families import (
    BLOCK_TYPES,
    FAMILIES,
    MAX_BLOCKS_PER_STAGE,
    MODELS,
    Skeleton,
    build_skeleton,
    full_widths,
    resolve_model,
)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Shape:
    """Widths and depths of a ResNet-family network.

    family: "cifar_resnet" or "imagenet_resnet"; block: "basic" or "bottleneck";
    depths: blocks per stage of the full net; blocks: blocks kept per stage;
    widths: output channels of every conv slot (stem first, then every block
    of the full net in order).
    """

    family: str
    block: str
    depths: tuple[int, ...]
    blocks: tuple[int, ...]
    widths: tuple[int, ...]
    in_channels: int = 3
    num_classes: int = 10
    resolution: int = 32
    _skeleton: Skeleton | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("depths", "blocks", "widths"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise ValueError(f"Shape.{name} must be a list of integers, got {value!r}")
            object.__setattr__(self, name, tuple(_as_int(v, f"Shape.{name}") for v in value))
        if self.family not in FAMILIES:
            raise ValueError(
                f"Shape.family: unknown family {self.family!r}; expected one of {sorted(FAMILIES)}"
            )
        if self.block not in BLOCK_TYPES:
            raise ValueError(
                f"Shape.block: unknown block type {self.block!r}; expected one of "
                f"{sorted(BLOCK_TYPES)}"
            )
        for name in ("in_channels", "num_classes", "resolution"):
            value = _as_int(getattr(self, name), f"Shape.{name}")
            if value < 1:
                raise ValueError(f"Shape.{name} must be >= 1, got {value}")
            object.__setattr__(self, name, value)
        spec = FAMILIES[self.family]
        n_stages = len(spec.stage_planes)
        if any(d > MAX_BLOCKS_PER_STAGE for d in self.depths):
            raise ValueError(f"Shape.depths: at most {MAX_BLOCKS_PER_STAGE} blocks per stage "
                             f"can be built, got {list(self.depths)}")
        if len(self.depths) != n_stages or any(d < 1 for d in self.depths):
            raise ValueError(
                f"Shape.depths: a {self.family} has {n_stages} stages of at least one block, "
                f"got {list(self.depths)}"
            )
        if len(self.blocks) != n_stages:
            raise ValueError(
                f"Shape.blocks: expected {n_stages} entries (one per stage), got "
                f"{len(self.blocks)}"
            )
        for s, (kept, full) in enumerate(zip(self.blocks, self.depths, strict=True)):
            if not 1 <= kept <= full:
                raise ValueError(
                    f"Shape.blocks[{s}] = {kept}: a stage keeps between 1 and {full} blocks"
                )
        full = full_widths(self.family, self.block, self.depths)
        if len(self.widths) != len(full):
            raise ValueError(
                f"Shape.widths: a {self.family} with {self.block} blocks and depths "
                f"{list(self.depths)} has {len(full)} conv slots, got {len(self.widths)} widths"
            )
        for i, (w, f) in enumerate(zip(self.widths, max_widths(full, self.block), strict=True)):
            if not 1 <= w <= f:
                raise ValueError(
                    f"Shape.widths[{i}] = {w}: must be between 1 and {f} (the full network's "
                    f"widest conv of that block)"
                )

    # construction ---------------------------------------------------------------
    @classmethod
    def full(
        cls,
        model: str,
        num_classes: int | None = None,
        in_channels: int | None = None,
        resolution: int | None = None,
    ) -> Shape:
        """The unpruned network of a registered model name (e.g. "resnet56")."""
        family, block, depths = resolve_model(model)
        spec = FAMILIES[family]
        return cls(
            family=family,
            block=block,
            depths=depths,
            blocks=depths,
            widths=full_widths(family, block, depths),
            in_channels=3 if in_channels is None else in_channels,
            num_classes=spec.default_classes if num_classes is None else num_classes,
            resolution=spec.default_resolution if resolution is None else resolution,
        )

    def replace(self, **changes: Any) -> Shape:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    # derived views --------------------------------------------------------------
    @property
    def skeleton(self) -> Skeleton:
        """The full network's conv layout (cached; a Shape is immutable)."""
        if self._skeleton is None:
            skel = build_skeleton(self.family, self.block, self.depths, self.in_channels,
                                  self.num_classes, self.resolution)
            object.__setattr__(self, "_skeleton", skel)
        return self._skeleton  # type: ignore[return-value]

    @property
    def full_widths(self) -> tuple[int, ...]:
        return full_widths(self.family, self.block, self.depths)

    @property
    def is_full(self) -> bool:
        return self.blocks == self.depths and self.widths == self.full_widths

    def stage_out_width(self, stage: int) -> int:
        """Output channels of a stage: its last kept block's output width."""
        return self.widths[self.skeleton.stages[stage][self.blocks[stage] - 1].out_slot]

    @property
    def model_name(self) -> str:
        """The registered name of the unpruned network (e.g. "resnet56")."""
        for name, triple in MODELS.items():
            if triple == (self.family, self.block, self.depths):
                return name
        if self.family == "cifar_resnet" and len(set(self.depths)) == 1:
            per_block = len(BLOCK_TYPES[self.block])
            depth = 3 * per_block * self.depths[0] + 2
            return f"cifar-resnet{depth}" + ("-bottleneck" if self.block == "bottleneck" else "")
        raise ValueError(f"no registered model is a {self.family} with {self.block} blocks "
                         f"and depths {list(self.depths)}")

    def describe(self) -> str:
        kept = "/".join(f"{b}:{d}" for b, d in zip(self.blocks, self.depths, strict=True))
        return f"{self.family} {self.block} blocks(kept:full)={kept}"

    # JSON -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "tasprune.shape",
            "version": FORMAT_VERSION,
            "family": self.family,
            "block": self.block,
            "depths": list(self.depths),
            "blocks": list(self.blocks),
            "widths": list(self.widths),
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "resolution": self.resolution,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Shape:
        if not isinstance(data, dict):
            raise ValueError("a shape must be a JSON object")
        data = dict(data)
        data.pop("format", None)
        version = data.pop("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"shape format version {version} is not supported "
                             f"(this tasprune reads version {FORMAT_VERSION})")
        names = {"family", "block", "depths", "blocks", "widths", "in_channels", "num_classes",
                 "resolution"}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown shape field(s): {', '.join(unknown)}")
        missing = sorted({"family", "block", "depths", "blocks", "widths"} - set(data))
        if missing:
            raise ValueError(f"shape is missing field(s): {', '.join(missing)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write JSON atomically (temp file, then rename)."""
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Shape:
        """Read a shape.json in this view's format ("tasprune.shape"), or by extension a
        TAS .config file. A searched shape ("tasprune.plan-shape/2", what searches write)
        is read by `tasprune.load_shape`; `tasprune.to_view` gives its Shape."""
        path = Path(path)
        if path.suffix == ".config":
            return cls.from_tas_config(path)
        data = read_json(path)
        if isinstance(data, dict) and str(data.get("format", "")).startswith(
                "tasprune.plan-shape"):
            raise ValueError(f"{path}: a searched shape ({data['format']}); read it with "
                             "tasprune.load_shape(path), and tasprune.to_view(...) gives a "
                             "built-in ResNet's Shape of it")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: invalid shape: {exc}") from None

    # TAS .config ------------------------------------------------------------------
    @classmethod
    def from_tas_config(cls, path: str | os.PathLike[str]) -> Shape:
        """Read a shape file of the original TAS code (see tas-paper-shapes/README)."""
        path = Path(path)
        raw = read_json(path)
        try:
            return _shape_from_tas(raw)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            msg = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ValueError(f"{path}: not a valid TAS shape config: {msg}") from None

    def to_tas_config(self, flops: int, path: str | os.PathLike[str] | None = None) -> str:
        """The shape in the original TAS format, with its FLOPs (`flops`, as
        `tasprune.count_flops` counts them) as its estimate; written to `path` when given."""

        def entry(kind: str, value: Any) -> list[Any]:
            if isinstance(value, (list, tuple)):
                return [kind, [str(v) for v in value]]
            return [kind, str(value)]

        xchannels = [self.in_channels, *self.widths]
        if self.family == "cifar_resnet":
            per_block = len(BLOCK_TYPES[self.block])
            depth = per_block * sum(self.depths) + 2
            module = "ResNetBasicblock" if self.block == "basic" else "ResNetBottleneck"
            head = {"dataset": entry("str", "cifar"), "arch": entry("str", "resnet"),
                    "depth": entry("int", depth), "module": entry("str", module)}
        else:
            block_name = "BasicBlock" if self.block == "basic" else "Bottleneck"
            head = {"dataset": entry("str", "imagenet"), "arch": entry("str", "resnet"),
                    "block_name": entry("str", block_name), "layers": entry("int", self.depths),
                    "deep_stem": entry("bool", 0)}
        data = {
            **head,
            "super_type": entry("str", "infer-shape"),
            "zero_init_residual": entry("bool", 0),
            "class_num": entry("int", self.num_classes),
            "search_mode": entry("str", "shape"),
            "xchannels": entry("int", xchannels),
            "xblocks": entry("int", self.blocks),
            "estimated_FLOP": entry("float", f"{flops / 1e6:.6f}"),
        }
        text = "{\n" + ",\n".join(
            f"  {json.dumps(k):<20} : {json.dumps(v)}" for k, v in data.items()
        ) + "\n}\n"
        if path is not None:
            atomic_write_text(path, text)
        return text


def _shape_from_tas(raw: dict[str, Any]) -> Shape:
    def value(key: str) -> Any:
        return raw[key][1]

    def ints(key: str) -> list[int]:
        return [int(v) for v in value(key)]

    dataset = value("dataset")
    xchannels = ints("xchannels")
    if dataset == "cifar":
        module = value("module")
        blocks_by_module = {"ResNetBasicblock": "basic", "ResNetBottleneck": "bottleneck"}
        if module not in blocks_by_module:
            raise ValueError(f"module {module!r} is not one of {sorted(blocks_by_module)}")
        block = blocks_by_module[module]
        per_block = len(BLOCK_TYPES[block])
        n, rem = divmod(int(value("depth")) - 2, 3 * per_block)
        if rem or n < 1:
            raise ValueError(f"depth {value('depth')} does not fit {module}")
        family, depths, resolution = "cifar_resnet", (n, n, n), 32
    elif dataset == "imagenet":
        name = value("block_name")
        blocks_by_name = {"BasicBlock": "basic", "Bottleneck": "bottleneck"}
        if name not in blocks_by_name:
            raise ValueError(f"block_name {name!r} is not one of {sorted(blocks_by_name)}")
        if int(value("deep_stem")):
            raise ValueError("deep_stem=1 (three-conv stem) is not supported")
        family, block, depths, resolution = (
            "imagenet_resnet", blocks_by_name[name], tuple(ints("layers")), 224)
    else:
        raise ValueError(f"dataset {dataset!r} is neither 'cifar' nor 'imagenet'")
    return Shape(
        family=family,
        block=block,
        depths=depths,
        blocks=tuple(ints("xblocks")),
        widths=tuple(xchannels[1:]),
        in_channels=xchannels[0],
        num_classes=int(value("class_num")),
        resolution=resolution,
    )


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{name} must hold integers, got {value!r}")
    return value


def max_widths(full: tuple[int, ...], block: str) -> tuple[int, ...]:
    """Upper bound of every slot's width: the widest conv of its block in the full net.

    Usually this is the slot's own full width; a bottleneck's inner convs may be
    wider than their full width (up to the block's output width), which the
    published TAS ImageNet ResNet-50 shape uses (68 and 70 channels where the
    full network has 64).
    """
    per_block = len(BLOCK_TYPES[block])
    bounds = [full[0]]
    for start in range(1, len(full), per_block):
        widest = max(full[start:start + per_block])
        bounds.extend([widest] * per_block)
    return tuple(bounds)


PAPER_SHAPES_DIR = Path(__file__).parent.parent / "paper_shapes"


def paper_shape_names() -> list[str]:
    """Names of the published TAS shapes shipped with tasprune."""
    return sorted(p.stem for p in PAPER_SHAPES_DIR.glob("*.config"))


def paper_shape(name: str) -> Shape:
    """A published TAS shape by name, e.g. paper_shape("C010-ResNet110")."""
    path = PAPER_SHAPES_DIR / f"{name}.config"
    if not path.is_file():
        raise ValueError(f"no published shape {name!r}; known: {', '.join(paper_shape_names())}")
    return Shape.from_tas_config(path)
