
"""What several tests share: small datasets, models, files in official formats, and the
independent FLOP count. Tests import it as `helpers` (tests/ is on pytest's path)."""

from __future__ import annotations

import dataclasses
import io
import pickle
import struct

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tasprune.data.cifar import LAYOUTS
from tasprune.data.integrity import md5_file
from tasprune.data.source import BatchTransform, DataBundle, TensorImages
from tasprune.models import Shape
from tasprune.models.network import build_model

# the settings of a prune run of seconds (on top of a recipe or the defaults)
TINY = ["teacher_train.epochs=1", "search.epochs=2", "train.epochs=1",
        "teacher_train.batch_size=256", "search.batch_size=256", "train.batch_size=256",
        "latency.repeats=3", "latency.min_repeats=1", "search.flops_ratio=0.5"]


def synthetic_bundle(n_train: int = 96, n_test: int = 48, classes: int = 3, size: int = 12,
                     channels: int = 1, seed: int = 0) -> DataBundle:
    """Each class is a fixed random pattern plus noise, shared by both splits."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.rand(classes, channels, size, size, generator=gen)

    def split(n: int) -> TensorImages:
        labels = torch.arange(n) % classes
        noise = torch.rand(n, channels, size, size, generator=gen)
        images = (patterns[labels] * 180 + noise * 75).round().to(torch.uint8)
        return TensorImages(images, labels)

    return DataBundle(name="synthetic", train=split(n_train), test=split(n_test),
                      num_classes=classes, in_channels=channels, resolution=size,
                      transform=BatchTransform(mean=(0.5,) * channels, std=(0.25,) * channels,
                                               pad=1))


def brightness_bundle(n: int = 96, classes: int = 4, res: int = 8, seed: int = 0
                      ) -> DataBundle:
    """Random RGB images whose class sets the mean brightness of one channel (learnable);
    the same images serve as both splits."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = torch.randint(0, 120, (n, 3, res, res), generator=gen)
    images[:, 0] += (labels * 40)[:, None, None]
    src = TensorImages(images.clamp(0, 255).to(torch.uint8), labels)
    return DataBundle(name="tiny", train=src, test=src, num_classes=classes, in_channels=3,
                      resolution=res, transform=BatchTransform((0.5,) * 3, (0.25,) * 3, pad=1))


def dist_data():
    """The data of the torchrun training tests: `synthetic_bundle` without augmentation, so a
    step's images do not depend on the augmentation draws."""
    bundle = synthetic_bundle(n_train=64, n_test=21)
    return dataclasses.replace(bundle, transform=dataclasses.replace(bundle.transform, pad=0,
                                                                     flip=False))


def hook_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Count conv/linear multiply-accumulates of one forward with hooks (independent check)."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += (module.in_channels // module.groups) * module.out_channels * kh * kw \
                * out.shape[2] * out.shape[3]
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features + module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


def counter_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one sample under the project's convention, counted by torch's
    FlopCounterMode (a second independent check): its FLOPs // 2 (2 per conv/matmul MAC)
    plus `out_features` for each nn.Linear with a bias (a linear counts in*out + out).
    Everything is divided by the batch size of `example`."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    bias = sum(m.out_features for m in model.modules()
               if isinstance(m, nn.Linear) and m.bias is not None)
    return counter.get_total_flops() // 2 // example.shape[0] + bias


def random_shape(base, gen: torch.Generator):
    """A random pruned variant of a full Shape (widths in [1, full], blocks in [1, depth])."""
    widths = [int(torch.randint(1, w + 1, (1,), generator=gen)) for w in base.full_widths]
    blocks = [int(torch.randint(1, d + 1, (1,), generator=gen)) for d in base.depths]
    return base.replace(widths=tuple(widths), blocks=tuple(blocks))


def pruned_model(seed=0):
    """A pruned resnet14 (random widths about half, blocks 1-2-1) with random BN statistics,
    in eval mode, for 1x12x12 inputs."""
    full = Shape.full("resnet14", num_classes=4, in_channels=1, resolution=12)
    gen = torch.Generator().manual_seed(seed)
    widths = [max(1, int(w * 0.5) + int(torch.randint(0, 3, (1,), generator=gen)))
              for w in full.widths]
    torch.manual_seed(seed)
    model = build_model(full.replace(widths=tuple(widths), blocks=(1, 2, 1)))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def example_input(n=3):
    """A fixed batch for `pruned_model`."""
    return torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(7))


class _Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the official files: byte strings as
    BINSTRING opcodes (no `_codecs` global) and numpy under its old name `numpy.core`."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256
                   else pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    def save_builtin(self, obj, name=None):
        if obj.__module__ == "numpy._core.multiarray":
            self.write(pickle.GLOBAL + f"numpy.core.multiarray\n{obj.__name__}\n".encode())
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    dispatch[bytes] = save_bytes
    dispatch[type(len)] = save_builtin


def py2_dump(obj, path):
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def write_cifar(root, name="cifar10", per_file=4, seed=0):
    """A tiny CIFAR directory in the official layout and pickle format; returns its MD5s."""
    layout = LAYOUTS[name]
    rng = np.random.default_rng(seed)
    directory = root / layout.dirname
    directory.mkdir(parents=True)
    for i, file in enumerate(layout.train_files + layout.test_files):
        batch = {
            b"batch_label": f"batch {i}".encode(),
            b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
            layout.label_key.encode(): [int(x) for x in rng.integers(0, layout.num_classes,
                                                                    per_file)],
            b"filenames": [f"img{j}.png".encode() for j in range(per_file)],
        }
        py2_dump(batch, directory / file)
    names = [f"class{c}".encode() for c in range(layout.num_classes)]
    py2_dump({layout.names_key.encode(): names, b"num_cases_per_batch": per_file},
              directory / layout.meta_file)
    return {file: md5_file(directory / file) for file in layout.files}


def network(name="resnet8", classes=4, in_channels=1, resolution=12, free=True):
    """The unpruned module of a registered network and its plan (free shortcuts: the TAS
    paper's space)."""
    from tasprune.models.network import full_network
    from tasprune.net.plan import ModelSpec

    return full_network(ModelSpec(name, classes, in_channels, resolution), free=free)


def space_of(name="resnet8", classes=4, in_channels=1, resolution=12, free=True, **kw):
    """The search space of a registered network (keywords: ratios, multiple_of)."""
    from tasprune.tas.space import SearchSpace

    return SearchSpace.from_plan(network(name, classes, in_channels, resolution, free)[1], **kw)


def space_from(shape, free=True):
    """The search space of the unpruned built-in ResNet a `Shape` names."""
    from tasprune.models.network import view_plan
    from tasprune.tas.space import SearchSpace

    return SearchSpace.from_plan(view_plan(shape, free))


def supernet_from(shape, free=True, seed=0):
    """The supernet of the unpruned built-in ResNet a `Shape` names, freshly initialised."""
    from tasprune.models.network import full_network
    from tasprune.net.plan import ModelSpec
    from tasprune.tas.space import SearchSpace
    from tasprune.tas.supernet import SuperNet

    spec = ModelSpec(shape.model_name, shape.num_classes, shape.in_channels, shape.resolution)
    model, plan = full_network(spec, free=free, seed=seed)
    return SuperNet(SearchSpace.from_plan(plan), model, torch.Generator().manual_seed(seed))
