"""Small file helpers shared by shapes, checkpoints, metrics and exports."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temp file beside `path`, fsync it, then rename it over `path`.

    A crash at any point leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    # the temp name ends like the file (torch.export.save warns about any other ending)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}",
                                dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # mkstemp makes 0600, and a writer may recreate the file (safetensors does): set
        # the mode after writing, so a model file reads like any other
        tmp.chmod(0o666 & ~umask)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        # torch.save reports a full disk as a RuntimeError of its stream writer
        full = (getattr(exc, "errno", None) == errno.ENOSPC
                or (isinstance(exc, RuntimeError) and _nearly_full(path.parent)))
        if full:
            raise OSError(errno.ENOSPC, f"no space left on the device while writing {path} "
                          f"(the previous {path.name}, if any, is unchanged); free some space "
                          "and run the command again") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _nearly_full(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < 1 << 20
    except OSError:
        return False


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file; a missing or malformed file raises an error naming the path."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one JSON line (metrics logs); flushed so a crash loses at most this line.

    A torn last line left by a crash mid-write is cut off first, so the new record
    starts on a line of its own (a torn line is never glued to a good record).
    """
    path = Path(path)
    with open(path, "ab+") as fh:
        end = fh.seek(0, os.SEEK_END)
        if end:
            fh.seek(max(0, end - 1))
            if fh.read(1) != b"\n":
                fh.seek(0)
                keep = fh.read().rfind(b"\n") + 1
                fh.truncate(keep)
        fh.write((json.dumps(record, sort_keys=False) + "\n").encode())
        fh.flush()


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a JSON-lines file; a torn last line (crash mid-write) is skipped, a
    missing file has none, and one that is not UTF-8 text is a ValueError naming it."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return []
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text (damaged?); restore it or delete it "
                         "(a run then loses its metrics history)") from None
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def drop_records(path: str | os.PathLike[str], phases: tuple[str, ...], from_epoch: int = 0
                 ) -> None:
    """Remove lines of `phases` whose epoch is after `from_epoch` (all of them for 0).

    A phase that starts afresh drops its old lines; one that resumes after epoch
    E drops the lines a crash left beyond E (they are redone). Other phases' lines
    (a run directory's metrics.jsonl is shared by teacher, search and training)
    are kept.
    """
    path = Path(path)
    if not path.exists():
        return
    records = read_jsonl(path)
    kept = [r for r in records if not (
        r.get("phase") in phases and (from_epoch == 0 or int(r.get("epoch", 0)) > from_epoch))]
    if len(kept) != len(records):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
