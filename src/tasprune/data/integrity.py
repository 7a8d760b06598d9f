"""Data errors and file checks (existence, MD5 checksums) shared by every dataset reader.

Every problem with a user's data files ends as one `DataError` whose message
names the path, says what is wrong and what to do (often: the download command).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


class DataError(ValueError):
    """Data that is missing, corrupt or not in the expected format; the message says what to do."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset directory or file that does not exist."""


def download_hint(name: str, root: str | os.PathLike[str] | None = None) -> str:
    """The sentence that tells a user how to fetch a dataset we can download."""
    where = str(root) if root is not None else "DIR"
    return (f"on a machine that is online, run `tasprune data download {name} --root {where}` "
            f"and pass --data {name}:{where}")


def require_dir(path: Path, what: str, hint: str = "") -> Path:
    """`path` if it is a directory, else a `DataNotFoundError` naming it."""
    if not path.is_dir():
        state = "is not a directory" if path.exists() else "no such directory"
        raise DataNotFoundError(f"{path}: {state} ({what}){'; ' + hint if hint else ''}")
    return path


def require_file(path: Path, what: str, hint: str = "") -> Path:
    """`path` if it is a file, else a `DataNotFoundError` naming it."""
    if not path.is_file():
        raise DataNotFoundError(f"{path}: missing {what}{'; ' + hint if hint else ''}")
    return path


def md5_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex MD5 of a file, read in chunks (the official datasets publish MD5 sums)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_md5(path: Path, expected: str, hint: str = "") -> None:
    """Raise a `DataError` naming `path` if its MD5 is not `expected`."""
    actual = md5_file(path)
    if actual != expected.lower():
        raise DataError(
            f"{path}: wrong checksum (MD5 {actual}, expected {expected}); the file is corrupt, "
            f"truncated or not the official one{'; ' + hint if hint else ''}")
