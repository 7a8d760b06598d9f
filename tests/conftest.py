from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tasprune.data import load_data
from tasprune.data.idx import write_idx


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


def random_shape(base, gen: torch.Generator):
    """A random pruned variant of a full Shape (widths in [1, full], blocks in [1, depth])."""
    widths = [int(torch.randint(1, w + 1, (1,), generator=gen)) for w in base.full_widths]
    blocks = [int(torch.randint(1, d + 1, (1,), generator=gen)) for d in base.depths]
    return base.replace(widths=tuple(widths), blocks=tuple(blocks))


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: tiny tensors gain nothing from more, and on a
    busy machine the thread synchronisation of every op can cost more than the op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_subset(tmp_path_factory) -> str:
    """The first 480/60 demo images at 14x14 as Fashion-MNIST IDX files (a `--data` spec):
    the command line on real data, small enough for a search of a few seconds."""
    out = tmp_path_factory.mktemp("fashion-mnist")
    demo = load_data("demo")
    for split, src, n in (("train", demo.train, 480), ("t10k", demo.test, 60)):
        write_idx(out / f"{split}-images-idx3-ubyte", src.images[:n, 0, ::2, ::2].numpy())
        write_idx(out / f"{split}-labels-idx1-ubyte", src.labels[:n].numpy().astype(np.uint8))
    return f"fashion-mnist:{out}"
