"""The searchable form of any planned network: the user's own module, its Conv2d,
BatchNorm2d and Linear layers swapped for full-size layers that compute only the
channels the current architecture asks for, its skippable blocks wrapped in gates.

The module's own `forward` runs unchanged. Before each pass `PlanSuperNet.forward`
puts the architecture (an `Arch`: a `Choice` per searched group, one per stage) where
the swapped layers read it; then, as in the ResNet `SuperNet`:

* a conv or linear computes `c_max` output channels of its group (the widest
  candidate) from the input channels present (the first channels of every group it
  reads, group after group for a concatenation);
* the BatchNorm reading a group keeps one set of statistics and affine weights per
  width choice (`ChoiceBN`), normalises each candidate's first channels with its own,
  resizes them to `c_max` and mixes them (channel-wise interpolation, or zero-padding
  in the "expected" relaxation); a conv or linear that no BatchNorm follows mixes its
  candidates in its weights;
* a stage keeps its first k blocks: block j passes `x + q_j * (block(x) - x)` with
  `q_j = P(k > j) / P(k > j - 1)` under the stage's (sampled or expected) depth
  weights, the nested relaxation that is exact at one-hot weights (a skipped block
  is not run).

At one-hot logits the supernet computes what `subnet(shape)`, the user's module pruned
to the argmax shape (`tasprune.surgery.shrink`), computes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tasprune.plan import LayerPlan, PlanLayer, PlanShape
from tasprune.surgery import shrink
from tasprune.tas.space import PlanSpace
from tasprune.tas.supernet import Arch, Choice, ChoiceBN, Distributions, _mixing


class _Context:
    """The architecture of the current pass, where every swapped layer reads it."""

    def __init__(self, plan: LayerPlan) -> None:
        self.plan = plan
        self.full = [g.size for g in plan.groups]
        self.choices: dict[int, Choice] = {}
        self.gates: list[float | torch.Tensor] = [1.0] * len(plan.blocks)
        self._index: dict[tuple[Any, ...], torch.Tensor | slice] = {}

    def set(self, arch: Arch) -> None:
        self.choices = dict(zip(self.plan.searched, arch.widths, strict=True))
        gates: list[float | torch.Tensor] = []
        for block in self.plan.blocks:
            gates.append(_gate(arch.depths[block.stage], block.index))
        self.gates = gates

    def width(self, g: int) -> int:
        choice = self.choices.get(g)
        return self.full[g] if choice is None else choice.max

    def choice(self, g: int) -> Choice:
        return self.choices.get(g) or Choice((self.full[g],), (0,))

    def reads(self, layer: PlanLayer, device: torch.device) -> torch.Tensor | slice:
        """The full input positions of the channels present (a slice when contiguous)."""
        widths = tuple(self.width(g) for g in layer.reads)
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


def _gate(depth: Choice, j: int) -> float | torch.Tensor:
    """q_j of block j of a stage (see the module docstring)."""
    if depth.weights is None:
        return 1.0 if j < depth.values[0] else 0.0
    keep = [sum(depth.weights[n] for n, k in enumerate(depth.values) if k > i)
            for i in (j - 1, j)]
    if isinstance(keep[1], int) or float(keep[1].detach()) == 0.0:
        return 0.0
    return keep[1] / keep[0].clamp_min(1e-12) if j > 0 else keep[1]


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
            return F.conv2d(x, self.weight[sel], b, self.stride, self.padding, self.dilation,
                            x.shape[1])
        assert layer.writes is not None
        c = ctx.width(layer.writes)
        w, b = _in_out(self.weight, self.bias, c, sel)
        w, b = _mixed(w, b, ctx.choice(layer.writes), layer.normed)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)


class _Linear(nn.Module):
    def __init__(self, linear: nn.Linear, layer: PlanLayer, ctx: _Context) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.layer, self.ctx = layer, ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, ctx = self.layer, self.ctx
        assert layer.writes is not None
        w, b = _in_out(self.weight, self.bias, ctx.width(layer.writes),
                       ctx.reads(layer, x.device))
        w, b = _mixed(w, b, ctx.choice(layer.writes), False)
        return F.linear(x, w, b)


def _in_out(weight: torch.Tensor, bias: torch.Tensor | None, rows: int,
            cols: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor | None]:
    return weight[:rows][:, cols], None if bias is None else bias[:rows]


def _mixed(w: torch.Tensor, b: torch.Tensor | None, choice: Choice, normed: bool
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold the mixing of a group's candidates into the weights of a layer that writes it
    with no BatchNorm after (a BatchNorm mixes them itself)."""
    if normed or choice.weights is None:
        return w, b
    n = len(choice.values)
    shift = None if b is None else b[None].expand(n, -1)
    mix, bias = _mixing(choice, w.new_ones(n, w.shape[0]), shift)
    return torch.einsum("oc,c...->o...", mix, w), bias


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


class _Gated(nn.Module):
    """A skippable block run with its stage's gate."""

    def __init__(self, block: nn.Module, index: int, ctx: _Context) -> None:
        super().__init__()
        self.block, self.index, self.ctx = block, index, ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.ctx.gates[self.index]
        if isinstance(q, float):
            return self.block(x) if q == 1.0 else x
        return x + q * (self.block(x) - x)


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


class PlanSuperNet(Distributions):
    """The searchable form of a planned network (see the module docstring), initialised
    with the weights of `model` (every width choice's BatchNorm from the first channels
    of the model's)."""

    def __init__(self, space: PlanSpace, model: nn.Module,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self._init_distributions(space)
        plan = space.full.plan
        self.__dict__["base"] = copy.deepcopy(model).cpu()  # not a submodule: the layout
        self.__dict__["ctx"] = ctx = _Context(plan)
        net = copy.deepcopy(model)
        choices = dict(zip(plan.searched, space.widths, strict=True))
        layers: dict[str, nn.Module] = {}
        for layer in plan.layers:
            old = net.get_submodule(layer.name)
            new: nn.Module
            if layer.kind == "conv":
                assert isinstance(old, nn.Conv2d)
                new = _Conv(old, layer, ctx)
            elif layer.kind == "linear":
                assert isinstance(old, nn.Linear)
                new = _Linear(old, layer, ctx)
            else:
                new = _BatchNorm(layer, ctx, choices)
            _set(net, layer.name, new)
            layers[layer.name] = new
        for b, block in enumerate(plan.blocks):
            _set(net, block.name, _Gated(net.get_submodule(block.name), b, ctx))
        self.net = net
        self.__dict__["layers"] = layers
        self.load_teacher(model.state_dict())
        self._reset_logits(generator)

    @property
    def plan(self) -> LayerPlan:
        return self.space.full.plan

    def forward(self, x: torch.Tensor, arch: Arch | None = None) -> torch.Tensor:
        """Class scores under `arch` (default: the fixed argmax shape)."""
        self.ctx.set(arch if arch is not None else Arch.fixed(self.space, self.derive()))
        return self.net(x)

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
        """A full-size state dict in the unpruned network's layout holding these weights,
        each BatchNorm with the statistics of its group's width in `shape`."""
        wi, _ = self.space.indices_of(shape)
        row = {g: wi[i] for i, g in enumerate(self.plan.searched)}
        out = {k: v.detach().clone() for k, v in self.base.state_dict().items()}
        for layer in self.plan.layers:
            module = self.layers[layer.name]
            if layer.kind != "bn":
                out[f"{layer.name}.weight"] = module.weight.detach().cpu().clone()
                if module.bias is not None:
                    out[f"{layer.name}.bias"] = module.bias.detach().cpu().clone()
                continue
            for name in ("weight", "bias", "running_mean", "running_var"):
                out[f"{layer.name}.{name}"] = torch.cat([
                    getattr(part, name)[row.get(g, 0)].detach().cpu()
                    for g, part in zip(layer.reads, module.parts, strict=True)])
        return out

    def subnet(self, shape: PlanShape) -> nn.Module:
        """The user's network pruned to `shape` with these weights, on this device."""
        device = self.width_logits.device
        return shrink(self.base, shape, self.full_state(shape)).to(device)


def _check(key: str, value: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> None:
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"the teacher's {key} has shape {tuple(value.shape)}, expected "
                         f"{tuple(shape)}")
