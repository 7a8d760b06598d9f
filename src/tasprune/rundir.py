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
    if found is None and Path(directory).is_dir():
        taken = sorted(p.name for p in Path(directory).iterdir() if p.name in ARTIFACTS)
        if taken:
            raise ValueError(f"{directory} holds {', '.join(taken[:3])}, which no tasprune run "
                             f"wrote there, and `tasprune {command}` would overwrite it: choose "
                             "another --out")


def check_export_target(source: str | os.PathLike[str], target: str | os.PathLike[str],
                        default_name: str) -> None:
    """Refuse an export file that would replace a file `tasprune export` did not write.

    A new path is fine unless it is a file name a run writes, in a run directory. An
    existing file is replaced only when it is `default_name` (what export writes by
    default, e.g. model.onnx) in a run directory: an earlier export of that format.
    Anything else that exists (another run's model, the run's teacher, a plot, a file of
    the user's) is refused, and so is the exported file itself, even through a symlink."""
    if not str(target).strip():
        raise ValueError("--out '' names no file; give one, e.g. --out model.onnx")
    src, out = Path(source).absolute(), Path(target).absolute()
    run = src if src.is_dir() else src.parent
    if out.resolve() == src.resolve() or out.resolve() == (run / "model.safetensors").resolve():
        raise ValueError(f"--out {target} is the model being exported; choose another file "
                         "name")
    if out.is_dir():
        raise ValueError(f"--out {target} is a directory; give a file name, e.g. "
                         f"{out / default_name}")
    in_run = run_kind(out.parent) is not None
    if out.exists() or out.is_symlink():
        if out.is_file() and not out.is_symlink() and out.name == default_name and in_run:
            return  # an earlier export into a run directory
        raise ValueError(f"--out {target} already exists and tasprune export did not write it "
                         "there; choose a new file name (or move that file away)")
    if in_run and out.name in ARTIFACTS:
        raise ValueError(f"--out {target} is a file name of the run {out.parent}; exporting "
                         "there would confuse the run: choose another file name")


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
