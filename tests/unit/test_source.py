import os

import pytest
import torch

from tasprune._io import append_jsonl, read_jsonl
from tasprune.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tasprune.data.source import BatchTransform, TensorImages, num_batches, per_class_split


def _images(n=10, c=1, h=6, w=6):
    return torch.arange(n * c * h * w).reshape(n, c, h, w).remainder(251).to(torch.uint8)


def test_batches_cover_indices_in_generator_order():
    data = TensorImages(_images(), torch.arange(10))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = [y for _, y in data.batches(4, shuffle=True, generator=g1)]
    b = [y for _, y in data.batches(4, shuffle=True, generator=g2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert sorted(torch.cat(a).tolist()) == list(range(10))
    assert [len(y) for y in a] == [4, 4, 2]
    sub = [y for _, y in data.batches(3, indices=torch.tensor([1, 5, 7, 8]), drop_last=True)]
    assert [t.tolist() for t in sub] == [[1, 5, 7]]
    assert num_batches(10, 4, False) == 3 and num_batches(10, 4, True) == 2


def test_tensor_images_validates():
    with pytest.raises(ValueError, match="uint8"):
        TensorImages(torch.zeros(2, 1, 4, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="labels"):
        TensorImages(_images(3), torch.zeros(2))


def test_per_class_split_is_disjoint_and_balanced():
    labels = torch.tensor([0] * 10 + [1] * 6 + [2] * 4)
    a, b = per_class_split(labels, 0.5, torch.Generator().manual_seed(0))
    assert set(a.tolist()).isdisjoint(b.tolist())
    assert len(a) + len(b) == len(labels)
    for c, n in ((0, 10), (1, 6), (2, 4)):
        assert (labels[a] == c).sum() == n // 2 and (labels[b] == c).sum() == n - n // 2


def test_transform_normalises_without_augmentation():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    t = BatchTransform(mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0))
    out = t(x)
    assert torch.allclose(out[:, 0], torch.tensor(1.0))
    assert torch.allclose(out[:, 1], torch.tensor(2.0))


def test_augmentation_is_a_padded_crop_or_its_mirror():
    x = _images(8, 2, 6, 6)
    t = BatchTransform(mean=(0.0, 0.0), std=(1 / 255, 1 / 255), pad=2)
    plain = t(x)
    out = t(x, train=True, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(plain, (2, 2, 2, 2))
    for i in range(8):
        windows = [padded[i, :, r:r + 6, c:c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)
    again = t(x, train=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_checkpoint_roundtrip_and_corruption(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"w": torch.ones(3), "epoch": 4, "rng": rng_state()})
    state = load_checkpoint(path)
    assert state["epoch"] == 4 and torch.equal(state["w"], torch.ones(3))
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's owner-only 0600
    path.write_bytes(path.read_bytes()[: 100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "none.pt")


def test_rng_state_restores_every_generator():
    import random

    import numpy as np

    state = rng_state()
    a = (torch.rand(2).tolist(), float(np.random.rand()), random.random())
    set_rng_state(state)
    assert (torch.rand(2).tolist(), float(np.random.rand()), random.random()) == a


def test_jsonl_skips_torn_line(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"epoch": 0})
    append_jsonl(path, {"epoch": 1})
    with open(path, "a") as fh:
        fh.write('{"epoch": 2, "lo')
    assert [r["epoch"] for r in read_jsonl(path)] == [0, 1]
