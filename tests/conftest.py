from __future__ import annotations

import numpy as np
import pytest
import torch

from tasprune.data import load_data
from tasprune.data.idx import write_idx


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
