import os
import pickle

import numpy as np
import pytest
import torch

from helpers import py2_dump, write_cifar
from tasprune.data import DataError, DataNotFoundError, load_data
from tasprune.data.cifar import CIFAR10, CIFAR100, LAYOUTS, load_cifar, read_cifar_pickle


@pytest.mark.parametrize("name, n_train", [("cifar10", 20), ("cifar100", 4)])
def test_cifar_reads_the_official_format(tmp_path, name, n_train):
    sums = write_cifar(tmp_path, name)
    layout = LAYOUTS[name]
    bundle = load_cifar(tmp_path, name, md5=sums)
    assert (bundle.num_classes, bundle.in_channels, bundle.resolution) == (layout.num_classes, 3,
                                                                           32)
    assert len(bundle.train) == n_train and len(bundle.test) == 4
    assert bundle.class_names[:2] == ("class0", "class1")
    assert bundle.transform.mean == layout.mean and bundle.transform.pad == 4
    first = read_cifar_pickle(tmp_path / layout.dirname / layout.train_files[0])
    # channel planes: the first 1024 values are red, row-major
    assert torch.equal(bundle.train.images[0, 0].flatten(),
                       torch.from_numpy(first["data"][0, :1024]))
    assert torch.equal(bundle.train.images[0, 2, 1],
                       torch.from_numpy(first["data"][0, 2048 + 32:2048 + 64]))
    assert bundle.train.labels[:4].tolist() == first[layout.label_key]
    # the directory itself works too, and so does the spec with verification off
    same = load_cifar(tmp_path / layout.dirname, name, md5=sums)
    assert torch.equal(same.test.images, bundle.test.images)
    spec = load_data(f"{name}:{tmp_path},verify=no")
    assert torch.equal(spec.train.labels, bundle.train.labels)


def test_official_checksums_reject_other_files(tmp_path):
    write_cifar(tmp_path, "cifar10")
    with pytest.raises(DataError, match=r"data_batch_1: wrong checksum .*expected "
                       r"c99cafc152244af753f735de768cd75f.*tasprune data download cifar10"):
        load_data(f"cifar10:{tmp_path}")
    assert CIFAR100.md5["train"] == "16019d7e3df5f24257cddd939b257f8d"


def test_tampered_file_fails_its_checksum(tmp_path):
    sums = write_cifar(tmp_path, "cifar10")
    path = tmp_path / CIFAR10.dirname / "data_batch_3"
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="data_batch_3: wrong checksum"):
        load_cifar(tmp_path, md5=sums)


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"no such directory.*data download cifar100"):
        load_data(f"cifar100:{tmp_path / 'nope'}")
    with pytest.raises(DataNotFoundError, match="holds no cifar-10-batches-py"):
        load_data(f"cifar10:{tmp_path}")
    with pytest.raises(DataError, match="needs a directory"):
        load_data("cifar10")
    sums = write_cifar(tmp_path, "cifar10")
    os.remove(tmp_path / CIFAR10.dirname / "test_batch")
    with pytest.raises(FileNotFoundError, match=r"test_batch: missing cifar10 file.*download"):
        load_cifar(tmp_path, md5=sums)
    path = tmp_path / CIFAR10.dirname / "data_batch_2"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="data_batch_2: not a readable CIFAR python batch"):
        read_cifar_pickle(path)


def test_label_count_mismatch(tmp_path):
    write_cifar(tmp_path, "cifar10")
    path = tmp_path / CIFAR10.dirname / "data_batch_4"
    py2_dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2]}, path)
    with pytest.raises(DataError, match="data_batch_4: 4 images but 3 labels"):
        load_cifar(tmp_path, verify=False)


def test_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil"
    path.write_bytes(pickle.dumps({"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match=r"refusing to load global (posix|os|nt)\.system"):
        read_cifar_pickle(path)
    assert not (tmp_path / "pwned").exists()
