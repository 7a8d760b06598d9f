"""Progress display for long loops (tqdm on stderr, when it is a terminal), silenced by
quiet=True."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T] | None, total: int | None = None, desc: str = "",
             quiet: bool = False, unit: str = "it") -> Iterator[T] | tqdm:
    """Wrap an iterable in a progress bar; set fields with bar.set_postfix(...).

    With `iterable=None` the bar is advanced by hand (`bar.update(n)`); `unit="B"`
    shows bytes with k/M/G prefixes (downloads).
    """
    # a bar redraws with carriage returns: only on a terminal, never into a piped log
    return tqdm(iterable, total=total, desc=desc, disable=quiet or not sys.stderr.isatty(),
                leave=False,
                dynamic_ncols=True, mininterval=0.5, unit=unit, unit_scale=unit == "B",
                unit_divisor=1024 if unit == "B" else 1000)
