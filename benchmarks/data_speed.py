"""Data loading speed: prints one JSON line per measurement.

    PYTHONPATH=src python benchmarks/data_speed.py [--images 128] [--workers 0 1 2] [--passes 3]

Times `load_data` for the bundled demo and (when installed) Debian's Fashion-MNIST,
and the decode rate of class-folder JPEGs (generated 500x375 photos-sized noise
images, like ImageNet's typical size) at 224 px, for training and evaluation.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tasprune.data import load_data
from tasprune.data.fashion_mnist import DEBIAN_DIR


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _make_folder(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n // 2):
                # smooth noise compresses like a photo more than white noise does
                small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
                Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC).save(
                    root / split / f"c{c}" / f"{i}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--passes", type=int, default=3, help="passes per setting")
    args = parser.parse_args()
    specs = ["demo"] + (["fashion-mnist"] if DEBIAN_DIR.is_dir() else [])
    for spec in specs:
        bundle, seconds = _timed(lambda: load_data(spec))
        print(json.dumps({"bench": "load", "spec": spec, "train": len(bundle.train),
                          "test": len(bundle.test), "seconds": round(seconds, 3)}))
    with tempfile.TemporaryDirectory() as tmp:
        _make_folder(Path(tmp), args.images)
        for workers in args.workers:
            bundle = load_data(f"folder:{tmp},resolution=224,workers={workers}")
            for train in (True, False):
                g = torch.Generator().manual_seed(0)
                # pass 1 starts the worker processes; later passes reuse them
                for n in range(1, args.passes + 1):
                    _, seconds = _timed(lambda: sum(
                        len(y) for _, y in bundle.train.batches(32, shuffle=True, generator=g,
                                                                train=train)))
                    print(json.dumps({"bench": "folder_decode", "workers": workers,
                                      "train": train, "pass": n, "images": len(bundle.train),
                                      "resolution": 224,
                                      "images_per_s": round(len(bundle.train) / seconds, 1)}))


if __name__ == "__main__":
    main()
