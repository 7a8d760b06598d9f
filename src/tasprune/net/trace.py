"""Any `nn.Module` -> its layer plan (`tasprune.net.plan`), by `torch.fx` symbolic tracing.

The model is traced once (in eval mode) and run once on an example input to learn every
tensor's shape. Walking the graph, every tensor carries the channel groups of its
channels: a Conv2d or Linear starts a new group (a depthwise conv keeps its input's), a
BatchNorm, an activation, pooling, dropout or any other function that acts on every
channel alike passes its input's on, `torch.cat` along the channels joins them, and an
elementwise add or multiply of two tensors ties their groups into one. The image
channels, the network's outputs and the channels around a grouped conv are fixed.

A submodule is a skippable block when its nodes read one tensor, hand one tensor on, add
their input itself to something (an identity shortcut), and give back as many channels
as they read. Consecutive blocks of one container, each reading what the one before
gives back, form a stage; the first child of a container (`layer1.0`) opens its stage and
is never skipped, as the block before a run of blocks is.

With `free_shortcuts`, the identity shortcut of a block whose class declares one
(`free_shortcut = "<attribute>"`, the attribute holding its optional projection, and a
`make_shortcut(in_channels, out_channels)` method returning a module with a 1x1 `conv`
and a `bn`) does not tie the block's ends: they stay two groups, joined by a conditional
projection that exists where their widths differ (the TAS paper's search space).

Functions and module types that act on every channel alike and are not known here
(a custom stochastic depth, say) can be declared with `channelwise`. What cannot be
pruned is refused with `PlanError`: one line that names the module and the operation.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from tasprune.net.plan import Block, Group, LayerPlan, ModelSpec, PlanLayer


class PlanError(ValueError):
    """A network (or one operation in it) that tasprune cannot plan or prune."""


_PASS_MODULES: list[type[nn.Module]] = [
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid,
    nn.Sigmoid, nn.Tanh, nn.ELU, nn.Mish, nn.SELU, nn.Softplus,
    nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
]
_PASS_FUNCTIONS: set[Any] = {
    F.relu, F.relu6, F.leaky_relu, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.elu,
    F.selu, F.mish, F.softplus, F.hardtanh, F.dropout, F.dropout2d, F.max_pool2d,
    F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.relu, torch.sigmoid,
    torch.tanh, F.sigmoid, F.tanh, torch.nn.functional.relu_,
}
# functions known by name, so that every copy of them is recognised (torchvision's
# `torch.fx.wrap`ped stochastic_depth and the copies of it in other libraries)
_PASS_NAMES = {"stochastic_depth", "drop_path"}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clone",
                 "float", "detach", "hardtanh", "hardtanh_", "clamp", "clamp_"}
_BINARY = {operator.add, operator.iadd, operator.mul, operator.imul, torch.add, torch.mul}
_BINARY_METHODS = {"add", "add_", "mul", "mul_"}
_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}
_SHAPE_METHODS = {"size", "dim"}
_SPLITS = {torch.chunk, torch.split, "chunk", "split", "transpose", "permute", "unbind"}


def channelwise(obj: Any) -> Any:
    """Declare a function or a module type (usable as a decorator) as acting on every
    channel alike without changing their number (an activation, a dropout, a stochastic
    depth): the plan passes its input's channel groups through it."""
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        if obj not in _PASS_MODULES:
            _PASS_MODULES.append(obj)
    elif callable(obj):
        _PASS_FUNCTIONS.add(obj)
    else:
        raise TypeError(f"channelwise takes a function or an nn.Module class, not {obj!r}")
    return obj


@dataclass(frozen=True)
class _Value:
    """A tensor of the graph: the groups of its channels (dim 1) and, once flattened, the
    positions per channel that were folded into dim 1."""

    groups: tuple[int, ...]
    spatial: int = 1
    flat: bool = False


class _Groups:
    """Groups with a union-find of ties."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.sizes: list[int] = []
        self.fixed: list[str] = []
        self.parent: list[int] = []

    def new(self, name: str, size: int, fixed: str = "") -> int:
        self.names.append(name)
        self.sizes.append(size)
        self.fixed.append(fixed)
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def tie(self, a: int, b: int, where: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.sizes[ra] != self.sizes[rb]:
            raise PlanError(f"{where}: adds {self.sizes[ra]} channels ({self.names[ra]}) to "
                            f"{self.sizes[rb]} ({self.names[rb]})")
        first, second = min(ra, rb), max(ra, rb)
        self.parent[second] = first
        self.fixed[first] = self.fixed[first] or self.fixed[second]

    def fix(self, g: int, reason: str) -> None:
        r = self.find(g)
        self.fixed[r] = self.fixed[r] or reason


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _where(node: fx.Node) -> str:
    what = node.target if node.op == "call_module" else getattr(node.target, "__name__",
                                                                str(node.target))
    return f"{_path(node) or 'forward'} ({node.op} {what})"


def _channels(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class Tracer(fx.Tracer):
    """fx's tracer with the declared channel-wise module types as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, tuple(_PASS_MODULES)) or super().is_leaf_module(m, qualname)


def trace_plan(model: nn.Module, example: torch.Tensor, free_shortcuts: bool = False,
               source: ModelSpec | None = None) -> tuple[LayerPlan, fx.GraphModule]:
    """The layer plan of `model` for inputs shaped like `example` ([N, C, H, W]), and the
    traced graph. `free_shortcuts`: the TAS paper's space (see the module docstring);
    `source`: how the network is built, kept in the plan. Raises `PlanError` naming what
    cannot be traced or pruned."""
    if example.dim() != 4:
        raise PlanError(f"the example input must be [batch, channels, height, width], got "
                        f"{tuple(example.shape)}")
    was_training = model.training
    model.eval()  # the inference graph: dropout and stochastic depth as they run there
    try:
        tracer = Tracer()
        traced = tracer.trace(model)
        graph = fx.GraphModule(tracer.root, traced, type(model).__name__)
    except Exception as err:  # fx raises many types; all mean the same to a user
        raise PlanError(f"{type(model).__name__} cannot be traced by torch.fx: "
                        f"{_first_line(err)} (the forward must not branch on tensor values)"
                        ) from err
    finally:
        model.train(was_training)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    graph.eval()
    try:
        with torch.no_grad():
            ShapeProp(graph).propagate(example[:1].detach().to(device))
    except Exception as err:
        raise PlanError(f"{type(model).__name__} does not run on an input of shape "
                        f"{tuple(example.shape[1:])}: {_first_line(err)}") from err
    finally:
        model.train(was_training)
    builder = _Builder(graph, tuple(int(s) for s in example.shape[1:]),  # type: ignore[arg-type]
                       free_shortcuts, dict(model.named_modules()))
    return builder.build(source), graph


class _Builder:
    def __init__(self, graph: fx.GraphModule, input_shape: tuple[int, int, int],
                 free: bool, originals: dict[str, nn.Module]) -> None:
        self.graph = graph
        self.originals = originals  # the model's own modules (the graph's are copies)
        self.input_shape = input_shape
        self.free = free
        self.modules = dict(graph.named_modules())
        self.groups = _Groups()
        self.values: dict[fx.Node, _Value | None] = {}
        self.layers: list[dict[str, Any]] = []
        self.names: set[str] = set()
        self.num_classes = 0
        self.free_blocks: dict[str, tuple[int, int]] = {}  # block path -> (in, out) group

    # the walk ---------------------------------------------------------------------------
    def build(self, source: ModelSpec | None) -> LayerPlan:
        for node in self.graph.graph.nodes:
            self.values[node] = self._visit(node)
        return self._finish(source)

    def _tensor(self, arg: object, node: fx.Node) -> _Value:
        value = self.values.get(arg) if isinstance(arg, fx.Node) else None
        if value is None:
            raise PlanError(f"{_where(node)}: reads something that is not a traced tensor")
        return value

    def _visit(self, node: fx.Node) -> _Value | None:
        if node.op == "placeholder":
            shape = _channels(node)
            if shape is None or len(shape) != 4:
                raise PlanError(f"input {node.name}: the network must take one image batch")
            return _Value((self.groups.new("input", shape[1], "the image channels"),))
        if node.op == "get_attr":
            raise PlanError(f"{_where(node)}: reads the tensor attribute {node.target!r} in "
                            "forward; only Conv2d, BatchNorm2d and Linear modules can hold "
                            "weights")
        if node.op == "output":
            shape = _channels(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            if shape is None or len(shape) != 2:
                raise PlanError("the network must return one tensor of class scores "
                                "[batch, classes]")
            self.num_classes = shape[1]
            for g in self._tensor(node.args[0], node).groups:
                self.groups.fix(g, "the network's output")
            return None
        if node.op == "call_module":
            return self._module(node, self.modules[str(node.target)])
        if node.op == "call_method" and node.target in _SHAPE_METHODS:
            return None
        if node.op == "call_function" and node.target is getattr:
            return None
        if node.op == "call_function" and node.target is operator.getitem:
            src = node.args[0]
            if isinstance(src, fx.Node) and self.values.get(src) is None:
                return None  # an element of a size or a shape: not a tensor
            raise PlanError(f"{_where(node)}: indexes or slices a tensor (a channel split?); "
                            "tasprune cannot prune through it")
        return self._function(node)

    def _module(self, node: fx.Node, module: nn.Module) -> _Value:
        x = self._tensor(node.args[0], node)
        name = str(node.target)
        out = _channels(node)
        if isinstance(module, nn.Conv2d):
            return self._conv(node, module, x, name)
        if isinstance(module, nn.BatchNorm2d):
            if x.flat:
                raise PlanError(f"{_where(node)}: BatchNorm2d of a flattened tensor")
            src = node.args[0]
            norm_of = None
            if isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1 \
                    and isinstance(self.modules.get(str(src.target)), nn.Conv2d):
                norm_of = str(src.target)
            self._layer(name, "bn", x.groups, None, node, norm_of=norm_of)
            return x
        if isinstance(module, nn.Linear):
            if not x.flat and len(out or ()) != 2:
                raise PlanError(f"{_where(node)}: a Linear applied to a feature map (only to "
                                "flattened features)")
            g = self.groups.new(name, module.out_features)
            self._layer(name, "linear", x.groups, g, node, bias=module.bias is not None,
                        spatial=x.spatial)
            return _Value((g,), 1, True)
        if isinstance(module, nn.Flatten):
            return self._flatten(node, x, module.start_dim)
        if isinstance(module, tuple(_PASS_MODULES)):
            return self._passed(node, x)
        if any(True for _ in module.parameters(recurse=False)):
            raise PlanError(f"{_where(node)}: {type(module).__name__} has weights and is not "
                            "a Conv2d, BatchNorm2d or Linear, so it cannot be pruned")
        raise PlanError(f"{_where(node)}: {type(module).__name__} is not supported (declare it "
                        "with tasprune.channelwise if it acts on every channel alike)")

    def _conv(self, node: fx.Node, conv: nn.Conv2d, x: _Value, name: str) -> _Value:
        if x.flat:
            raise PlanError(f"{_where(node)}: Conv2d of a flattened tensor")
        if conv.padding_mode != "zeros":
            raise PlanError(f"{_where(node)}: padding_mode {conv.padding_mode!r} (only zeros)")
        if isinstance(conv.padding, str):
            raise PlanError(f"{_where(node)}: padding={conv.padding!r} (give the padding as "
                            "numbers)")
        users = list(node.users)
        norm = None
        if len(users) == 1 and users[0].op == "call_module" and isinstance(
                self.modules.get(str(users[0].target)), nn.BatchNorm2d):
            norm = str(users[0].target)
        src = node.args[0]
        in_shape = _channels(src) if isinstance(src, fx.Node) else None
        in_hw = tuple(in_shape[2:]) if in_shape and len(in_shape) == 4 else (0, 0)
        geometry = (*conv.kernel_size, *conv.stride, *conv.padding, *conv.dilation, *in_hw)
        common: dict[str, Any] = {"bias": conv.bias is not None, "norm": norm,
                                  "geometry": geometry}
        if conv.groups == 1:
            g = self.groups.new(name, conv.out_channels)
            self._layer(name, "conv", x.groups, g, node, **common)
            return _Value((g,))
        if conv.groups == conv.in_channels == conv.out_channels:
            self._layer(name, "conv", x.groups, None, node, depthwise=True, **common)
            return x
        reason = f"read by the grouped conv {name} (groups={conv.groups})"
        for g in x.groups:
            self.groups.fix(g, reason)
        g = self.groups.new(name, conv.out_channels, f"written by the grouped conv {name} "
                            f"(groups={conv.groups})")
        self._layer(name, "conv", x.groups, g, node, groups=conv.groups, **common)
        return _Value((g,))

    def _layer(self, name: str, kind: str, reads: tuple[int, ...], writes: int | None,
               node: fx.Node, **extra: Any) -> None:
        if name in self.names:
            raise PlanError(f"{_where(node)}: the module {name} is called twice in forward; "
                            "a shared layer cannot be pruned")
        self.names.add(name)
        shape = _channels(node) or ()
        module = self.modules.get(name)
        kernel = extra.pop("kernel", 1)
        if isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
        pixels = shape[2] * shape[3] if len(shape) == 4 else 1
        self.layers.append({"name": name, "kind": kind, "reads": reads, "writes": writes,
                            "kernel": kernel, "pixels": pixels, "node": node, **extra})

    def _passed(self, node: fx.Node, x: _Value) -> _Value:
        out = _channels(node)
        if out is not None and len(out) >= 2 and not x.flat and out[1] != self._width(x):
            raise PlanError(f"{_where(node)}: changes the number of channels")
        return x

    def _width(self, x: _Value) -> int:
        return sum(self.groups.sizes[g] for g in x.groups) * x.spatial

    def _flatten(self, node: fx.Node, x: _Value, start: int) -> _Value:
        shape = _channels(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if start != 1 or shape is None:
            raise PlanError(f"{_where(node)}: only flattening from dim 1 is supported")
        spatial = 1
        for s in shape[2:]:
            spatial *= s
        return _Value(x.groups, x.spatial * spatial, True)

    def _function(self, node: fx.Node) -> _Value | None:
        if not any(isinstance(a, fx.Node) and self.values.get(a) is not None
                   for a in _flatten_args([*node.args, *node.kwargs.values()])):
            return None  # arithmetic on sizes: no tensor involved
        target = node.target
        is_method = node.op == "call_method"
        name = target if is_method else getattr(target, "__name__", "")
        if (is_method and target in _PASS_METHODS) or (not is_method and (
                target in _PASS_FUNCTIONS or name in _PASS_NAMES)):
            return self._passed(node, self._tensor(node.args[0], node))
        if (is_method and target == "flatten") or target is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            return self._flatten(node, self._tensor(node.args[0], node), int(start))
        if is_method and target in ("view", "reshape") or target is torch.reshape:
            return self._reshape(node)
        if (is_method and target == "mean") or target is torch.mean:
            return self._mean(node)
        if (is_method and target in _BINARY_METHODS) or target in _BINARY:
            return self._binary(node)
        if target is torch.cat:
            return self._cat(node)
        if target in _SPLITS:
            raise PlanError(f"{_where(node)}: splits or shuffles the channels; channel split "
                            "and shuffle (as in ShuffleNet) cannot be pruned by tasprune")
        raise PlanError(f"{_where(node)}: is not supported (supported: Conv2d, BatchNorm2d, "
                        "Linear, activations, pooling, dropout, flatten, add, mul, cat along "
                        "channels; declare other channel-wise functions with "
                        "tasprune.channelwise)")

    def _reshape(self, node: fx.Node) -> _Value:
        x = self._tensor(node.args[0], node)
        sizes = _flatten_args(node.args[1:])
        out = _channels(node)
        literal = [s for s in sizes if isinstance(s, int) and s != -1]
        if out is not None and len(out) != 2:
            raise PlanError(f"{_where(node)}: reshapes the channel axis (as a channel shuffle "
                            "does); tasprune cannot prune through it")
        if out is None or literal:
            raise PlanError(f"{_where(node)}: a view/reshape with fixed sizes {literal} would "
                            "break once channels are pruned; use torch.flatten(x, 1)")
        return self._flatten(node, x, 1)

    def _mean(self, node: fx.Node) -> _Value:
        x = self._tensor(node.args[0], node)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
        if any(d in (0, 1, -3) for d in dims) or x.flat:
            raise PlanError(f"{_where(node)}: a mean over the batch or channel axis")
        out = _channels(node) or ()
        return x if len(out) == 4 else _Value(x.groups, 1, True)

    def _binary(self, node: fx.Node) -> _Value:
        args = list(node.args[:2])
        tensors = [self.values.get(a) if isinstance(a, fx.Node) else None for a in args]
        real = [(a, v) for a, v in zip(args, tensors, strict=True) if v is not None]
        if len(real) == 1:
            return real[0][1]
        (na, a), (nb, b) = real
        shape_a, shape_b = _channels(na), _channels(nb)  # type: ignore[arg-type]
        if shape_a and shape_b and len(shape_a) > 1 and len(shape_b) > 1:
            if shape_b[1] == 1 and shape_a[1] != 1:
                return a
            if shape_a[1] == 1 and shape_b[1] != 1:
                return b
        where = _where(node)
        if len(a.groups) != len(b.groups) or a.spatial != b.spatial:
            # channels of different concatenations meet: keep all of them in place
            for g in (*a.groups, *b.groups):
                self.groups.fix(g, f"combined with a concatenation at {where}")
            return a
        if self.free and node.target in _ADDS:
            free = self._free_shortcut(node, na, a, nb, b)  # type: ignore[arg-type]
            if free is not None:
                return free
        for ga, gb in zip(a.groups, b.groups, strict=True):
            self.groups.tie(ga, gb, where)
        return _Value(a.groups, a.spatial, a.flat or b.flat)

    def _free_shortcut(self, node: fx.Node, na: fx.Node, a: _Value, nb: fx.Node, b: _Value
                       ) -> _Value | None:
        """The add of a block with a free shortcut: its input and its residual stay two
        groups, joined by a conditional projection; None where this is not one."""
        path = _path(node)
        block = self.originals.get(path)
        attr = getattr(type(block), "free_shortcut", None)
        if not path or attr is None or getattr(block, attr, "missing") is not None:
            return None
        outside = [not any(p[0] == path for p in (n.meta.get("nn_module_stack") or {}).values())
                   for n in (na, nb)]
        if outside.count(True) != 1:
            return None
        (xin, nin), (res, _) = ((a, na), (b, nb)) if outside[0] else ((b, nb), (a, na))
        if len(xin.groups) != 1 or len(res.groups) != 1 or xin.flat or res.flat:
            return None
        g_in, g_out = xin.groups[0], res.groups[0]
        shape = _channels(node) or ()
        pixels = shape[2] * shape[3] if len(shape) == 4 else 1
        in_shape = _channels(nin) or (0, 0, 0, 0)
        when = (g_in, g_out)
        conv, bn = f"{path}.{attr}.conv", f"{path}.{attr}.bn"
        for name, kind in ((conv, "conv"), (bn, "bn")):
            if name in self.names:
                raise PlanError(f"{_where(node)}: {name} exists already")
            self.names.add(name)
        self.layers.append({"name": conv, "kind": "conv", "reads": (g_in,), "writes": g_out,
                            "kernel": 1, "pixels": pixels, "node": node, "when": when,
                            "norm": bn, "geometry": (1, 1, 1, 1, 0, 0, 1, 1, *in_shape[2:])})
        self.layers.append({"name": bn, "kind": "bn", "reads": (g_out,), "writes": None,
                            "kernel": 1, "pixels": pixels, "node": node, "when": when,
                            "norm_of": conv})
        self.free_blocks[path] = (g_in, g_out)
        return _Value((g_out,))

    def _cat(self, node: fx.Node) -> _Value:
        parts = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if dim not in (1, -3):
            raise PlanError(f"{_where(node)}: torch.cat along dim {dim} (only along the "
                            "channels, dim 1)")
        values = [self._tensor(p, node) for p in _flatten_args(parts)]
        if any(v.flat for v in values):
            raise PlanError(f"{_where(node)}: torch.cat of flattened tensors")
        return _Value(tuple(g for v in values for g in v.groups))

    # the plan ---------------------------------------------------------------------------
    def _finish(self, source: ModelSpec | None) -> LayerPlan:
        groups = self.groups
        roots = sorted({groups.find(g) for g in range(len(groups.parent))})
        index = {r: i for i, r in enumerate(roots)}
        plan_groups = tuple(Group(groups.names[r], groups.sizes[r], groups.fixed[r])
                            for r in roots)

        def canon(g: int) -> int:
            return index[groups.find(g)]

        blocks = self._blocks(canon)
        by_prefix = sorted(((blk.name + ".", b) for b, blk in enumerate(blocks)),
                           key=lambda t: -len(t[0]))
        # the group a stage's output has whatever it keeps: its last block's (free) output
        stage_out: dict[int, int] = {}
        for blk in blocks:
            if blk.leaves is not None:
                stage_out[blk.leaves] = blk.stage
        last = {blk.stage: blk for blk in blocks}
        stage_out = {g: s for g, s in stage_out.items() if last[s].leaves == g}
        layers = []
        for raw in self.layers:
            name = str(raw["name"])
            block = next((b for p, b in by_prefix if name.startswith(p)), None)
            reads = tuple(canon(g) for g in raw["reads"])
            writes = raw["writes"]
            when = raw.get("when")
            own = None if block is None else blocks[block].stage
            after = tuple(stage_out[g] if g in stage_out and stage_out[g] != own else None
                          for g in reads)
            extra = {k: v for k, v in raw.items()
                     if k not in ("name", "kind", "reads", "writes", "node", "when")}
            layers.append(PlanLayer(
                name=name, kind=str(raw["kind"]), reads=reads,
                writes=None if writes is None else canon(int(writes)), block=block,
                when=None if when is None else (canon(when[0]), canon(when[1])),
                after=after if any(s is not None for s in after) else (), **extra))
            if when is not None and layers[-1].after:
                raise PlanError(f"{name}: a free shortcut reading a stage's output")
        return LayerPlan(plan_groups, tuple(layers), tuple(blocks), self.input_shape,
                         self.num_classes, source, self.free)

    def _blocks(self, canon: Callable[[int], int]) -> list[Block]:
        """Skippable blocks (the innermost ones), numbered into stages of consecutive
        siblings that feed each other; a container's first child opens its stage."""
        nodes = [n for n in self.graph.graph.nodes if n.op not in ("placeholder", "output")]
        paths: dict[str, list[fx.Node]] = {}
        for n in nodes:
            for path in (n.meta.get("nn_module_stack") or {}).values():
                paths.setdefault(path[0], []).append(n)
        found: dict[str, tuple[fx.Node, fx.Node, int | None, int | None]] = {}
        for p, region in paths.items():
            if p and not isinstance(self.modules.get(p), (*_LEAVES, *_PASS_MODULES)):
                ends = self._skippable(p, region, canon)
                if ends is not None:
                    found[p] = ends
        # the innermost: a stage's container (layer1) is skippable too, as a whole
        inner = [p for p in found if not any(q.startswith(p + ".") for q in found)]
        blocks: list[Block] = []
        stage, index, last = -1, 0, None
        for p in inner:  # graph order
            x, out, enters, leaves = found[p]
            parent, _, leaf = p.rpartition(".")
            siblings = list(getattr(self.originals.get(parent), "_modules", {}))
            place = siblings.index(leaf) if leaf in siblings else -1
            follows = (last is not None and last[0] == parent and place >= 1
                       and last[1] == place - 1 and last[2] is x)
            opens = not follows and place == 0  # the first child opens the next ones' stage
            if not follows or last is not None and last[3]:
                stage, index = stage + 1, 0
            last = (parent, place, out, opens)
            if opens:
                stage -= 1  # not a stage of its own
                continue
            blocks.append(Block(p, stage, index, enters, leaves))
            index += 1
        return blocks

    def _skippable(self, path: str, region: list[fx.Node], canon: Callable[[int], int]
                   ) -> tuple[fx.Node, fx.Node, int | None, int | None] | None:
        """(input node, output node, entered and left group of a free shortcut) of a module
        that can be replaced by an identity, else None."""
        inside = set(region)
        inputs = {a for n in region for a in n.all_input_nodes
                  if a not in inside and self.values.get(a) is not None}
        leaving = [n for n in region if any(u not in inside for u in n.users)]
        if len(inputs) != 1 or len(leaving) != 1:
            return None
        (x,), out = tuple(inputs), leaving[0]
        vin, vout = self.values.get(x), self.values.get(out)
        if vin is None or vout is None or vin.flat or vout.flat:
            return None
        if _channels(x) != _channels(out):
            return None
        if path in self.free_blocks:
            g_in, g_out = self.free_blocks[path]
            if [canon(g) for g in vout.groups] != [canon(g_out)]:
                return None
            return x, out, canon(g_in), canon(g_out)
        if [canon(g) for g in vin.groups] != [canon(g) for g in vout.groups]:
            return None
        shortcut = any(x in n.args and (n.target in _BINARY or n.target in _BINARY_METHODS)
                       and n.target not in (operator.mul, operator.imul, torch.mul, "mul",
                                            "mul_") for n in region)
        return (x, out, None, None) if shortcut else None


_LEAVES = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


def _flatten_args(args: Iterable[object]) -> list[object]:
    out: list[object] = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.extend(_flatten_args(a))
        else:
            out.append(a)
    return out
