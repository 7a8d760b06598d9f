"""Any `nn.Module` -> its layer plan (`tasprune.plan`), by `torch.fx` symbolic tracing.

The model is traced once and run once on an example input (to learn every tensor's
shape). Walking the graph, every tensor carries the channel groups of its channels:
a Conv2d or Linear starts a new group (a depthwise conv keeps its input's), a
BatchNorm, activation, pooling or dropout passes its input's on, `torch.cat` along
the channels joins them, and an elementwise add or multiply of two tensors ties their
groups into one. The image channels, the network's outputs and the channels of a
grouped conv are fixed. A submodule is a skippable block when its nodes read one
tensor, hand one tensor on, add their input itself to something (an identity
shortcut), and give back the channels they read at the same size.

What cannot be pruned this way is refused with `PlanError`, one line that names the
module and the operation.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from tasprune.plan import Block, Group, LayerPlan, PlanLayer


class PlanError(ValueError):
    """A network (or one operation in it) that tasprune cannot plan or prune."""


_PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid,
    nn.Sigmoid, nn.Tanh, nn.ELU, nn.Mish,
    nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_PASS_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.elu,
    F.hardtanh, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, torch.relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float",
                 "detach", "hardtanh", "hardtanh_"}
_BINARY = {operator.add, operator.iadd, operator.mul, operator.imul, torch.add, torch.mul}
_BINARY_METHODS = {"add", "add_", "mul", "mul_"}
_SHAPE_METHODS = {"size", "dim"}


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


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else ""
    what = node.target if node.op == "call_module" else getattr(node.target, "__name__",
                                                                str(node.target))
    return f"{path or 'forward'} ({node.op} {what})"


def _channels(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def trace_plan(model: nn.Module, example: torch.Tensor) -> tuple[LayerPlan, fx.GraphModule]:
    """The layer plan of `model` for inputs shaped like `example` ([N, C, H, W]), and the
    traced graph. Raises `PlanError` naming what cannot be traced or pruned."""
    if example.dim() != 4:
        raise PlanError(f"the example input must be [batch, channels, height, width], got "
                        f"{tuple(example.shape)}")
    try:
        graph = fx.symbolic_trace(model)
    except Exception as err:  # fx raises many types; all mean the same to a user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PlanError(f"{type(model).__name__} cannot be traced by torch.fx: {first} (the "
                        "forward must not branch on tensor values)") from err
    was_training = model.training
    graph.eval()
    try:
        with torch.no_grad():
            ShapeProp(graph).propagate(example[:2].detach().cpu())
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PlanError(f"{type(model).__name__} does not run on an input of shape "
                        f"{tuple(example.shape[1:])}: {first}") from err
    finally:
        graph.train(was_training)
    builder = _Builder(graph, tuple(int(s) for s in example.shape[1:]))  # type: ignore[arg-type]
    return builder.build(), graph


class _Builder:
    def __init__(self, graph: fx.GraphModule, input_shape: tuple[int, int, int]) -> None:
        self.graph = graph
        self.input_shape = input_shape
        self.modules = dict(graph.named_modules())
        self.groups = _Groups()
        self.values: dict[fx.Node, _Value | None] = {}
        self.layers: list[dict[str, object]] = []
        self.num_classes = 0

    # the walk ---------------------------------------------------------------------------
    def build(self) -> LayerPlan:
        for node in self.graph.graph.nodes:
            self.values[node] = self._visit(node)
        return self._finish()

    def _tensor(self, arg: object, node: fx.Node) -> _Value:
        value = self.values.get(arg) if isinstance(arg, fx.Node) else None
        if value is None:
            raise PlanError(f"{_where(node)}: reads something that is not a traced tensor")
        return value

    def _visit(self, node: fx.Node) -> _Value | None:
        if node.op == "output":
            shape = _channels(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            if shape is None or len(shape) != 2:
                raise PlanError("the network must return one tensor of class scores "
                                "[batch, classes]")
            self.num_classes = shape[1]
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
            for arg in _flatten(node.args):
                if isinstance(arg, fx.Node) and self.values.get(arg) is not None:
                    for g in self._tensor(arg, node).groups:
                        self.groups.fix(g, "the network's output")
            return None
        if node.op == "call_module":
            return self._module(node, self.modules[str(node.target)])
        if node.op == "call_method" and node.target in _SHAPE_METHODS:
            return None
        if node.op == "call_function" and node.target is getattr:
            return None
        return self._function(node)

    def _module(self, node: fx.Node, module: nn.Module) -> _Value:
        x = self._tensor(node.args[0], node)
        name = str(node.target)
        out = _channels(node)
        if isinstance(module, nn.Conv2d):
            return self._conv(node, module, x, name, out)
        if isinstance(module, nn.BatchNorm2d):
            if x.flat:
                raise PlanError(f"{_where(node)}: BatchNorm2d of a flattened tensor")
            self._layer(name, "bn", x.groups, None, node)
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
        if isinstance(module, _PASS_MODULES):
            return self._passed(node, x)
        if any(True for _ in module.parameters(recurse=False)):
            raise PlanError(f"{_where(node)}: {type(module).__name__} has weights and is not "
                            "a Conv2d, BatchNorm2d or Linear, so it cannot be pruned")
        raise PlanError(f"{_where(node)}: {type(module).__name__} is not supported (supported: "
                        "Conv2d, BatchNorm2d, Linear, activations, pooling, dropout, "
                        "flatten, add, mul, cat along channels)")

    def _conv(self, node: fx.Node, conv: nn.Conv2d, x: _Value, name: str,
              out: tuple[int, ...] | None) -> _Value:
        if x.flat:
            raise PlanError(f"{_where(node)}: Conv2d of a flattened tensor")
        if conv.padding_mode != "zeros":
            raise PlanError(f"{_where(node)}: padding_mode {conv.padding_mode!r} (only zeros)")
        common: dict[str, object] = {"bias": conv.bias is not None}
        users = list(node.users)
        common["normed"] = len(users) == 1 and users[0].op == "call_module" and isinstance(
            self.modules.get(str(users[0].target)), nn.BatchNorm2d)
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
        g = self.groups.new(name, conv.out_channels, f"written by the grouped conv {name}")
        self._layer(name, "conv", x.groups, g, node, groups=conv.groups, **common)
        return _Value((g,))

    def _layer(self, name: str, kind: str, reads: tuple[int, ...], writes: int | None,
               node: fx.Node, **extra: object) -> None:
        if any(layer["name"] == name for layer in self.layers):
            raise PlanError(f"{_where(node)}: the module {name} is called twice in forward; "
                            "a shared layer cannot be pruned")
        shape = _channels(node) or ()
        module = self.modules[name]
        kernel = 1
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
        target = node.target
        is_method = node.op == "call_method"
        if (is_method and target in _PASS_METHODS) or (not is_method and target in
                                                        _PASS_FUNCTIONS):
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
        raise PlanError(f"{_where(node)}: is not supported (supported: Conv2d, BatchNorm2d, "
                        "Linear, activations, pooling, dropout, flatten, add, mul, cat along "
                        "channels)")

    def _reshape(self, node: fx.Node) -> _Value:
        x = self._tensor(node.args[0], node)
        sizes = _flatten(node.args[1:])
        out = _channels(node)
        literal = [s for s in sizes if isinstance(s, int) and s != -1]
        if out is None or len(out) != 2 or literal:
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
        args = [a for a in node.args[:2]]
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
        for ga, gb in zip(a.groups, b.groups, strict=True):
            self.groups.tie(ga, gb, where)
        return _Value(a.groups, a.spatial, a.flat or b.flat)

    def _cat(self, node: fx.Node) -> _Value:
        parts = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if dim not in (1, -3):
            raise PlanError(f"{_where(node)}: torch.cat along dim {dim} (only along the "
                            "channels, dim 1)")
        values = [self._tensor(p, node) for p in _flatten(parts)]
        if any(v.flat for v in values):
            raise PlanError(f"{_where(node)}: torch.cat of flattened tensors")
        return _Value(tuple(g for v in values for g in v.groups))

    # the plan ---------------------------------------------------------------------------
    def _finish(self) -> LayerPlan:
        groups = self.groups
        roots = sorted({groups.find(g) for g in range(len(groups.parent))})
        index = {r: i for i, r in enumerate(roots)}
        plan_groups = tuple(Group(groups.names[r], groups.sizes[r], groups.fixed[r])
                            for r in roots)

        def canon(g: int) -> int:
            return index[groups.find(g)]

        blocks = self._blocks(canon)
        layers = []
        for raw in self.layers:
            name = str(raw["name"])
            block = next((b for b, blk in enumerate(blocks)
                          if name.startswith(blk.name + ".")), None)
            reads = tuple(canon(g) for g in raw["reads"])  # type: ignore[attr-defined]
            writes = raw["writes"]
            extra = {k: v for k, v in raw.items()
                     if k not in ("name", "kind", "reads", "writes", "node")}
            layers.append(PlanLayer(name=name, kind=str(raw["kind"]), reads=reads,
                                    writes=None if writes is None else canon(int(writes)),
                                    block=block, **extra))  # type: ignore[arg-type]
        return LayerPlan(plan_groups, tuple(layers), tuple(blocks), self.input_shape,
                         self.num_classes)

    def _blocks(self, canon: Callable[[int], int]) -> list[Block]:
        """Skippable blocks (the innermost ones), numbered into stages of consecutive
        siblings."""
        nodes = [n for n in self.graph.graph.nodes if n.op not in ("placeholder", "output")]
        paths: dict[str, list[fx.Node]] = {}
        for n in nodes:
            for path in (n.meta.get("nn_module_stack") or {}).values():
                paths.setdefault(path[0], []).append(n)
        found = [p for p, region in paths.items()
                 if p and not isinstance(self.modules.get(p), _LEAVES)
                 and self._skippable(region, canon)]
        # the innermost: a stage's container (layer1) is skippable too, as a whole
        inner = [p for p in found if not any(q.startswith(p + ".") for q in found)]
        blocks: list[Block] = []
        stage, last = -1, None
        for p in inner:  # graph order
            parent, _, leaf = p.rpartition(".")
            follows = (last is not None and last[0] == parent and leaf.isdigit()
                       and last[1].isdigit() and int(leaf) == int(last[1]) + 1)
            if not follows:
                stage += 1
            index = 0 if not follows else blocks[-1].index + 1
            blocks.append(Block(p, stage, index))
            last = (parent, leaf)
        return blocks

    def _skippable(self, region: list[fx.Node], canon: Callable[[int], int]) -> bool:
        inside = set(region)
        inputs = {a for n in region for a in n.all_input_nodes
                  if a not in inside and self.values.get(a) is not None}
        leaving = [n for n in region if any(u not in inside for u in n.users)]
        if len(inputs) != 1 or len(leaving) != 1:
            return False
        (x,), out = tuple(inputs), leaving[0]
        vin, vout = self.values.get(x), self.values.get(out)
        if vin is None or vout is None or vin.flat or vout.flat:
            return False
        if _channels(x) != _channels(out):
            return False
        if [canon(g) for g in vin.groups] != [canon(g) for g in vout.groups]:
            return False
        return any(x in n.args and (n.target in _BINARY or n.target in _BINARY_METHODS)
                   and n.target not in (operator.mul, operator.imul, torch.mul, "mul", "mul_")
                   for n in region)


_LEAVES = (nn.Conv2d, nn.BatchNorm2d, nn.Linear, *_PASS_MODULES)


def _flatten(args: Iterable[object]) -> list[object]:
    out: list[object] = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.extend(_flatten(a))
        else:
            out.append(a)
    return out
