"""FLOPs and parameters of a ResNet-family network, as pure functions.

Convention (the TAS paper's and its code's): FLOPs are multiply-accumulates of
every convolution and linear layer. A conv counts `c_in * c_out * k * k * H_out
* W_out` (no bias); the linear classifier counts `in * out + out`. BatchNorm,
ReLU, pooling and residual additions are not counted. Params count every
learnable tensor: conv and linear weights, linear bias, BatchNorm weight and bias.

One walk over the network (`_layers`) serves two purposes:

* exact counts of a `Shape`: widths are ints, every kept block counts once;
* the differentiable *expected* cost used by the search: each width is a
  `WidthDist` (candidate widths and their probabilities, tensors) and each
  block is weighted by the probability that its stage keeps it.

Products of two widths use `E[a*b] = E[a] * E[b]` (slots are sampled
independently); a stride-1 projection shortcut exists only when the block's
input and output widths differ, so its expected cost is `E[a*b*(a != b)]` (0 when
both are one `WidthDist` object: widths tied to one distribution).
With one-hot distributions the expected cost equals the exact count.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from tasprune.families import Skeleton
from tasprune.shape import Shape

Number = int | float | torch.Tensor


@dataclass(frozen=True)
class WidthDist:
    """A distribution over the width of one tensor: candidate `values`, `probs`."""

    values: torch.Tensor
    probs: torch.Tensor

    def mean(self) -> torch.Tensor:
        return (self.values * self.probs).sum()

    @staticmethod
    def mixture(parts: Sequence[WidthDist], weights: torch.Tensor) -> WidthDist:
        return WidthDist(
            values=torch.cat([p.values for p in parts]),
            probs=torch.cat([w * p.probs for p, w in zip(parts, weights, strict=True)]),
        )


Width = int | WidthDist


@dataclass(frozen=True)
class DepthDist:
    """A distribution over how many blocks a stage keeps: `choices` (ints), `probs`."""

    choices: tuple[int, ...]
    probs: torch.Tensor

    def keep_prob(self, block: int) -> torch.Tensor:
        """P(block `block` (0-based) is kept) = sum of probs of choices > block."""
        mask = torch.tensor([d > block for d in self.choices], device=self.probs.device)
        return (self.probs * mask).sum()


Depth = int | DepthDist


@dataclass(frozen=True)
class Layer:
    """One counted layer: name as in the built module, sizes, FLOPs and params."""

    name: str
    kind: str  # "conv" or "linear"
    in_channels: Number
    out_channels: Number
    kernel: int
    out_res: int
    flops: Number
    params: Number
    # for a latency model (tasprune.latency_table): the widths as given (ints or
    # distributions), the probability that the layer runs, the operation it times
    # (role and sizes, no widths) and whether it runs only when its widths differ
    cin: Width = 0
    cout: Width = 0
    keep: Number = 1
    op: tuple[object, ...] = ()
    conditional: bool = False


def _mean(w: Width) -> Number:
    return w if isinstance(w, int) else w.mean()


def _product_if_differ(a: Width, b: Width, with_a: bool = True) -> Number:
    """E[a * b * (a != b)] for independent a and b (exact for ints); without `with_a`,
    E[b * (a != b)]."""
    if isinstance(a, int) and isinstance(b, int):
        return (a if with_a else 1) * b if a != b else 0
    if a is b:  # one variable (tied widths): never differs from itself
        return 0
    da, db = (_as_dist(w, ref) for w, ref in ((a, b), (b, a)))
    same = (da.values[:, None] == db.values[None, :]).to(da.probs.dtype)
    both = da.probs[:, None] * db.probs[None, :] * db.values[None, :]
    if with_a:
        return da.mean() * db.mean() - (same * both * da.values[:, None]).sum()
    return db.mean() - (same * both).sum()


def _as_dist(w: Width, ref: Width) -> WidthDist:
    if isinstance(w, WidthDist):
        return w
    assert isinstance(ref, WidthDist)
    return WidthDist(values=ref.values.new_tensor([float(w)]), probs=ref.probs.new_ones(1))


def _layers(skel: Skeleton, widths: Sequence[Width], depths: Sequence[Depth]) -> Iterator[Layer]:
    """Every counted layer, FLOPs and params already weighted by the keep probability."""

    def conv(name: str, cin: Width, cout: Width, k: int, res: int, weight: Number = 1,
             bn: bool = True, cross: Number | None = None, op: tuple[object, ...] = ()
             ) -> Layer:
        # `cross` replaces E[cin*cout] where the layer's existence depends on the widths
        # (and E[cout * exists] replaces E[cout] for its BN)
        macs = _mean(cin) * _mean(cout) if cross is None else cross
        outs = _mean(cout) if cross is None else _product_if_differ(cin, cout, with_a=False)
        params = macs * k * k + (2 * outs if bn else 0)
        return Layer(name, "conv", _mean(cin), _mean(cout), k, res,
                     weight * macs * k * k * res * res, weight * params, cin, cout, weight, op,
                     cross is not None)

    stem = skel.stem
    yield conv("conv1", skel.in_channels, widths[0], stem.kernel, stem.out_res,
               op=("stem", stem.kernel, stem.stride, skel.resolution, skel.family.stem_pool))
    x: Width = widths[0]
    res = stages_in_res(skel)
    for s, stage in enumerate(skel.stages):
        depth = depths[s]
        stage_outs: list[Width] = []
        for blk in stage:
            if isinstance(depth, int):
                if blk.index >= depth:
                    break
                keep: Number = 1
            else:
                keep = depth.keep_prob(blk.index)
            prefix = f"layer{s + 1}.{blk.index}"
            cin, conv_res = x, res
            for j, c in enumerate(blk.convs):
                cout = widths[c.slot]
                # the last conv's BN output is added to the shortcut, then ReLU
                role = "conv_add" if j == len(blk.convs) - 1 else "conv"
                yield conv(f"{prefix}.conv{j + 1}", cin, cout, c.kernel, c.out_res, keep,
                           op=(role, c.kernel, c.stride, conv_res))
                cin, conv_res = cout, c.out_res
            name = f"{prefix}.downsample.conv"
            op = ("shortcut", blk.stride, res, blk.shortcut_bn)
            if blk.stride > 1:
                yield conv(name, x, cin, 1, blk.out_res, keep, bn=blk.shortcut_bn, op=op)
            else:
                differ = _product_if_differ(x, cin)
                if not (isinstance(differ, int) and differ == 0):
                    yield conv(name, x, cin, 1, blk.out_res, keep, cross=differ, op=op)
            x, res = cin, blk.out_res
            stage_outs.append(x)
        if isinstance(depth, DepthDist):
            # the next stage sees the last kept block's output, whichever depth is chosen
            parts = [stage_outs[d - 1] for d in depth.choices]
            if not all(isinstance(p, WidthDist) for p in parts):
                raise TypeError("a depth distribution needs width distributions for every slot")
            x = WidthDist.mixture(parts, depth.probs)  # type: ignore[arg-type]
    macs = _mean(x) * skel.num_classes + skel.num_classes
    yield Layer("fc", "linear", _mean(x), skel.num_classes, 1, 1, macs, macs, x,
                skel.num_classes, 1, ("fc", res))


def stages_in_res(skel: Skeleton) -> int:
    """Input resolution of the first stage (after the stem and its max pool, if any)."""
    res = skel.stem.out_res
    return -(-res // 2) if skel.family.stem_pool else res


def layer_table(shape: Shape) -> list[Layer]:
    """Per-layer exact FLOPs and params of the network a Shape describes."""
    return list(_layers(shape.skeleton, shape.widths, shape.blocks))


def count_flops(shape: Shape) -> int:
    """Exact multiply-accumulates of conv and linear layers (see module docstring); a
    `tasprune.plan.PlanShape` counts itself by the same convention."""
    if not isinstance(shape, Shape):
        return shape.count("flops")
    return int(sum(layer.flops for layer in layer_table(shape)))


def count_params(shape: Shape) -> int:
    """Exact learnable parameters (conv/linear weights, linear bias, BN affine)."""
    if not isinstance(shape, Shape):
        return shape.count("params")
    return int(sum(layer.params for layer in layer_table(shape)))


def expected_flops(
    skel: Skeleton, widths: Sequence[WidthDist], depths: Sequence[DepthDist]
) -> torch.Tensor:
    """Differentiable expected FLOPs under independent width and depth distributions."""
    return _expected_sum(skel, widths, depths, "flops")


def expected_params(
    skel: Skeleton, widths: Sequence[WidthDist], depths: Sequence[DepthDist]
) -> torch.Tensor:
    """Differentiable expected parameter count (as `expected_flops`)."""
    return _expected_sum(skel, widths, depths, "params")


def _expected_sum(skel: Skeleton, widths: Sequence[WidthDist], depths: Sequence[DepthDist],
                  field: str) -> torch.Tensor:
    total = sum(getattr(layer, field) for layer in _layers(skel, widths, depths))
    assert isinstance(total, torch.Tensor)
    return total


def expected_layers(
    skel: Skeleton, widths: Sequence[WidthDist], depths: Sequence[DepthDist]
) -> list[Layer]:
    """The layers of the expected cost, each with its width distributions and keep
    probability (what a latency model takes its expectation over)."""
    return list(_layers(skel, widths, depths))
