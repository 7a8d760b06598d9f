"""Weight inheritance: initialise a pruned network from its teacher by L1-norm channel selection.

The pruned net keeps the first `blocks[s]` blocks of every stage (as the
teacher's), and for each kept tensor the channels whose producing filters have
the largest L1 norm (Li et al., "Pruning Filters for Efficient ConvNets", 2017).
Every conv, BatchNorm, projection and the classifier then copy the teacher's
entries at the kept output channels and at the input channels their input
tensor kept.

Residual consistency. Tensors joined by an identity shortcut in the teacher
carry the same channels (channel i of a block's output *is* channel i of its
input plus the residual), so they form one *residual stream*: in a full ResNet,
the output of every block of a stage, plus the stem for a stage whose first
block has no projection. Channels are ranked once per stream, by the sum over
all convs writing into it (the stem, each block's last conv, projection convs)
of their per-filter L1 norms, each normalised to sum 1 so every writer votes
equally. A tensor of width w keeps the stream's top w channels (in teacher
order). Top-w sets are nested, so wherever the pruned net has an identity
shortcut (equal widths) both ends hold exactly the same channels, and where it
has a projection the teacher lacked (widths differ), that projection starts as
the 0/1 matrix that carries each kept input channel to the same channel of the
output (BatchNorm set to the identity), i.e. the teacher's shortcut restricted to
the kept channels. Inner convs of a block (not on a stream) rank their own filters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tasprune.checkpoint import load_state_checked
from tasprune.models import ResNet, build_model
from tasprune.models.blocks import Projection
from tasprune.shape import Shape

_TensorKey = tuple[int, int, int] | str  # "stem" or (stage, block, conv index)


@dataclass
class _Streams:
    """Channel ranking of every teacher tensor: tensor -> stream id -> score per channel."""

    stream_of: dict[_TensorKey, int]
    scores: list[torch.Tensor]

    def keep(self, key: _TensorKey, width: int, layer: str) -> torch.Tensor:
        """Indices (ascending) of the `width` top-ranked channels of teacher tensor `key`."""
        score = self.scores[self.stream_of[key]]
        if width > len(score):
            raise ValueError(
                f"cannot inherit weights: {layer} keeps {width} channels but the teacher has "
                f"only {len(score)} there (a bottleneck's inner conv may be wider than the "
                "teacher's, see shape.max_widths); train this shape from scratch instead "
                "(drop --inherit)"
            )
        order = torch.argsort(score, descending=True, stable=True)
        return torch.sort(order[:width]).values


def _l1(weight: torch.Tensor) -> torch.Tensor:
    norms = weight.detach().abs().flatten(1).sum(1).double()
    return norms / norms.sum().clamp_min(1e-12)


def _rank_streams(teacher: ResNet,
                  importance: Mapping[str, torch.Tensor] | None = None) -> _Streams:
    """Streams of the teacher's tensors and a score per channel: the sum over the convs
    writing into the stream of their per-channel importance, each normalised to sum 1
    (`importance`: conv name -> scores; default: the L1 norms of the filters)."""
    sd = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}

    def score(_: dict[str, torch.Tensor], conv: str) -> torch.Tensor:
        if importance is None:
            return _l1(sd[f"{conv}.weight"])
        values = importance[conv].detach().cpu().double()
        return values / values.sum().clamp_min(1e-12)

    stream_of: dict[_TensorKey, int] = {"stem": 0}
    writers: list[list[torch.Tensor]] = [[score(sd, "conv1")]]

    def new_stream(*convs: str) -> int:
        writers.append([score(sd, c) for c in convs])
        return len(writers) - 1

    current: _TensorKey = "stem"
    shape = teacher.shape
    for s, stage in enumerate(teacher.stage_modules()):
        for b, block in enumerate(stage):
            prefix = f"layer{s + 1}.{b}"
            convs = shape.skeleton.stages[s][b].convs
            for j in range(len(convs) - 1):
                stream_of[(s, b, j)] = new_stream(f"{prefix}.conv{j + 1}")
            last = f"{prefix}.conv{len(convs)}"
            if block.downsample is None:
                out = stream_of[current]
                writers[out].append(score(sd, last))
            else:
                out = new_stream(last, f"{prefix}.downsample.conv")
            current = (s, b, len(convs) - 1)
            stream_of[current] = out
    scores = [torch.stack(w).sum(0) for w in writers]
    return _Streams(stream_of, scores)


def taylor_importance(teacher: ResNet, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                      ) -> dict[str, torch.Tensor]:
    """Per output channel of every conv of `teacher`: the first-order Taylor estimate of
    how much the loss changes when the channel is removed, |sum over pixels of a * dL/da|
    summed over images, where `a` is the conv's output after its BatchNorm (Molchanov et
    al., "Importance Estimation for Neural Network Pruning", CVPR 2019). `batches`: (images,
    labels) on the teacher's device; the loss is the cross-entropy. Returns conv name ->
    scores [channels]."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in teacher.named_modules():
        if isinstance(module, Projection):  # conv (+ BN when it has one)
            conv = f"{name}.conv"
        elif isinstance(module, nn.BatchNorm2d) and ".downsample." not in f".{name}":
            conv = name.replace("bn", "conv")
        else:
            continue

        def keep(_: nn.Module, __: Any, out: torch.Tensor, conv: str = conv) -> None:
            out.retain_grad()
            outputs[conv] = out
        hooks.append(module.register_forward_hook(keep))
    was_training = teacher.training
    teacher.eval()
    scores: dict[str, torch.Tensor] = {}
    try:
        for images, labels in batches:
            teacher.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(teacher(images), labels).backward()
            for conv, out in outputs.items():
                assert out.grad is not None
                s = (out * out.grad).sum((2, 3)).abs().sum(0).detach()
                scores[conv] = scores[conv] + s if conv in scores else s
            outputs.clear()
    finally:
        for h in hooks:
            h.remove()
        teacher.zero_grad(set_to_none=True)
        teacher.train(was_training)
    return scores


def reorder_channels(teacher: ResNet, importance: Mapping[str, torch.Tensor] | None = None
                     ) -> ResNet:
    """A copy of the unpruned `teacher` computing the same function, with the channels of
    every residual stream and of every inner conv sorted by importance, most important
    first, so that the first c channels of any tensor are its best c.

    One permutation per stream (see the module docstring) is applied to the output
    channels of every conv and BatchNorm writing into it and to the input channels of
    every conv (and the classifier) reading it; identity shortcuts join tensors of one
    stream, so they stay identities. `importance`: conv name -> per-channel scores (e.g.
    `taylor_importance`); default: the L1 norms of the filters."""
    shape: Shape = teacher.shape
    if not shape.is_full:
        raise ValueError(f"reorder_channels needs the unpruned network, got {shape.describe()}")
    streams = _rank_streams(teacher, importance)
    perm = [torch.argsort(s, descending=True, stable=True) for s in streams.scores]
    sd = {k: v.detach().clone() for k, v in teacher.state_dict().items()}

    def write(conv: str, out_key: _TensorKey, in_key: _TensorKey | None) -> None:
        rows = perm[streams.stream_of[out_key]]
        weight = sd[f"{conv}.weight"][rows]
        if in_key is not None:
            weight = weight[:, perm[streams.stream_of[in_key]]]
        sd[f"{conv}.weight"] = weight.contiguous()
        bn = conv.replace("downsample.conv", "downsample.bn").replace("conv", "bn")
        for part in ("weight", "bias", "running_mean", "running_var"):
            if f"{bn}.{part}" in sd:
                sd[f"{bn}.{part}"] = sd[f"{bn}.{part}"][rows].contiguous()

    write("conv1", "stem", None)
    current: _TensorKey = "stem"
    for s, stage in enumerate(shape.skeleton.stages):
        for b, blk in enumerate(stage):
            prefix, last = f"layer{s + 1}.{b}", len(blk.convs) - 1
            previous = current
            for j in range(len(blk.convs)):
                write(f"{prefix}.conv{j + 1}", (s, b, j), previous)
                previous = (s, b, j)
            if f"{prefix}.downsample.conv.weight" in sd:
                write(f"{prefix}.downsample.conv", (s, b, last), current)
            current = (s, b, last)
    sd["fc.weight"] = sd["fc.weight"][:, perm[streams.stream_of[current]]].contiguous()
    out = build_model(shape)
    load_state_checked(out, sd, "reordered teacher")
    return out.to(next(teacher.parameters()).device).train(teacher.training)


def _check_compatible(shape: Shape, teacher: Shape) -> None:
    same = ("family", "block", "depths", "in_channels", "num_classes")
    diff = [f"{k}: {getattr(shape, k)} vs {getattr(teacher, k)}" for k in same
            if getattr(shape, k) != getattr(teacher, k)]
    if diff:
        raise ValueError("cannot inherit weights from a teacher of another architecture "
                         f"(pruned shape vs teacher: {'; '.join(diff)}); use a teacher built "
                         "from the same model, or drop --inherit")
    for s, (kept, have) in enumerate(zip(shape.blocks, teacher.blocks, strict=True)):
        if kept > have:
            raise ValueError(f"cannot inherit weights: stage {s + 1} keeps {kept} blocks but the "
                             f"teacher has only {have}; drop --inherit")


def inherit_weights(shape: Shape, teacher: ResNet) -> ResNet:
    """A network of `shape` initialised from `teacher` (same model, wider or equal everywhere).

    See the module docstring for the channel-selection rule.
    """
    tshape: Shape = teacher.shape
    _check_compatible(shape, tshape)
    streams = _rank_streams(teacher)
    tsd = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
    student = build_model(shape)
    new = {k: v.clone() for k, v in student.state_dict().items()}

    def copy_bn(bn: str, rows: torch.Tensor) -> None:
        if f"{bn}.weight" not in new:  # projection without BN
            return
        for part in ("weight", "bias", "running_mean", "running_var"):
            new[f"{bn}.{part}"] = tsd[f"{bn}.{part}"][rows].clone()
        new[f"{bn}.num_batches_tracked"] = tsd[f"{bn}.num_batches_tracked"].clone()

    def copy_conv(name: str, rows: torch.Tensor, cols: torch.Tensor | None) -> None:
        weight = tsd[f"{name}.weight"][rows]
        new[f"{name}.weight"] = (weight if cols is None else weight[:, cols]).clone()

    rows = streams.keep("stem", shape.widths[0], "conv1")
    copy_conv("conv1", rows, None)
    copy_bn("bn1", rows)
    teacher_in: _TensorKey = "stem"  # the teacher's tensor feeding the next block
    width_in = shape.widths[0]
    for s, stage in enumerate(student.stage_modules()):
        teacher_stage = teacher.stage_modules()[s]
        for b, block in enumerate(stage):
            prefix = f"layer{s + 1}.{b}"
            convs = shape.skeleton.stages[s][b].convs
            in_cols = streams.keep(teacher_in, width_in, f"{prefix} input")
            cols = in_cols
            for j, conv in enumerate(convs):
                rows = streams.keep((s, b, j), shape.widths[conv.slot], f"{prefix}.conv{j + 1}")
                copy_conv(f"{prefix}.conv{j + 1}", rows, cols)
                copy_bn(f"{prefix}.bn{j + 1}", rows)
                cols = rows
            if block.downsample is not None:
                ds = f"{prefix}.downsample"
                if teacher_stage[b].downsample is not None:
                    copy_conv(f"{ds}.conv", rows, in_cols)
                    copy_bn(f"{ds}.bn", rows)
                else:  # the teacher's identity, restricted to the kept channels
                    carry = (rows[:, None] == in_cols[None, :]).to(new[f"{ds}.conv.weight"].dtype)
                    new[f"{ds}.conv.weight"] = carry[:, :, None, None]
                    if f"{ds}.bn.weight" in new:
                        bn = block.downsample.bn
                        new[f"{ds}.bn.weight"] = torch.ones(len(rows))
                        new[f"{ds}.bn.bias"] = torch.zeros(len(rows))
                        new[f"{ds}.bn.running_mean"] = torch.zeros(len(rows))
                        # 1 - eps makes eval-mode BN exactly the identity
                        new[f"{ds}.bn.running_var"] = torch.full((len(rows),), 1.0 - bn.eps)
            teacher_in, width_in = (s, b, len(convs) - 1), len(rows)
        # the teacher's next stage reads the teacher's last kept block of this stage
        teacher_in = (s, tshape.blocks[s] - 1, len(shape.skeleton.stages[s][0].convs) - 1)
    fc_cols = streams.keep(teacher_in, width_in, "fc input")
    new["fc.weight"] = tsd["fc.weight"][:, fc_cols].clone()
    new["fc.bias"] = tsd["fc.bias"].clone()
    load_state_checked(student, new, "inherited weights")
    return student
