"""Datasets: one `--data` spec string -> a `DataBundle` (both splits, sizes, transform).

Spec forms (`load_data`):

    demo                          the Fashion-MNIST subset bundled in the package
    fashion-mnist[:DIR]           IDX files in DIR, else /usr/share/datasets/fashion-mnist
    cifar10:DIR[,verify=no]       DIR holds cifar-10-batches-py/ (or is it)
    cifar100:DIR[,verify=no]      DIR holds cifar-100-python/ (or is it)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tasprune.data.cifar import load_cifar
from tasprune.data.demo import load_demo
from tasprune.data.fashion_mnist import load_fashion_mnist
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
    "cifar10:DIR",
    "cifar100:DIR",
)
DATA_SPEC_HELP = ("dataset: " + ", ".join(SPEC_FORMS)
                  + " (default DIR for fashion-mnist: /usr/share/datasets/fashion-mnist)")
_ALIASES = {"fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10",
            "cifar-100": "cifar100"}
_OPTIONS = {"cifar10": ("verify",), "cifar100": ("verify",)}  # accepted `,key=value` options
_OPTION = re.compile(r",\s*([A-Za-z_]+)\s*=\s*([^,]*)$")
_NEEDS_DIR = frozenset({"cifar10", "cifar100"})


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


def load_data(spec: str = "demo") -> DataBundle:
    """Load the dataset a `--data` spec names (see the module docstring for the forms).

    Nothing is downloaded; a missing or corrupt dataset raises a `DataError` that says
    what to do.
    """
    parsed = parse_spec(spec)
    if parsed.kind == "demo":
        return load_demo()
    if parsed.kind == "fashion-mnist":
        return load_fashion_mnist(parsed.path)
    if parsed.kind in ("cifar10", "cifar100"):
        assert parsed.path is not None  # parse_spec requires it
        return load_cifar(parsed.path, parsed.kind,
                          verify=_flag(parsed.options.get("verify", "yes"), "verify"))
    raise AssertionError(f"unhandled dataset kind {parsed.kind}")  # parse_spec rejects these


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
    "ImageSource",
    "TensorImages",
    "describe",
    "load_cifar",
    "load_data",
    "load_demo",
    "load_fashion_mnist",
    "parse_spec",
    "per_class_split",
]
