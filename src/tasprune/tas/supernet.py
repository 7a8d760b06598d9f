"""The searchable network: the unpruned module itself, its Conv2d, BatchNorm2d and Linear
layers swapped for full-size layers that compute only the channels the current
architecture asks for, its skippable blocks wrapped in gates, its free shortcuts given a
projection that runs where the widths differ.

The module's own `forward` runs unchanged. Before each pass `SuperNet.forward` puts the
architecture (an `Arch`: a `Choice` per searched group, one per stage) where the swapped
layers read it; then:

* a conv or linear computes `c_max` output channels of its group (the widest candidate)
  from the input channels present (the first channels of every group it reads, group
  after group for a concatenation);
* the BatchNorm reading a group keeps one set of statistics and affine weights per width
  choice (`ChoiceBN`), normalises each candidate's first channels with its own, resizes
  them to `c_max` and mixes them (channel-wise interpolation, or zero-padding); a conv
  or linear that no BatchNorm follows mixes its candidates in its weights;
* a block with a free shortcut adds its input through a 1x1 conv + per-choice BatchNorm
  when its input and output widths differ (the pruned network's projection), else
  directly;
* a stage keeps its first d blocks. Sampled depths (the paper's relaxation, and the
  default's weight step) mix the stage's output after every candidate d, each resized to
  the widest; the expected network (`Distributions.expected`, `Choice.gate`) takes the
  nested relaxation: the blocks between two consecutive candidates d_i < d_(i+1) form a
  group kept with probability q_i = P(d >= d_(i+1)) / P(d >= d_i) given the blocks before
  it, and the stage computes y <- y + q_i (group(y) - y), group by group (narrower
  tensors zero-padded). A fixed depth runs its first d blocks and skips the others.

At one-hot logits the supernet computes what `subnet(shape)`, the module pruned to the
argmax shape (`tasprune.net.surgery.shrink`), computes.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tasprune.net.plan import LayerPlan, PlanLayer, PlanShape
from tasprune.net.surgery import set_module, shrink
from tasprune.tas.layers import Arch, Choice, ChoiceBN, mixing, resize_matrix, sampled_choices
from tasprune.tas.sampling import gumbel_softmax, gumbel_topk, masked_softmax
from tasprune.tas.space import SearchSpace


def _mask(choices: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """[rows, max choices] mask of the real entries of a ragged list of choices."""
    mask = torch.zeros(len(choices), max((len(c) for c in choices), default=1), dtype=torch.bool)
    for r, c in enumerate(choices):
        mask[r, : len(c)] = True
    return mask


class Distributions(nn.Module):
    """The architecture logits of a space (one row per searched group, one per stage), what
    is sampled from them and their argmax."""

    space: SearchSpace

    def _init_distributions(self, space: SearchSpace) -> None:
        self.space = space
        wmask, dmask = _mask(space.widths), _mask(space.depths)
        # logits of every group (stage) in one padded matrix; the masks mark real choices
        self.register_buffer("width_mask", wmask, persistent=False)
        self.register_buffer("depth_mask", dmask, persistent=False)
        self.width_logits = nn.Parameter(torch.zeros(wmask.shape))
        self.depth_logits = nn.Parameter(torch.zeros(dmask.shape))

    def _reset_logits(self, generator: torch.Generator | None) -> None:
        """Architecture logits from N(0, 0.01^2) (TAS)."""
        with torch.no_grad():
            for logits, mask in ((self.width_logits, self.width_mask),
                                 (self.depth_logits, self.depth_mask)):
                logits.normal_(0.0, 0.01, generator=generator).mul_(mask)

    # parameters ------------------------------------------------------------------------
    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture logits (optimised by Adam on the valid half)."""
        return [self.width_logits, self.depth_logits]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Everything else: convs, BNs, classifier (optimised by SGD on the train half)."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    # architectures ---------------------------------------------------------------------
    def sample(self, tau: float, k: int = 2, generator: torch.Generator | None = None,
               pad: bool = False) -> Arch:
        """Fresh Gumbel samples of every width (top-k) and depth (soft) distribution;
        `pad`: mix candidates by zero-padding instead of channel-wise interpolation."""
        top = gumbel_topk(self.width_logits, self.width_mask, tau, k, generator)
        widths = sampled_choices(self.space.widths, top.index, top.weight, pad)
        probs = gumbel_softmax(self.depth_logits, self.depth_mask, tau, generator)
        order = torch.arange(probs.shape[1], device=probs.device).expand_as(probs)
        return Arch(widths, sampled_choices(self.space.depths, order, probs, pad))

    def expected(self) -> Arch:
        """Every choice of every distribution weighted by its probability, no noise: group g
        outputs channel i scaled by P(c_g > i) (zero-padded candidates), and the depths take
        the nested relaxation (see the module docstring)."""
        arch = []
        for logits, mask, values in ((self.width_logits, self.width_mask, self.space.widths),
                                     (self.depth_logits, self.depth_mask, self.space.depths)):
            probs = masked_softmax(logits, mask)
            order = torch.arange(probs.shape[1], device=probs.device).expand_as(probs)
            arch.append(sampled_choices(values, order, probs, pad=True))
        depths = tuple(dataclasses.replace(c, gate=True) for c in arch[1])
        return Arch(widths=arch[0], depths=depths)

    def argmax_indices(self) -> tuple[list[int], list[int]]:
        """The most probable choice of every group and stage."""
        def best(logits: torch.Tensor, mask: torch.Tensor) -> list[int]:
            return logits.detach().masked_fill(~mask, float("-inf")).argmax(dim=1).tolist()
        return (best(self.width_logits, self.width_mask),
                best(self.depth_logits, self.depth_mask))

    def derive(self) -> PlanShape:
        """The argmax shape: the most probable width of every group and depth of every
        stage."""
        return self.space.shape(*self.argmax_indices())


# the current pass -----------------------------------------------------------------------
class _StageRun:
    """One stage's part of the current pass (see the module docstring)."""

    def __init__(self, depth: Choice, blocks: int) -> None:
        self.depth = depth
        self.blocks = blocks
        self.kept = [d - 1 for d in depth.values]  # skippable blocks kept, per candidate
        self.outs: dict[int, torch.Tensor] = {}
        self.start: torch.Tensor | None = None
        if depth.weights is not None and depth.gate:
            order = sorted(range(len(self.kept)), key=self.kept.__getitem__)
            self.sorted = [self.kept[i] for i in order]
            probs = depth.weights[order]
            self.keep = probs.flip(0).cumsum(0).flip(0)  # keep[i] = P(k >= sorted[i])

    def step(self, j: int, x: torch.Tensor, block: nn.Module) -> torch.Tensor:
        if self.depth.weights is None:
            return block(x) if j < self.kept[0] else x
        if self.depth.gate:
            return self._nested(j, x, block)
        return self._mixed(j, x, block)

    def _mixed(self, j: int, x: torch.Tensor, block: nn.Module) -> torch.Tensor:
        if j == 0 and 0 in self.kept:
            self.outs[0] = x
        y = block(x) if j < max(self.kept) else x
        if j + 1 in self.kept:
            self.outs[j + 1] = y
        if j < self.blocks - 1:
            return y
        assert self.depth.weights is not None
        widest = max(o.shape[1] for o in self.outs.values())
        total: torch.Tensor | None = None
        for n, k in enumerate(self.kept):
            o, p = self.outs[k], self.depth.weights[n]
            if o.shape[1] == widest:
                term = o * p
            else:
                a = resize_matrix(o.shape[1], widest, self.depth.pad, o.dtype, o.device)
                term = F.conv2d(o, (a * p)[:, :, None, None])
            total = term if total is None else total + term
        assert total is not None
        return total

    def _nested(self, j: int, x: torch.Tensor, block: nn.Module) -> torch.Tensor:
        kept = self.sorted
        if j < kept[0]:
            return block(x)
        if j >= kept[-1]:
            return x
        i = next(i for i in range(1, len(kept)) if kept[i] > j)  # group i: [kept[i-1], kept[i])
        if j == kept[i - 1]:
            self.start = x
        z = block(x)
        if j < kept[i] - 1:
            return z
        start = self.start
        assert start is not None
        q = self.keep[i] / self.keep[i - 1].clamp_min(1e-12)
        if z.shape[1] != start.shape[1]:
            c = max(z.shape[1], start.shape[1])
            start, z = (F.pad(t, (0, 0, 0, 0, 0, c - t.shape[1])) for t in (start, z))
        return start + q * (z - start)


class _Context:
    """The architecture of the current pass, where every swapped layer reads it."""

    def __init__(self, plan: LayerPlan) -> None:
        self.plan = plan
        self.full = [g.size for g in plan.groups]
        self.outputs = [plan.stage_outputs(s) for s in range(len(plan.stages))]
        self.sizes = [len(s) for s in plan.stages]
        self.choices: dict[int, Choice] = {}
        self.depths: tuple[Choice, ...] = ()
        self.runs: list[_StageRun] = []
        self._index: dict[tuple[Any, ...], torch.Tensor] = {}

    def set(self, arch: Arch) -> None:
        self.choices = dict(zip(self.plan.searched, arch.widths, strict=True))
        self.depths = arch.depths
        self.runs = [_StageRun(d, n) for d, n in zip(arch.depths, self.sizes, strict=True)]

    def width(self, g: int) -> int:
        choice = self.choices.get(g)
        return self.full[g] if choice is None else choice.max

    def choice(self, g: int) -> Choice:
        return self.choices.get(g) or Choice((self.full[g],), (0,))

    def read_width(self, layer: PlanLayer, i: int) -> int:
        """Channels of read `i` present in this pass (a stage's output: the widest of the
        outputs its depth candidates give)."""
        g, s = layer.reads[i], layer.stage_read(i)
        if s is None:
            return self.width(g)
        groups = self.outputs[s]
        return max(self.width(groups[d - 1] if groups[d - 1] is not None else g)
                   for d in self.depths[s].values)

    def reads(self, layer: PlanLayer, device: torch.device) -> torch.Tensor | slice:
        """The full input positions of the channels present (a slice when contiguous)."""
        widths = tuple(self.read_width(layer, i) for i in range(len(layer.reads)))
        if len(widths) == 1:
            return slice(0, widths[0] * layer.spatial)
        key = (layer.reads, widths, layer.spatial, device)
        if key not in self._index:
            parts, offset = [], 0
            for g, w in zip(layer.reads, widths, strict=True):
                parts.append(torch.arange(offset, offset + w) * layer.spatial)
                offset += self.full[g]
            idx = torch.cat(parts)
            idx = (idx[:, None] + torch.arange(layer.spatial)).flatten()
            self._index[key] = idx.to(device)
        return self._index[key]


# the swapped layers ---------------------------------------------------------------------
def _mixed(w: torch.Tensor, b: torch.Tensor | None, choice: Choice, normed: bool
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold the mixing of a group's candidates into the weights of a layer that writes it
    with no BatchNorm after (a BatchNorm mixes them itself)."""
    if normed or choice.weights is None:
        return w, b
    n = len(choice.values)
    shift = None if b is None else b[None].expand(n, -1)
    mix, bias = mixing(choice, w.new_ones(n, w.shape[0]), shift)
    return torch.einsum("oc,c...->o...", mix, w), bias


class _Conv(nn.Module):
    def __init__(self, conv: nn.Conv2d, layer: PlanLayer, ctx: _Context) -> None:
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups = conv.groups
        self.layer, self.ctx = layer, ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, ctx = self.layer, self.ctx
        sel = ctx.reads(layer, x.device)
        if layer.depthwise:
            b = None if self.bias is None else self.bias[sel]
            return F.conv2d(x, self.weight[sel], b, self.stride, self.padding,  # type: ignore[arg-type]
                            self.dilation, x.shape[1])  # type: ignore[arg-type]
        assert layer.writes is not None
        c = ctx.width(layer.writes)
        w = self.weight[:c] if self.groups > 1 else self.weight[:c][:, sel]
        b = None if self.bias is None else self.bias[:c]
        w, b = _mixed(w, b, ctx.choice(layer.writes), layer.norm is not None)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation,  # type: ignore[arg-type]
                        self.groups)


class _Linear(nn.Module):
    def __init__(self, linear: nn.Linear, layer: PlanLayer, ctx: _Context) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.layer, self.ctx = layer, ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, ctx = self.layer, self.ctx
        assert layer.writes is not None
        c = ctx.width(layer.writes)
        w = self.weight[:c][:, ctx.reads(layer, x.device)]
        b = None if self.bias is None else self.bias[:c]
        w, b = _mixed(w, b, ctx.choice(layer.writes), False)
        return F.linear(x, w, b)


class _BatchNorm(nn.Module):
    """One `ChoiceBN` per group the BatchNorm reads (one row for a fixed group)."""

    def __init__(self, layer: PlanLayer, ctx: _Context, choices: Mapping[int, tuple[int, ...]]
                 ) -> None:
        super().__init__()
        self.layer, self.ctx = layer, ctx
        self.parts = nn.ModuleList(ChoiceBN(choices.get(g, (ctx.full[g],)), ctx.full[g])
                                   for g in layer.reads)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        if len(self.parts) == 1:
            return self.parts[0](y, ctx.choice(self.layer.reads[0]))
        chunks = y.split([ctx.width(g) for g in self.layer.reads], dim=1)
        return torch.cat([bn(chunk, ctx.choice(g)) for bn, chunk, g in
                          zip(self.parts, chunks, self.layer.reads, strict=True)], dim=1)


class _Shortcut(nn.Module):
    """A free shortcut: the identity where the block's input and output widths are equal,
    else a 1x1 conv (starting as the identity) and a per-choice BatchNorm."""

    def __init__(self, conv: PlanLayer, bn: PlanLayer, ctx: _Context,
                 choices: Mapping[int, tuple[int, ...]]) -> None:
        super().__init__()
        assert conv.when is not None and conv.writes is not None
        a, b = conv.when
        eye = torch.eye(ctx.full[b], ctx.full[a])
        self.conv = nn.Module()
        self.conv.weight = nn.Parameter(eye[:, :, None, None].contiguous())
        self.bn = _BatchNorm(bn, ctx, choices)
        self.out, self.ctx = b, ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.ctx.width(self.out)
        if x.shape[1] == c:
            return x
        weight = self.conv.weight[:c, : x.shape[1]]  # type: ignore[index]
        return self.bn(F.conv2d(x, weight))


class _Gated(nn.Module):
    """A skippable block run by its stage's part of the pass."""

    def __init__(self, block: nn.Module, stage: int, index: int, ctx: _Context) -> None:
        super().__init__()
        self.block, self.stage, self.index, self.ctx = block, stage, index, ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ctx.runs[self.stage].step(self.index, x, self.block)


# the network ---------------------------------------------------------------------------
class SuperNet(Distributions):
    """The searchable form of the network `model` (see the module docstring), with the
    weights of `model` (every width choice's BatchNorm from the first channels of the
    model's)."""

    def __init__(self, space: SearchSpace, model: nn.Module,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self._init_distributions(space)
        plan = space.plan
        for layer in plan.layers:
            if layer.kind == "bn" and layer.after:
                raise ValueError(f"{layer.name}: a BatchNorm reading a stage's output whose "
                                 "width depends on the stage's depth cannot be searched")
        self.__dict__["base"] = copy.deepcopy(model).cpu()  # not a submodule: the layout
        self.__dict__["ctx"] = ctx = _Context(plan)
        net = copy.deepcopy(model)
        choices = dict(zip(plan.searched, space.widths, strict=True))
        layers: dict[str, nn.Module] = {}
        for layer in plan.layers:
            if layer.when is not None:
                if layer.kind == "conv":
                    assert layer.norm is not None
                    new: nn.Module = _Shortcut(layer, plan.layer(layer.norm), ctx, choices)
                    set_module(net, layer.name.rsplit(".", 1)[0], new)
                    layers[layer.name] = new.conv
                    layers[layer.norm] = new.bn
                continue
            old = net.get_submodule(layer.name)
            if layer.kind == "conv":
                assert isinstance(old, nn.Conv2d)
                new = _Conv(old, layer, ctx)
            elif layer.kind == "linear":
                assert isinstance(old, nn.Linear)
                new = _Linear(old, layer, ctx)
            else:
                new = _BatchNorm(layer, ctx, choices)
            set_module(net, layer.name, new)
            layers[layer.name] = new
        for b, block in enumerate(plan.blocks):
            set_module(net, block.name, _Gated(net.get_submodule(block.name), block.stage,
                                               block.index, ctx))
        self.net = net
        self.__dict__["layers"] = layers
        self.load_teacher(model.state_dict())
        self._reset_logits(generator)

    @property
    def plan(self) -> LayerPlan:
        return self.space.plan

    def forward(self, x: torch.Tensor, arch: Arch | None = None) -> torch.Tensor:
        """Class scores under `arch` (default: the fixed argmax shape)."""
        self.ctx.set(arch if arch is not None else Arch.fixed(self.space, self.derive()))
        return self.net(x.contiguous(memory_format=torch.channels_last))

    # weights in and out ----------------------------------------------------------------
    def load_teacher(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take the weights of the unpruned network (a state dict in its own layout)."""
        wanted = set(self.base.state_dict())
        missing, unexpected = sorted(wanted - set(state)), sorted(set(state) - wanted)
        if missing or unexpected:
            raise ValueError(f"the teacher's state dict does not fit the network: missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for layer in self.plan.layers:
                if layer.when is not None:
                    continue  # not in the unpruned network: the shortcut starts as identity
                module = self.layers[layer.name]
                own = {k: v for k, v in state.items() if k.rsplit(".", 1)[0] == layer.name}
                for key, value in own.items():
                    name = key.rsplit(".", 1)[1]
                    if name == "num_batches_tracked":
                        continue
                    if layer.kind != "bn":
                        target = getattr(module, name)
                        _check(key, value, target.shape)
                        target.copy_(value)
                        continue
                    _check(key, value, (sum(self.ctx.full[r] for r in layer.reads),))
                    offset = 0
                    for g, part in zip(layer.reads, module.parts, strict=True):
                        size = self.ctx.full[g]
                        piece = value[offset: offset + size]
                        for row, c in enumerate(part.choices):
                            getattr(part, name)[row, :c].copy_(piece[:c])
                        offset += size

    def full_state(self, shape: PlanShape) -> dict[str, torch.Tensor]:
        """A full-size state dict in the unpruned network's layout holding these weights
        (and those of the free shortcuts' projections), each BatchNorm with the statistics
        of its group's width in `shape`."""
        wi, _ = self.space.indices_of(shape)
        row = {g: wi[i] for i, g in enumerate(self.plan.searched)}
        out = {k: v.detach().clone() for k, v in self.base.state_dict().items()}
        for layer in self.plan.layers:
            module = self.layers[layer.name]
            if layer.kind != "bn":
                out[f"{layer.name}.weight"] = module.weight.detach().cpu().clone()
                if getattr(module, "bias", None) is not None:
                    out[f"{layer.name}.bias"] = module.bias.detach().cpu().clone()
                continue
            for name in ("weight", "bias", "running_mean", "running_var"):
                out[f"{layer.name}.{name}"] = torch.cat([
                    getattr(part, name)[row.get(g, 0)].detach().cpu()
                    for g, part in zip(layer.reads, module.parts, strict=True)])
        return out

    def subnet(self, shape: PlanShape) -> nn.Module:
        """The network pruned to `shape` with these weights, on this supernet's device."""
        device = self.width_logits.device
        return shrink(self.base, shape, self.full_state(shape)).to(device)


def _check(key: str, value: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> None:
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"the teacher's {key} has shape {tuple(value.shape)}, expected "
                         f"{tuple(shape)}")
