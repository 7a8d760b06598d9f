"""Datasets: one `--data` spec string -> a `DataBundle` (both splits, sizes, transform).

Spec forms (`load_data`):

    demo                          the Fashion-MNIST subset bundled in the package
    fashion-mnist[:DIR]           IDX files in DIR, else /usr/share/datasets/fashion-mnist
    cifar10:DIR[,verify=no]       DIR holds cifar-10-batches-py/ (or is it)
    cifar100:DIR[,verify=no]      DIR holds cifar-100-python/ (or is it)
    folder:DIR[,resolution=N][,workers=N]
                                  DIR/train/<class>/*.jpg|png and DIR/val/<class>/...
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tasprune.data.cifar import load_cifar
from tasprune.data.demo import load_demo
from tasprune.data.fashion_mnist import load_fashion_mnist
from tasprune.data.folder import FolderImages, load_folder
from tasprune.data.integrity import DataError, DataNotFoundError
from tasprune.data.source import (
    BatchTransform,
    DataBundle,
    ImageSource,
    TensorImages,
    per_class_split,
)

SPEC_FORMS = (
    "demo",
    "fashion-mnist[:DIR]",
    "cifar10:DIR[,verify=no]",
    "cifar100:DIR[,verify=no]",
    "folder:DIR[,resolution=224][,workers=N]",
)
DATA_SPEC_HELP = ("dataset: " + ", ".join(SPEC_FORMS)
                  + " (default DIR for fashion-mnist: /usr/share/datasets/fashion-mnist)")
_ALIASES = {"fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10",
            "cifar-100": "cifar100"}
# the `,key=value` options each kind accepts
_OPTIONS = {"cifar10": ("verify",), "cifar100": ("verify",), "folder": ("resolution", "workers")}
_OPTION = re.compile(r",\s*([A-Za-z_]+)\s*=\s*([^,]*)$")
_NEEDS_DIR = frozenset({"cifar10", "cifar100", "folder"})


@dataclass(frozen=True)
class DataSpec:
    """A parsed `--data` string: the dataset kind, its directory and its options."""

    kind: str
    path: Path | None = None
    options: dict[str, str] = field(default_factory=dict)


def parse_spec(spec: str) -> DataSpec:
    """Split `kind[:PATH][,key=value...]`; an unknown kind lists the accepted forms."""
    kind, _, rest = spec.strip().partition(":")
    kind = _ALIASES.get(kind.lower(), kind.lower())
    forms = {form.split("[")[0].split(":")[0]: form for form in SPEC_FORMS}
    if kind not in forms:
        raise DataError(f"unknown dataset {spec!r}; use one of: {', '.join(SPEC_FORMS)}")
    options: dict[str, str] = {}
    # trailing ",key=value" parts are options; anything before them is the path
    while (match := _OPTION.search(rest)) is not None:
        key, value = match.group(1), match.group(2)
        if key not in _OPTIONS.get(kind, ()):
            raise DataError(f"{spec!r}: unknown option {key!r} for {kind}; accepted: "
                            f"{', '.join(_OPTIONS.get(kind, ())) or 'none'}")
        options.setdefault(key, value)
        rest = rest[:match.start()]
    path = Path(rest).expanduser() if rest else None
    if kind == "demo" and path is not None:
        raise DataError(f"{spec!r}: the demo data takes no directory; use `demo`")
    if path is None and kind in _NEEDS_DIR:
        raise DataError(f"{spec!r}: {kind} needs a directory: {forms[kind]}")
    return DataSpec(kind, path, options)


def same_data(a: str, b: str) -> bool:
    """Whether two `--data` specs read the same images: equal but for options that only
    change how fast they load (`workers`)."""
    try:
        x, y = parse_spec(a), parse_spec(b)
    except DataError:
        return a == b
    def strip(options: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in options.items() if k != "workers"}
    return (x.kind, x.path, strip(x.options)) == (y.kind, y.path, strip(y.options))


def load_data(spec: str = "demo", *, resolution: int | None = None, workers: int | None = None,
              quiet: bool = True) -> DataBundle:
    """Load the dataset a `--data` spec names (see the module docstring for the forms).

    `resolution` and `workers` apply to folders (the spec's own options win); a
    fixed-size dataset accepts only its own resolution. Nothing is downloaded; a
    missing or corrupt dataset raises a `DataError` that says what to do.
    """
    parsed = parse_spec(spec)
    options = parsed.options
    if parsed.kind == "folder":
        assert parsed.path is not None  # parse_spec requires it
        size = _count(options.get("resolution"), "resolution", resolution, minimum=1)
        return load_folder(parsed.path, resolution=224 if size is None else size,
                           workers=_count(options.get("workers"), "workers", workers, minimum=0),
                           quiet=quiet)
    if parsed.kind == "demo":
        bundle = load_demo()
    elif parsed.kind == "fashion-mnist":
        bundle = load_fashion_mnist(parsed.path)
    elif parsed.kind in ("cifar10", "cifar100"):
        assert parsed.path is not None
        bundle = load_cifar(parsed.path, parsed.kind,
                            verify=_flag(options.get("verify", "yes"), "verify"))
    else:  # pragma: no cover - parse_spec rejects unknown kinds
        raise AssertionError(parsed.kind)
    if resolution is not None and resolution != bundle.resolution:
        raise DataError(f"{spec}: images are {bundle.resolution}x{bundle.resolution}; a "
                        f"resolution of {resolution} applies only to folder datasets")
    return bundle


def _count(text: str | None, key: str, given: int | None, minimum: int) -> int | None:
    """An integer option: from the spec text, else the keyword argument (None: default)."""
    if text is None:
        return given
    try:
        value = int(text)
    except ValueError:
        raise DataError(f"option {key}={text!r}: expected a whole number") from None
    if value < minimum:
        raise DataError(f"option {key}={value}: must be at least {minimum}")
    return value


def _flag(value: str, key: str) -> bool:
    if value.lower() in ("1", "yes", "true", "on"):
        return True
    if value.lower() in ("0", "no", "false", "off"):
        return False
    raise DataError(f"option {key}={value!r}: use yes or no")


def describe(bundle: DataBundle) -> dict[str, object]:
    """Sizes, classes and input format of a bundle, as plain JSON-able values."""
    def counts(source: ImageSource) -> list[int]:
        return source.labels.bincount(minlength=bundle.num_classes).tolist()

    return {
        "name": bundle.name, "num_classes": bundle.num_classes,
        "in_channels": bundle.in_channels, "resolution": bundle.resolution,
        "train": len(bundle.train), "test": len(bundle.test),
        "train_per_class": counts(bundle.train), "test_per_class": counts(bundle.test),
        "mean": list(bundle.transform.mean), "std": list(bundle.transform.std),
        "augment": {"pad": bundle.transform.pad, "flip": bundle.transform.flip},
        "class_names": list(bundle.class_names) if bundle.class_names else None,
    }


__all__ = [
    "DATA_SPEC_HELP",
    "SPEC_FORMS",
    "BatchTransform",
    "DataBundle",
    "DataError",
    "DataNotFoundError",
    "DataSpec",
    "FolderImages",
    "ImageSource",
    "TensorImages",
    "describe",
    "load_cifar",
    "load_data",
    "load_demo",
    "load_fashion_mnist",
    "load_folder",
    "parse_spec",
    "per_class_split",
]
