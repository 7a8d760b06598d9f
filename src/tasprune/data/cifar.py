"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009) from the official python-pickle directories.

`cifar-10-batches-py/` holds `data_batch_1..5`, `test_batch` and `batches.meta`;
`cifar-100-python/` holds `train`, `test` and `meta`. Each batch is a pickled dict
(written by Python 2) with `data`, a uint8 array [N, 3072] (the red, green and
blue 32x32 planes in row-major order), and the labels as a list of ints.

The files are checked against the official MD5 sums before they are read, and
read with an unpickler that refuses every global except the three numpy needs to
rebuild an array, so a tampered file cannot run code.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasprune.data.integrity import (
    DataError,
    DataNotFoundError,
    download_hint,
    require_dir,
    require_file,
    verify_md5,
)
from tasprune.data.source import BatchTransform, DataBundle, TensorImages

try:  # numpy >= 2 moved the module; old pickles still name numpy.core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]


@dataclass(frozen=True)
class CifarLayout:
    """File names, dict keys, checksums and statistics of one CIFAR variant."""

    name: str  # the --data kind and download name
    dirname: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    md5: Mapping[str, str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


# MD5 sums of the extracted official files, as published with the archives at
# https://www.cs.toronto.edu/~kriz/cifar.html and listed in torchvision's
# torchvision/datasets/cifar.py (train_list / test_list / meta).
CIFAR10 = CifarLayout(
    name="cifar10", dirname="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
    meta_file="batches.meta", label_key="labels", names_key="label_names", num_classes=10,
    md5={
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    },
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
)
CIFAR100 = CifarLayout(
    name="cifar100", dirname="cifar-100-python",
    train_files=("train",), test_files=("test",), meta_file="meta",
    label_key="fine_labels", names_key="fine_label_names", num_classes=100,
    md5={
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    },
    # per-channel mean and standard deviation of the 50,000 training images
    mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
)
LAYOUTS = {layout.name: layout for layout in (CIFAR10, CIFAR100)}

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays; refuses any other global."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: a CIFAR batch holds only "
                "dicts, lists, strings, numbers and numpy arrays") from None


def read_cifar_pickle(path: Path) -> dict[str, Any]:
    """One official CIFAR file as a dict with str keys (Python 2 strings decoded as latin-1)."""
    try:
        with open(path, "rb") as fh:
            obj = _NumpyOnlyUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError) as exc:
        raise DataError(f"{path}: not a readable CIFAR python batch (truncated, corrupt or "
                        f"unsafe): {exc}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR python batch (holds a {type(obj).__name__}, "
                        "expected a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def locate_cifar(root: str | os.PathLike[str], layout: CifarLayout) -> Path:
    """`root/<dirname>` or `root` itself, whichever holds the batches."""
    hint = download_hint(layout.name, root)
    root = require_dir(Path(root), f"{layout.name} directory", hint)
    if (root / layout.dirname).is_dir():
        return root / layout.dirname
    if root.name == layout.dirname or (root / layout.train_files[0]).exists():
        return root
    raise DataNotFoundError(f"{root}: holds no {layout.dirname}/ directory (the official "
                            f"python version of {layout.name}); {hint}")


def _read_split(directory: Path, files: tuple[str, ...], layout: CifarLayout
                ) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in files:
        path = directory / name
        batch = read_cifar_pickle(path)
        data, targets = batch.get("data"), batch.get(layout.label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
                or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{path}: 'data' is not a uint8 array [N, 3072] "
                            f"(got {getattr(data, 'dtype', type(data).__name__)} "
                            f"{getattr(data, 'shape', '')}); not a {layout.name} batch")
        if targets is None:
            raise DataError(f"{path}: no '{layout.label_key}' entry; not a {layout.name} batch")
        targets = np.asarray(targets, dtype=np.int64)
        if targets.shape != (len(data),):
            raise DataError(f"{path}: {len(data)} images but {targets.size} labels")
        if targets.size and (targets.min() < 0 or targets.max() >= layout.num_classes):
            raise DataError(f"{path}: labels outside 0..{layout.num_classes - 1}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(targets)
    return np.concatenate(images), np.concatenate(labels)


def load_cifar(root: str | os.PathLike[str], name: str = "cifar10", verify: bool = True,
               md5: Mapping[str, str] | None = None) -> DataBundle:
    """CIFAR-10 or -100 (`name`) from the official python directory in or at `root`.

    `verify` checks every file against `md5` (default: the official sums) first.
    """
    if name not in LAYOUTS:
        raise ValueError(f"unknown CIFAR variant {name!r}; use one of {sorted(LAYOUTS)}")
    layout = LAYOUTS[name]
    directory = locate_cifar(root, layout)
    hint = download_hint(layout.name, directory.parent)
    sums = layout.md5 if md5 is None else md5
    for file in layout.files:
        require_file(directory / file, f"{layout.name} file", hint)
        if verify:
            if file not in sums:
                raise ValueError(f"no MD5 sum given for {file}; pass one for every file of "
                                 f"{layout.dirname} or verify=False")
            verify_md5(directory / file, sums[file],
                       f"{hint} (or pass `,verify=no` to read a modified copy)")
    train = _read_split(directory, layout.train_files, layout)
    test = _read_split(directory, layout.test_files, layout)
    names = read_cifar_pickle(directory / layout.meta_file).get(layout.names_key)
    if not isinstance(names, list) or len(names) != layout.num_classes:
        raise DataError(f"{directory / layout.meta_file}: '{layout.names_key}' is not a list "
                        f"of {layout.num_classes} class names")

    def source(split: tuple[np.ndarray, np.ndarray]) -> TensorImages:
        return TensorImages(torch.from_numpy(split[0]), torch.from_numpy(split[1]))

    return DataBundle(
        name=layout.name, train=source(train), test=source(test),
        num_classes=layout.num_classes, in_channels=3, resolution=32,
        transform=BatchTransform(mean=layout.mean, std=layout.std, pad=4, flip=True),
        class_names=tuple(str(n) for n in names))
