"""Fashion-MNIST (Xiao et al., 2017) from its four IDX files, gzipped or not.

Found in a directory the user names, or else where Debian's
`dataset-fashion-mnist` package installs it (`/usr/share/datasets/fashion-mnist`).
The Debian files are recompressed, so their gzip bytes (and MD5 sums) differ from
the official ones; the readers therefore check the IDX structure (magic number,
sizes, label range) rather than checksums. Downloads are checked against the
official sums (`download.py`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from tasprune.data.idx import read_idx
from tasprune.data.integrity import DataError, DataNotFoundError, download_hint, require_dir
from tasprune.data.source import BatchTransform, DataBundle, TensorImages

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SUBDIR = "fashion-mnist"  # what `tasprune data download fashion-mnist --root DIR` creates
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
MEAN, STD = (0.2860,), (0.3530,)
RESOLUTION = 28


def fashion_mnist_transform() -> BatchTransform:
    """Normalisation with the training-set statistics; pad-4 random crop and flip."""
    return BatchTransform(mean=MEAN, std=STD, pad=4, flip=True)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def locate_fashion_mnist(root: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding the IDX files: `root` or `root/fashion-mnist`, else Debian's."""
    if root is None:
        if not DEBIAN_DIR.is_dir():
            raise DataNotFoundError(
                f"{DEBIAN_DIR}: no such directory (Fashion-MNIST is looked for there when no "
                "directory is given); install the Debian package `dataset-fashion-mnist`, or "
                + download_hint("fashion-mnist"))
        root = DEBIAN_DIR
    root = require_dir(Path(root), "Fashion-MNIST directory", download_hint("fashion-mnist", root))
    for candidate in (root, root / SUBDIR):
        if _find(candidate, FILES["train_images"]) is not None:
            return candidate
    return root  # read_fashion_mnist names the first missing file


def read_fashion_mnist(root: str | os.PathLike[str] | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train images [60000, 28, 28], train labels, test images [10000, 28, 28], test labels."""
    directory = locate_fashion_mnist(root)
    arrays = []
    for key, stem in FILES.items():
        path = _find(directory, stem)
        if path is None:
            raise DataNotFoundError(
                f"{directory / stem}[.gz]: missing Fashion-MNIST file; "
                + download_hint("fashion-mnist", directory))
        array = read_idx(path)
        want_dims = 3 if key.endswith("images") else 1
        if array.ndim != want_dims or array.dtype != np.uint8:
            raise DataError(f"{path}: expected uint8 data with {want_dims} dimension(s), got "
                            f"{array.dtype} of shape {array.shape}")
        if key.endswith("labels") and array.size and array.max() >= len(CLASS_NAMES):
            raise DataError(f"{path}: label {int(array.max())} out of range 0..9")
        arrays.append((path, array))
    for (ipath, images), (lpath, labels) in (arrays[0:2], arrays[2:4]):
        if images.shape[1:] != arrays[0][1].shape[1:] or images.shape[1] != images.shape[2]:
            raise DataError(f"{ipath}: images of size {images.shape[1:]}, expected square "
                            f"images of one size (training images are {arrays[0][1].shape[1:]})")
        if len(images) != len(labels):
            raise DataError(f"{ipath} holds {len(images)} images but {lpath} holds "
                            f"{len(labels)} labels; the files do not belong together")
    return tuple(a for _, a in arrays)  # type: ignore[return-value]


def fashion_mnist_bundle(name: str, train_images: np.ndarray, train_labels: np.ndarray,
                         test_images: np.ndarray, test_labels: np.ndarray) -> DataBundle:
    """A DataBundle of in-memory Fashion-MNIST-style arrays ([N, 28, 28] uint8 + labels)."""

    def source(images: np.ndarray, labels: np.ndarray) -> TensorImages:
        return TensorImages(torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1),
                            torch.from_numpy(labels.astype(np.int64)))

    return DataBundle(
        name=name, train=source(train_images, train_labels), test=source(test_images, test_labels),
        num_classes=len(CLASS_NAMES), in_channels=1, resolution=int(train_images.shape[-1]),
        transform=fashion_mnist_transform(), class_names=CLASS_NAMES)


def load_fashion_mnist(root: str | os.PathLike[str] | None = None) -> DataBundle:
    """Fashion-MNIST from `root` (or the Debian package's directory) as an in-memory bundle."""
    return fashion_mnist_bundle("fashion-mnist", *read_fashion_mnist(root))
