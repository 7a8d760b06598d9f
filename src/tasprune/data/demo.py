"""The bundled demo data: a class-balanced real subset of Fashion-MNIST inside the package.

6,000 training and 1,000 test images (600 / 100 per class), drawn with a fixed
seed from the Debian package's files by `scripts/make_demo_subset.py` and stored
as a compressed `.npz`, so the demo and the end-to-end tests run anywhere with
no download.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from tasprune.data.fashion_mnist import CLASS_NAMES, fashion_mnist_bundle, read_fashion_mnist
from tasprune.data.integrity import DataError, DataNotFoundError
from tasprune.data.source import DataBundle

DEMO_PATH = Path(__file__).with_name("fashion_mnist_demo.npz")
_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `per_class` random examples of every class, in their original order."""
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise ValueError(f"class {c} has only {len(idx)} examples, {per_class} requested")
        chosen.append(rng.choice(idx, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def make_demo_subset(out: str | os.PathLike[str], root: str | os.PathLike[str] | None = None,
                     train_per_class: int = 600, test_per_class: int = 100, seed: int = 0
                     ) -> dict[str, object]:
    """Write the demo `.npz` from the Fashion-MNIST files in `root` (default: Debian's).

    Returns the provenance record stored alongside the arrays.
    """
    train_x, train_y, test_x, test_y = read_fashion_mnist(root)
    rng = np.random.default_rng(seed)
    train_idx = balanced_subset(train_y, train_per_class, rng)
    test_idx = balanced_subset(test_y, test_per_class, rng)
    info = {
        "source": "Fashion-MNIST (Xiao, Rasul & Vollgraf 2017), MIT licence",
        "seed": seed, "train_per_class": train_per_class, "test_per_class": test_per_class,
        "train_indices_md5": md5_of(train_idx), "test_indices_md5": md5_of(test_idx),
    }
    np.savez_compressed(
        out, train_images=train_x[train_idx], train_labels=train_y[train_idx].astype(np.uint8),
        test_images=test_x[test_idx], test_labels=test_y[test_idx].astype(np.uint8),
        class_names=np.array(CLASS_NAMES), info=np.array(json.dumps(info)))
    return info


def md5_of(indices: np.ndarray) -> str:
    """A short fingerprint of the chosen indices, so a rebuilt subset can be compared."""
    return hashlib.md5(indices.astype("<i8").tobytes(), usedforsecurity=False).hexdigest()


def load_demo(path: str | os.PathLike[str] | None = None) -> DataBundle:
    """The bundled Fashion-MNIST subset (or a file made by `make_demo_subset`) as a bundle."""
    path = Path(path) if path is not None else DEMO_PATH
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = [npz[key] for key in _KEYS]
    except FileNotFoundError:
        raise DataNotFoundError(f"{path}: the bundled demo data is missing from this installation; "
                        "reinstall tasprune or rebuild it with scripts/make_demo_subset.py"
                        ) from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable demo data file ({exc}); "
                        "rebuild it with scripts/make_demo_subset.py") from None
    return fashion_mnist_bundle("fashion-mnist-demo", *arrays)
