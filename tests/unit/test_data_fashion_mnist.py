import gzip
import json

import numpy as np
import pytest
import torch

from tasprune.data import (
    DataError,
    DataNotFoundError,
    describe,
    fashion_mnist,
    load_data,
    parse_spec,
)
from tasprune.data import demo as demo_module
from tasprune.data.idx import read_idx, write_idx


def _write_fmnist(directory, n_train=30, n_test=20, compress=True, seed=0):
    """Small IDX files in the official layout; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": np.arange(n_train, dtype=np.uint8) % 10,
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }
    directory.mkdir(parents=True, exist_ok=True)
    for key, stem in fashion_mnist.FILES.items():
        write_idx(directory / (stem + (".gz" if compress else "")), arrays[key])
    return arrays


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["a-idx", "a-idx.gz"])
def test_idx_roundtrip(tmp_path, dtype, name):
    array = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    write_idx(tmp_path / name, array)
    raw = (tmp_path / name).read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == name.endswith(".gz")
    back = read_idx(tmp_path / name)
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, array)


def test_idx_rejects_truncated_and_foreign_files(tmp_path):
    write_idx(tmp_path / "x", np.zeros((4, 5), np.uint8))
    raw = (tmp_path / "x").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-3])
    with pytest.raises(DataError, match=r"short: truncated.*found 17"):
        read_idx(tmp_path / "short")
    (tmp_path / "long").write_bytes(raw + b"\0")
    with pytest.raises(DataError, match="trailing bytes"):
        read_idx(tmp_path / "long")
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw)[:-6])
    with pytest.raises(DataError, match="short.gz: truncated or corrupt gzip"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "text").write_text("hello")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "text")


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_from_directory(tmp_path, compress):
    arrays = _write_fmnist(tmp_path / "fashion-mnist", compress=compress)
    for spec in (f"fashion-mnist:{tmp_path / 'fashion-mnist'}", f"fmnist:{tmp_path}"):
        bundle = load_data(spec)
        assert (bundle.in_channels, bundle.resolution, bundle.num_classes) == (1, 28, 10)
        assert len(bundle.train) == 30 and len(bundle.test) == 20
        assert torch.equal(bundle.train.images[:, 0], torch.from_numpy(arrays["train_images"]))
        assert bundle.test.labels.tolist() == arrays["test_labels"].tolist()
        assert bundle.transform.mean == (0.2860,) and bundle.transform.pad == 4


def test_fashion_mnist_errors_name_the_path_and_the_fix(tmp_path, monkeypatch):
    with pytest.raises(DataNotFoundError, match=r"nowhere: no such directory.*data download"):
        load_data(f"fashion-mnist:{tmp_path / 'nowhere'}")
    _write_fmnist(tmp_path / "a")
    (tmp_path / "a" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\[.gz\]: missing.*"
                       r"tasprune data download fashion-mnist"):
        load_data(f"fashion-mnist:{tmp_path / 'a'}")
    _write_fmnist(tmp_path / "b")
    write_idx(tmp_path / "b" / "train-labels-idx1-ubyte.gz", np.zeros(29, np.uint8))
    with pytest.raises(DataError, match="30 images but .*train-labels.* 29 labels"):
        load_data(f"fashion-mnist:{tmp_path / 'b'}")
    write_idx(tmp_path / "b" / "train-labels-idx1-ubyte.gz", np.full(30, 10, np.uint8))
    with pytest.raises(DataError, match="label 10 out of range"):
        load_data(f"fashion-mnist:{tmp_path / 'b'}")
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    with pytest.raises(DataNotFoundError, match="dataset-fashion-mnist"):
        load_data("fashion-mnist")


def test_spec_errors_list_the_forms():
    with pytest.raises(DataError, match=r"unknown dataset 'mnist'.*demo.*fashion-mnist"):
        load_data("mnist")
    with pytest.raises(DataError, match="takes no directory"):
        parse_spec("demo:/tmp")
    with pytest.raises(DataError, match="unknown option 'size'"):
        parse_spec("fashion-mnist:/x,size=3")
    assert parse_spec("Fashion_MNIST:/a/b").path.as_posix() == "/a/b"


def test_bundled_demo_is_balanced_real_data():
    assert demo_module.DEMO_PATH.stat().st_size < 5_000_000
    bundle = load_data()  # the default is the bundled subset
    info = describe(bundle)
    assert (info["train"], info["test"]) == (6000, 1000)
    assert info["train_per_class"] == [600] * 10 and info["test_per_class"] == [100] * 10
    x = bundle.train.images.float() / 255
    assert abs(x.mean().item() - 0.286) < 0.01 and abs(x.std().item() - 0.353) < 0.01
    images, labels = next(bundle.train.batches(64, shuffle=True,
                                               generator=torch.Generator().manual_seed(0)))
    out = bundle.transform(images, train=True, generator=torch.Generator().manual_seed(1))
    assert out.shape == (64, 1, 28, 28) and out.dtype == torch.float32
    assert labels.dtype == torch.int64


def test_demo_subset_is_seeded_and_balanced(tmp_path):
    _write_fmnist(tmp_path / "fm", n_train=60, n_test=40)
    a = demo_module.make_demo_subset(tmp_path / "a.npz", tmp_path / "fm", 3, 2, seed=5)
    b = demo_module.make_demo_subset(tmp_path / "b.npz", tmp_path / "fm", 3, 2, seed=5)
    c = demo_module.make_demo_subset(tmp_path / "c.npz", tmp_path / "fm", 3, 2, seed=6)
    assert a == b and a["train_indices_md5"] != c["train_indices_md5"]
    bundle = demo_module.load_demo(tmp_path / "a.npz")
    assert len(bundle.train) == 30 and bundle.train.labels.bincount().tolist() == [3] * 10
    assert len(bundle.test) == 20
    with pytest.raises(ValueError, match="only 6 examples, 7 requested"):
        demo_module.make_demo_subset(tmp_path / "d.npz", tmp_path / "fm", 7, 2)
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError, match="bad.npz: not a readable demo data file"):
        demo_module.load_demo(tmp_path / "bad.npz")


@pytest.mark.skipif(not fashion_mnist.DEBIAN_DIR.is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed "
                           "(/usr/share/datasets/fashion-mnist missing)")
def test_real_fashion_mnist_from_debian_package():
    bundle = load_data("fashion-mnist")
    info = describe(bundle)
    assert (info["train"], info["test"], info["num_classes"]) == (60000, 10000, 10)
    assert info["train_per_class"] == [6000] * 10 and info["test_per_class"] == [1000] * 10
    x = bundle.train.images.float() / 255
    assert abs(x.mean().item() - 0.2860) < 1e-3 and abs(x.std().item() - 0.3530) < 1e-3
    assert bundle.train.images.shape == (60000, 1, 28, 28)


def test_data_info_cli(capsys, tmp_path):
    from tasprune.cli import main

    assert main(["data", "info", "demo", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["train"], info["test"], info["resolution"]) == (6000, 1000, 28)
    _write_fmnist(tmp_path / "fm", n_train=30, n_test=20)
    assert main(["data", "info", f"fashion-mnist:{tmp_path / 'fm'}"]) == 0
    out = capsys.readouterr().out
    assert "10 classes, 1x28x28 images" in out and "30 images (3 per class)" in out
    assert "20 images (2 per class)" in out and "pad-4 random crop" in out
    assert main(["data", "info", f"cifar10:{tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err
    assert "no such directory" in err and "tasprune data download cifar10" in err
    assert len(err.strip().splitlines()) == 1
