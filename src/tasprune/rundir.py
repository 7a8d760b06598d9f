"""Run directories: what kind of run one holds, and who is using it.

Every command that writes a run directory (`prune`/`baseline`/`demo`, `search`,
`train`) first checks that the directory is empty, new, or a run of its own kind
(`check_kind`), so no command overwrites another's `shape.json`, `model.safetensors`
or checkpoints, and then holds a lock on it (`run_lock`) for as long as it runs, so
two commands never write one directory at once. The lock is an advisory `flock` on
the directory itself: no file is added, and the kernel releases it when the process
ends in any way, `kill -9` included.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

KINDS = ("prune", "search", "train")
# what each kind of run writes: the files no export may overwrite
ARTIFACTS = frozenset({
    "config.yaml", "train_config.yaml", "shape.json", "model.safetensors", "metrics.jsonl",
    "summary.json", "report.md", "search.pt", "search.prev.pt", "train.pt", "train.prev.pt",
    "best.pt", "run.json",
})


def run_kind(directory: str | os.PathLike[str]) -> str | None:
    """"prune", "search" or "train" for a directory one of those commands wrote, None for
    anything else (missing, empty, unrelated files)."""
    d = Path(directory)
    if not d.is_dir():
        return None
    if (d / "config.yaml").is_file() or (d / "run.json").is_file():
        return "prune"
    if any((d / f).is_file() for f in ("train_config.yaml", "train.pt", "train.prev.pt")):
        return "train"
    if any((d / f).is_file() for f in ("search.pt", "search.prev.pt")):
        return "search"
    if (d / "model.safetensors").is_file():
        return "train"
    return None


def check_kind(directory: str | os.PathLike[str], command: str) -> None:
    """Refuse to write the run of `command` (one of KINDS) into a run of another kind."""
    found = run_kind(directory)
    if found is not None and found != command:
        raise ValueError(f"{directory} holds a `tasprune {found}` run; `tasprune {command}` "
                         f"would overwrite its files: choose another --out")


def check_export_target(source: str | os.PathLike[str], target: str | os.PathLike[str]
                        ) -> None:
    """Refuse an export target that is the exported file itself or a file a run needs."""
    src, out = Path(source).absolute(), Path(target).absolute()
    run = src if src.is_dir() else src.parent
    if out.resolve() == src.resolve() or (out.parent.resolve() == run.resolve()
                                          and out.name in ARTIFACTS):
        raise ValueError(f"--out {target} is a file of the run {run} ({out.name}); exporting "
                         "over it would destroy the run: choose another file name")


def _holder(directory: Path) -> str:
    """Who holds the lock on `directory`, from /proc/locks (Linux), as far as known."""
    try:
        inode = directory.stat().st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].endswith(f":{inode}"):
                pid = parts[4]
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                words = " ".join(cmd.decode(errors="replace").split())
                return f"process {pid} ({words[:120]})"
    except OSError:
        pass
    return "another process"


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike[str], enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `directory` (created with its parent if missing; removed
    again if this call created them and the command left them empty). A directory
    another process holds is a ValueError naming that process. `enabled` False (the other
    ranks of a torchrun job) does nothing."""
    if not enabled:
        yield
        return
    d = Path(directory)
    created = [p for p in (d.absolute().parent, d) if not p.exists()]
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{d} is in use by {_holder(d)}; wait for it to finish, or "
                             "choose another --out") from None
        yield
    finally:
        os.close(fd)  # releases the lock
        for path in reversed(created):
            with contextlib.suppress(OSError):
                path.rmdir()  # only when empty: a refused command leaves no trace
