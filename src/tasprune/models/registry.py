"""Model names -> networks: one registry for the built-in ResNets, the zoo networks and
the factories users bring.

A `--model` is one of:

* a built-in ResNet: `resnet8/14/20/32/44/56/110/164`, `cifar-resnet<D>`,
  `cifar-resnet<D>-bottleneck` (small images), `resnet18/34/50/101/152` (ImageNet);
* a zoo network (`tasprune.models.zoo`, torchvision's layouts and key names):
  `mobilenet_v2`, `tv_resnet18`, `tv_resnet50` (torchvision's ResNets; the built-in
  `resnet18` is the TAS paper's), `vgg11_bn`, `concat_net` and the others `list_models`
  names; below 96 px they use their small-input stem (stride 1, no early pooling);
* a factory of your own: `FILE.py:FACTORY` or `package.module:FACTORY` (e.g.
  `torchvision.models:resnet18`), called with `num_classes=`, and with `in_channels=`
  when it takes it. A network whose stem reads another number of image channels than the
  data has gets its first conv adapted (`adapt_stem`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from tasprune.checkpoint import load_weights
from tasprune.models import zoo
from tasprune.models.families import MODELS, resolve_model
from tasprune.models.resnet import ResNet
from tasprune.models.shape import Shape
from tasprune.net.surgery import set_module
from tasprune.net.trace import Tracer

Factory = Callable[..., nn.Module]

# zoo networks by registered name (the torchvision-layout ResNets are prefixed: the
# built-in resnet18/resnet50 are the TAS paper's ImageNet ResNets)
ZOO_NAMES: dict[str, str] = {("tv_" + k if k in MODELS else k): k for k in zoo.ZOO}
SMALL_INPUT = 96  # zoo networks below this resolution use their small-input stem


def is_factory(name: str) -> bool:
    """Whether a `--model` value names a factory (has a colon) rather than a registered
    model."""
    return ":" in name


def new_module(name: str, num_classes: int | None = None, in_channels: int | None = None,
               resolution: int | None = None) -> nn.Module:
    """The unpruned module of a registered name, freshly initialised (not traced; the
    public `tasprune.create_model` gives it its plan).

    Names: see `list_models()`; small-image ResNets of other depths as "cifar-resnet<D>"
    (basic, D = 6n+2) or "cifar-resnet<D>-bottleneck" (D = 9n+2)."""
    key = name.strip().lower()
    if key in ZOO_NAMES:
        factory = zoo.ZOO[ZOO_NAMES[key]]
        kwargs: dict[str, object] = {"num_classes": 10 if num_classes is None else num_classes,
                                     "in_channels": 3 if in_channels is None else in_channels}
        if _takes(factory, "small_input"):
            kwargs["small_input"] = resolution is None or resolution < SMALL_INPUT
        return factory(**kwargs)
    try:
        shape = Shape.full(name, num_classes=num_classes, in_channels=in_channels,
                           resolution=resolution)
    except ValueError as err:
        if key in MODELS or key.startswith("cifar-resnet"):
            raise
        zoo_names = ", ".join(sorted(ZOO_NAMES))
        raise ValueError(f"{err}; zoo networks: {zoo_names}; or a network of your own as "
                         "FILE.py:FACTORY or package.module:FACTORY") from None
    return ResNet(shape)


def default_classes(name: str) -> int:
    """The classes a registered model has by default (1000 for ImageNet ResNets, else 10)."""
    return Shape.full(name).num_classes if is_builtin_resnet(name) else 10


def default_resolution(name: str) -> int:
    """The input size a registered model is made for (224 for ImageNet ResNets, 32 for
    the others)."""
    key = name.strip().lower()
    if key in ZOO_NAMES or is_factory(key):
        return 32
    return Shape.full(key).resolution


def list_models() -> list[str]:
    """Registered model names: small-image ResNets, ImageNet ResNets (each by depth), then
    the zoo networks."""
    def key(name: str) -> tuple[str, int, str]:
        digits = "".join(c for c in name if c.isdigit())
        return MODELS[name][0], int(digits or 0), name

    return sorted(MODELS, key=key) + sorted(ZOO_NAMES)


def is_builtin_resnet(name: str | None) -> bool:
    """Whether `name` is one of the built-in ResNets (which a TAS .config can describe)."""
    if not name or is_factory(name) or name.strip().lower() in ZOO_NAMES:
        return False
    try:
        resolve_model(name)
    except ValueError:
        return False
    return True


# factories of your own ------------------------------------------------------------------
def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def load_factory(spec: str) -> Factory:
    """The factory a `--model` names: `path/to/file.py:name` or `package.module:name`."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ValueError(f"--model {spec!r}: expected FILE.py:FACTORY or package.module:FACTORY "
                         "(or a registered name, see `tasprune models`)")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"--model {spec!r}: no file {path}")
        module_name = f"tasprune_user_{abs(hash(str(path.resolve())))}"
        loader = importlib.util.spec_from_file_location(module_name, path)
        assert loader is not None and loader.loader is not None
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module
        try:
            loader.loader.exec_module(module)
        except Exception as err:  # noqa: BLE001 - any error in the user's file, one line
            sys.modules.pop(module_name, None)
            line = f" (line {err.lineno})" if isinstance(err, SyntaxError) else ""
            raise ValueError(f"--model {spec!r}: {path} cannot be loaded{line}: "
                             f"{_first_line(err)}") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"--model {spec!r}: cannot import {where}: {_first_line(err)}"
                             ) from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"--model {spec!r}: {where} has no callable {name!r}")
    return factory


def _takes(factory: Factory, name: str) -> bool | None:
    """Whether `factory` takes the keyword `name` (None: it takes **kwargs, so only a call
    tells)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None
    if name in params:
        return True
    return None if any(p.kind is p.VAR_KEYWORD for p in params.values()) else False


def call_factory(factory: Factory, spec: str, num_classes: int, in_channels: int
                 ) -> nn.Module:
    """`factory(num_classes=, in_channels=)`, without `in_channels` when it does not take
    it; every error of the factory's own is one line naming it."""
    label = f"--model {spec!r}"
    if _takes(factory, "num_classes") is False:
        raise ValueError(f"{label}: the factory must take num_classes= (the number of "
                         "classes of the data)")
    kwargs: dict[str, int] = {"num_classes": num_classes}
    takes = _takes(factory, "in_channels")
    if takes is not False:
        kwargs["in_channels"] = in_channels
    try:
        model = factory(**kwargs)
    except TypeError as err:
        if takes is None and "in_channels" in str(err):
            kwargs.pop("in_channels")
            try:
                model = factory(**kwargs)
            except Exception as err2:  # noqa: BLE001
                raise ValueError(f"{label}: the factory raised {_first_line(err2)}") from None
        else:
            raise ValueError(f"{label}: the factory raised {_first_line(err)}") from None
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{label}: the factory raised {_first_line(err)}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{label}: the factory returned a {type(model).__name__}, not an "
                         "nn.Module")
    return model


def input_convs(model: nn.Module) -> list[str]:
    """The convs that read the image (through weightless operations only)."""
    try:
        graph = Tracer().trace(model)
    except Exception:  # noqa: BLE001 - the plan's tracing says what is wrong, later
        return []
    modules = dict(model.named_modules())
    seen: set[fx.Node] = set()
    todo = [n for n in graph.nodes if n.op == "placeholder"]
    found: list[str] = []
    while todo:
        node = todo.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            module = modules.get(str(user.target)) if user.op == "call_module" else None
            if isinstance(module, nn.Conv2d):
                found.append(str(user.target))
            elif not isinstance(module, (nn.Linear, nn.BatchNorm2d)):
                todo.append(user)
    return sorted(set(found))


def adapt_stem(model: nn.Module, in_channels: int) -> str | None:
    """Make the network read `in_channels` image channels when its first conv reads
    another number: the conv's weights summed over its input channels (gray data, as if
    the gray channel were repeated), or repeated cyclically and rescaled (timm's rule).
    Returns the line that says what was done, or None when nothing was."""
    convs = input_convs(model)
    if len(convs) != 1:
        return None
    name = convs[0]
    old = model.get_submodule(name)
    assert isinstance(old, nn.Conv2d)
    n = old.in_channels
    if n == in_channels:
        return None
    if old.groups != 1:
        raise ValueError(f"the network's first conv {name} reads {n} image channels in "
                         f"{old.groups} groups and the data has {in_channels}; give a factory "
                         "that takes in_channels=")
    with torch.no_grad():
        w = old.weight
        if in_channels == 1:
            weight, how = w.sum(1, keepdim=True), f"summed over the {n}"
        else:
            weight = w[:, torch.arange(in_channels) % n] * (n / in_channels)
            how = f"repeated from the {n}"
        new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size,  # type: ignore[arg-type]
                        old.stride, old.padding, old.dilation, 1,  # type: ignore[arg-type]
                        old.bias is not None, old.padding_mode, device=w.device, dtype=w.dtype)
        new.weight.copy_(weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)  # type: ignore[union-attr]
    set_module(model, name, new)
    return (f"the network reads {n} image channels and the data has {in_channels}: its first "
            f"conv {name} now reads {in_channels} (its weights {how})")


def build(name: str, num_classes: int, in_channels: int, resolution: int,
          weights: str | os.PathLike[str] | None = None,
          say: Callable[[str], None] | None = None) -> nn.Module:
    """The unpruned network `name` (registered or a factory) for data of `num_classes`
    classes and `in_channels` x `resolution` x `resolution` images, with `weights` (a state
    dict file of that network) loaded when given."""
    if not is_factory(name):
        model = new_module(name, num_classes, in_channels, resolution)
        if weights is not None:
            load_weights(model, weights)
        return model
    model = call_factory(load_factory(name), name, num_classes, in_channels)
    if weights is not None:
        load_weights(model, weights)
    line = adapt_stem(model, in_channels)
    if line is not None:
        (say or _tell_once)(f"--model {name}: {line}")
    return model


_TOLD: set[str] = set()


def _tell_once(line: str) -> None:
    """A notice on stderr, once per process (a run rebuilds its network several times)."""
    if line not in _TOLD:
        _TOLD.add(line)
        print(line, file=sys.stderr)
