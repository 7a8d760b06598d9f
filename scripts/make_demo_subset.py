"""Build the bundled demo data (src/tasprune/data/fashion_mnist_demo.npz).

A class-balanced, seeded subset of the real Fashion-MNIST: 600 training and 100
test images per class, read from the IDX files of Debian's `dataset-fashion-mnist`
package (/usr/share/datasets/fashion-mnist) or from --root.

    PYTHONPATH=src python scripts/make_demo_subset.py [--root DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import json

from tasprune.data.demo import DEMO_PATH, make_demo_subset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="directory of the Fashion-MNIST IDX files "
                        "(default: /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--out", default=str(DEMO_PATH), help="output .npz (default: %(default)s)")
    parser.add_argument("--train-per-class", type=int, default=600)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    info = make_demo_subset(args.out, args.root, args.train_per_class, args.test_per_class,
                            args.seed)
    print(json.dumps({"out": args.out, **info}))


if __name__ == "__main__":
    main()
