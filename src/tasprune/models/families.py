"""Network families: the fixed skeleton of every supported ResNet.

A *skeleton* lists, for the full (unpruned) network of a family, every
convolution with its kernel, stride, output resolution and the index of the
*width slot* that sets its output channel count. It is pure data (no torch):
the model builder, the FLOP counter and the search supernet all read it, so
the architecture is written down once.

Slots are numbered in forward order: slot 0 is the stem conv, then the convs
of every block of the full network, stage by stage. A pruned network keeps the
same slot numbering; dropped blocks simply go unused.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilySpec:
    """Constants of one network family."""

    name: str
    stem_width: int
    stem_kernel: int
    stem_stride: int
    stem_pool: bool  # 3x3 stride-2 max pool after the stem (ImageNet)
    stage_planes: tuple[int, ...]
    stage_strides: tuple[int, ...]
    bn_on_strided_shortcut: bool  # the avg-pool + 1x1 projection has BN
    default_resolution: int
    default_classes: int


FAMILIES: dict[str, FamilySpec] = {
    "cifar_resnet": FamilySpec(
        name="cifar_resnet",
        stem_width=16,
        stem_kernel=3,
        stem_stride=1,
        stem_pool=False,
        stage_planes=(16, 32, 64),
        stage_strides=(1, 2, 2),
        bn_on_strided_shortcut=False,
        default_resolution=32,
        default_classes=10,
    ),
    "imagenet_resnet": FamilySpec(
        name="imagenet_resnet",
        stem_width=64,
        stem_kernel=7,
        stem_stride=2,
        stem_pool=True,
        stage_planes=(64, 128, 256, 512),
        stage_strides=(1, 2, 2, 2),
        bn_on_strided_shortcut=True,
        default_resolution=224,
        default_classes=1000,
    ),
}

BLOCK_TYPES: dict[str, tuple[int, ...]] = {
    # kernels of the main-path convs; the last conv's width is the block's output
    "basic": (3, 3),
    "bottleneck": (1, 3, 1),
}
EXPANSION = {"basic": 1, "bottleneck": 4}


@dataclass(frozen=True)
class ConvSpec:
    """One searchable convolution: its width slot, kernel, stride, output size."""

    slot: int
    kernel: int
    stride: int
    out_res: int


@dataclass(frozen=True)
class BlockSpec:
    """One residual block of the full network."""

    stage: int
    index: int
    convs: tuple[ConvSpec, ...]
    stride: int
    out_res: int
    shortcut_bn: bool  # BN after the projection conv (when there is one)

    @property
    def out_slot(self) -> int:
        return self.convs[-1].slot


@dataclass(frozen=True)
class Skeleton:
    family: FamilySpec
    block: str
    in_channels: int
    num_classes: int
    resolution: int
    stem: ConvSpec
    stages: tuple[tuple[BlockSpec, ...], ...]

    @property
    def num_slots(self) -> int:
        return 1 + sum(len(b.convs) for stage in self.stages for b in stage)


def conv_out_res(res: int, stride: int) -> int:
    """Output size of a 'same'-padded conv (or pool) with this stride."""
    return -(-res // stride)


def full_widths(family: str, block: str, depths: tuple[int, ...]) -> tuple[int, ...]:
    """Width of every conv slot of the unpruned network."""
    spec = FAMILIES[family]
    widths = [spec.stem_width]
    for planes, n in zip(spec.stage_planes, depths, strict=True):
        per_block = [planes] * (len(BLOCK_TYPES[block]) - 1) + [planes * EXPANSION[block]]
        widths.extend(per_block * n)
    return tuple(widths)


def build_skeleton(
    family: str,
    block: str,
    depths: tuple[int, ...],
    in_channels: int,
    num_classes: int,
    resolution: int,
) -> Skeleton:
    """The full network's convs in forward order, with slot indices and sizes.

    Strides: the stem's, the max pool's (ImageNet), then the first block of
    stages 2.. is stride 2. In a bottleneck the stride sits on the 3x3 conv
    (ResNet v1.5, as torchvision and the TAS code); in a basic block on the
    first conv.
    """
    spec = FAMILIES[family]
    res = conv_out_res(resolution, spec.stem_stride)
    stem = ConvSpec(slot=0, kernel=spec.stem_kernel, stride=spec.stem_stride, out_res=res)
    if spec.stem_pool:
        res = conv_out_res(res, 2)
    kernels = BLOCK_TYPES[block]
    slot = 1
    stages = []
    for s, (stage_stride, n) in enumerate(zip(spec.stage_strides, depths, strict=True)):
        blocks = []
        for b in range(n):
            stride = stage_stride if b == 0 else 1
            out_res = conv_out_res(res, stride)
            convs = []
            cur, strided = res, False
            for k in kernels:
                # the stride goes on the block's (first) 3x3 conv
                conv_stride = stride if k == 3 and not strided else 1
                strided = strided or k == 3
                cur = conv_out_res(cur, conv_stride)
                convs.append(ConvSpec(slot=slot, kernel=k, stride=conv_stride, out_res=cur))
                slot += 1
            blocks.append(
                BlockSpec(stage=s, index=b, convs=tuple(convs), stride=stride, out_res=out_res,
                          shortcut_bn=spec.bn_on_strided_shortcut or stride == 1)
            )
            res = out_res
        stages.append(tuple(blocks))
    return Skeleton(family=spec, block=block, in_channels=in_channels, num_classes=num_classes,
                    resolution=resolution, stem=stem, stages=tuple(stages))


# Named models: name -> (family, block, blocks per stage of the full net).
_CIFAR_BASIC = {8: 1, 14: 2, 20: 3, 32: 5, 44: 7, 56: 9, 110: 18}
MODELS: dict[str, tuple[str, str, tuple[int, ...]]] = {
    **{f"resnet{d}": ("cifar_resnet", "basic", (n, n, n)) for d, n in _CIFAR_BASIC.items()},
    "resnet164": ("cifar_resnet", "bottleneck", (18, 18, 18)),
    "resnet18": ("imagenet_resnet", "basic", (2, 2, 2, 2)),
    "resnet34": ("imagenet_resnet", "basic", (3, 4, 6, 3)),
    "resnet50": ("imagenet_resnet", "bottleneck", (3, 4, 6, 3)),
    "resnet101": ("imagenet_resnet", "bottleneck", (3, 4, 23, 3)),
    "resnet152": ("imagenet_resnet", "bottleneck", (3, 8, 36, 3)),
}
# deeper stages than this cannot be built in any memory (ResNet-1202, the deepest
# published CIFAR ResNet, has 200): refuse them before building anything
MAX_BLOCKS_PER_STAGE = 1000
_GENERIC_HELP = (
    "small-image ResNets of any depth are also available as 'cifar-resnet<D>' "
    "(basic blocks, D = 6n+2) and 'cifar-resnet<D>-bottleneck' (D = 9n+2)"
)


def resolve_model(name: str) -> tuple[str, str, tuple[int, ...]]:
    """Map a model name to (family, block type, blocks per stage)."""
    key = name.strip().lower()
    if key in MODELS:
        return MODELS[key]
    if key.startswith("cifar-resnet"):
        rest = key[len("cifar-resnet"):]
        block = "bottleneck" if rest.endswith("-bottleneck") else "basic"
        digits = rest.removesuffix("-bottleneck")
        per_block = 3 if block == "bottleneck" else 2
        if digits.isdigit():
            depth = int(digits)
            n, rem = divmod(depth - 2, 3 * per_block)
            if n > MAX_BLOCKS_PER_STAGE:
                raise ValueError(
                    f"model {name!r}: depth {depth} means {n} blocks per stage; at most "
                    f"{MAX_BLOCKS_PER_STAGE} can be built (depth "
                    f"{3 * per_block * MAX_BLOCKS_PER_STAGE + 2})")
            if n >= 1 and rem == 0:
                return ("cifar_resnet", block, (n, n, n))
            raise ValueError(
                f"model {name!r}: depth {depth} is not {3 * per_block}n+2 for a "
                f"{block}-block small-image ResNet"
            )
    known = ", ".join(sorted(MODELS, key=lambda m: (MODELS[m][0], int(m[6:]))))
    raise ValueError(f"unknown model {name!r}; known: {known}; {_GENERIC_HELP}")
