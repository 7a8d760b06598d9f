"""Progress display for long loops (tqdm on stderr), silenced by quiet=True."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "",
             quiet: bool = False) -> Iterator[T] | tqdm:
    """Wrap an iterable in a progress bar; set fields with bar.set_postfix(...)."""
    return tqdm(iterable, total=total, desc=desc, disable=quiet, leave=False,
                dynamic_ncols=True, mininterval=0.5)
