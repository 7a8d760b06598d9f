"""`tasprune data`: describe a dataset, or download one."""

from __future__ import annotations

import argparse
import json

from tasprune.data import DATA_SPEC_HELP


def add(sub: argparse._SubParsersAction) -> None:
    from tasprune.data.download import REMOTES

    p = sub.add_parser("data", help="describe a dataset, or download one",
                       description="Describe a dataset (`info`) or download one (`download`).")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    info = actions.add_parser(
        "info", help="print sizes, classes and input format of a --data spec",
        description="Load a dataset as training would and print its name, class count, "
        "image size, train/test sizes per class, normalisation and augmentation. Writes no "
        "files and downloads nothing.")
    info.add_argument("spec", help=DATA_SPEC_HELP)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_data_info)
    dl = actions.add_parser(
        "download", help="download CIFAR-10/100 or Fashion-MNIST (needs a network)",
        description="Download a dataset from its official site (or --mirror) into ROOT, "
        "checking every file's MD5 sum. Writes ROOT/cifar-10-batches-py/, "
        "ROOT/cifar-100-python/ or ROOT/fashion-mnist/ (files arrive under temp names and "
        "are renamed only once verified; CIFAR tarballs are deleted after extraction). "
        "Does nothing if the verified files are already there. Then use --data NAME:ROOT.")
    dl.add_argument("name", choices=list(REMOTES), help="dataset to fetch")
    dl.add_argument("--root", required=True, help="directory to download into (created)")
    dl.add_argument("--mirror", metavar="URL",
                    help="base URL serving the same file names instead of the official site")
    dl.add_argument("--quiet", action="store_true", help="no progress bar")
    dl.set_defaults(func=cmd_data_download)


def cmd_data_info(args: argparse.Namespace) -> int:
    from tasprune.data import describe, load_data

    info = describe(load_data(args.spec, quiet=False))
    if args.json:
        print(json.dumps(info))
        return 0
    size = f"{info['in_channels']}x{info['resolution']}x{info['resolution']}"
    print(f"{info['name']}: {info['num_classes']} classes, {size} images")
    for split in ("train", "test"):
        per_class = info[f"{split}_per_class"]
        spread = (f"{min(per_class):,} per class" if min(per_class) == max(per_class)
                  else f"{min(per_class):,} to {max(per_class):,} per class")
        print(f"{split + ':':<7}{info[split]:>10,} images ({spread})")
    augment = info["augment"]
    how = (f"pad-{augment['pad']} random crop" if augment["pad"] else
           "random resized crop at decode time") + " + horizontal flip"
    print(f"normalise: mean {tuple(info['mean'])}, std {tuple(info['std'])}; "
          f"training augmentation: {how}")
    names = info["class_names"] or []
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    print(f"classes: {shown}")
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    from tasprune.data.download import download

    target = download(args.name, args.root, mirror=args.mirror, quiet=args.quiet)
    print(f"{args.name}: ready in {target}; use --data {args.name}:{args.root}")
    return 0
