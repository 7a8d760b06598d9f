"""Download CIFAR-10/100 and Fashion-MNIST from their official sites (or a mirror).

Only `tasprune data download` (or a direct call of `download`) touches the
network. Every file is streamed to a temp name beside its destination, checked
against the official MD5 sum and only then renamed into place, so an interrupted
or corrupted download never leaves a file that looks complete. CIFAR tarballs are
extracted member by member after checking that every member is a plain file or
directory inside the dataset's own folder (no absolute paths, `..`, links or
devices), then moved into place in one rename.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tasprune._io import atomic_write
from tasprune.data.cifar import CIFAR10, CIFAR100, LAYOUTS
from tasprune.data.fashion_mnist import SUBDIR as FASHION_MNIST_SUBDIR
from tasprune.data.integrity import DataError, md5_file
from tasprune.progress import progress


@dataclass(frozen=True)
class Remote:
    """Where a dataset is published, its files with their MD5 sums, and where it lands."""

    name: str
    base_url: str
    files: Mapping[str, str]  # file name -> MD5
    target: str  # the directory under --root that holds the dataset afterwards
    archive: bool  # files are .tar.gz archives of `target`


# Archive sums as published on https://www.cs.toronto.edu/~kriz/cifar.html; Fashion-MNIST
# sums from the "Get the Data" table of https://github.com/zalandoresearch/fashion-mnist.
REMOTES: dict[str, Remote] = {
    "cifar10": Remote("cifar10", "https://www.cs.toronto.edu/~kriz/",
                      {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
                      CIFAR10.dirname, archive=True),
    "cifar100": Remote("cifar100", "https://www.cs.toronto.edu/~kriz/",
                       {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"},
                       CIFAR100.dirname, archive=True),
    "fashion-mnist": Remote(
        "fashion-mnist", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
         "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
         "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
         "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
        FASHION_MNIST_SUBDIR, archive=False),
}


def download(name: str, root: str | os.PathLike[str], mirror: str | None = None,
             quiet: bool = False, timeout: float = 60.0) -> Path:
    """Fetch dataset `name` into `root` (unless already there) and return its directory.

    `mirror` replaces the official base URL (the file names are appended to it).
    """
    if name not in REMOTES:
        raise DataError(f"cannot download {name!r}; choose one of: {', '.join(REMOTES)}")
    remote = REMOTES[name]
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    target = root / remote.target
    if _present(remote, target):
        return target
    base = (mirror or remote.base_url).rstrip("/") + "/"
    landing = root if remote.archive else target
    landing.mkdir(parents=True, exist_ok=True)
    for file, md5 in remote.files.items():
        path = landing / file
        if not (path.is_file() and md5_file(path) == md5):
            fetch(base + file, path, md5, quiet=quiet, timeout=timeout)
        if remote.archive:
            safe_extract(path, root, remote.target)
            path.unlink()
    return target


def _present(remote: Remote, target: Path) -> bool:
    """Whether `target` already holds the verified dataset (so nothing is fetched)."""
    if remote.archive:
        layout = LAYOUTS[remote.name]
        return all((target / f).is_file() and md5_file(target / f) == layout.md5[f]
                   for f in layout.files)
    return all((target / f).is_file() and md5_file(target / f) == md5
               for f, md5 in remote.files.items())


def fetch(url: str, dest: Path, md5: str, quiet: bool = False, timeout: float = 60.0) -> None:
    """Download `url` to `dest` atomically, with a progress bar, checking its MD5 sum."""

    def write(tmp: Path) -> None:
        digest = hashlib.md5(usedforsecurity=False)
        size = 0
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, \
                    open(tmp, "wb") as out:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                bar = progress(None, total=total, desc=dest.name, quiet=quiet, unit="B")
                while block := response.read(1 << 16):
                    out.write(block)
                    digest.update(block)
                    size += len(block)
                    bar.update(len(block))
                bar.close()
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            reason = (f"HTTP {exc.code} {exc.reason}" if isinstance(exc, urllib.error.HTTPError)
                      else getattr(exc, "reason", None) or exc)
            raise DataError(f"{url}: download failed ({reason}); check the connection, or "
                            "pass --mirror URL to fetch the same files elsewhere") from None
        if total is not None and size != total:
            raise DataError(f"{url}: download truncated ({size} of {total} bytes); run the "
                            "command again")
        if digest.hexdigest() != md5:
            raise DataError(f"{url}: wrong checksum (MD5 {digest.hexdigest()}, expected {md5}); "
                            "the download is corrupt or the mirror serves other files; nothing "
                            f"was written to {dest}")

    atomic_write(dest, write)


def _check_member(member: tarfile.TarInfo, archive: Path, top: str) -> None:
    parts = PurePosixPath(member.name).parts
    if member.name.startswith(("/", "\\")) or ".." in parts or not parts or parts[0] != top:
        raise DataError(f"{archive}: refusing to extract {member.name!r} (outside {top}/); "
                        "the archive is not the official one")
    if not (member.isfile() or member.isdir()):
        raise DataError(f"{archive}: refusing to extract {member.name!r} (a link or special "
                        "file); the archive is not the official one")


def safe_extract(archive: Path, root: Path, top: str) -> Path:
    """Extract a .tar.gz whose members all lie under `top/` into `root/top`, replacing it."""
    old: Path | None = None
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, archive, top)
            staging = Path(tempfile.mkdtemp(prefix=f".{top}.", dir=root))
            try:
                if hasattr(tarfile, "data_filter"):  # defence in depth on Pythons that have it
                    tar.extractall(staging, members=members, filter="data")
                else:  # pragma: no cover - Python < 3.11.4; members were checked above
                    tar.extractall(staging, members=members)
                if not (staging / top).is_dir():
                    raise DataError(f"{archive}: holds no {top}/ directory")
                if (root / top).exists():  # an old or damaged copy: moved aside, then deleted
                    old = Path(tempfile.mkdtemp(prefix=f".{top}.old.", dir=root))
                    (root / top).rename(old / top)
                (staging / top).rename(root / top)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{archive}: cannot extract ({exc}); delete it and download again"
                        ) from None
    return root / top
