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

from dataclasses import dataclass

import torch

from tasprune.models import ResNet, build_model
from tasprune.shape import Shape
from tasprune.train.checkpoint import load_state_checked

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


def _rank_streams(teacher: ResNet) -> _Streams:
    sd = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
    stream_of: dict[_TensorKey, int] = {"stem": 0}
    writers: list[list[torch.Tensor]] = [[_l1(sd["conv1.weight"])]]

    def new_stream(*weights: torch.Tensor) -> int:
        writers.append([_l1(w) for w in weights])
        return len(writers) - 1

    current: _TensorKey = "stem"
    shape = teacher.shape
    for s, stage in enumerate(teacher.stage_modules()):
        for b, block in enumerate(stage):
            prefix = f"layer{s + 1}.{b}"
            convs = shape.skeleton.stages[s][b].convs
            for j in range(len(convs) - 1):
                stream_of[(s, b, j)] = new_stream(sd[f"{prefix}.conv{j + 1}.weight"])
            last = sd[f"{prefix}.conv{len(convs)}.weight"]
            if block.downsample is None:
                out = stream_of[current]
                writers[out].append(_l1(last))
            else:
                out = new_stream(last, sd[f"{prefix}.downsample.conv.weight"])
            current = (s, b, len(convs) - 1)
            stream_of[current] = out
    scores = [torch.stack(w).sum(0) for w in writers]
    return _Streams(stream_of, scores)


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
