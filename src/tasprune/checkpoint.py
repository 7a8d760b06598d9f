"""Checkpoints: dicts of tensors and plain values, written atomically, loaded safely.

A checkpoint holds what resuming needs (model, optimisers, schedulers, epoch,
RNG states, config). Guarantees:

- written to a temp file and renamed, so a crash leaves the previous checkpoint intact;
- read with `weights_only=True`, so loading never unpickles code;
- the serialised state is wrapped with its SHA-256, so a truncated or bit-flipped
  file is detected at load (torch's zip reader does not check tensor payloads);
- `save_checkpoint(..., keep_previous=True)` keeps the checkpoint it replaces as
  `NAME.prev.pt`, and `load_latest` falls back to it when the newest is damaged
  (the damaged file is then moved to `NAME.damaged.pt`);
- a state holding a NaN or infinite float tensor is refused (`NonFiniteError`), so
  a diverged run never overwrites its last good checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import random
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from tasprune._io import atomic_write

_WRAPPER = "tasprune.checkpoint/v2"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not what the caller expected."""


class NonFiniteError(ValueError):
    """A state that holds NaN or infinite values, refused before it is written."""


def previous_path(path: str | os.PathLike[str]) -> Path:
    """Where `save_checkpoint(path, keep_previous=True)` keeps the checkpoint it replaces."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def damaged_path(path: str | os.PathLike[str]) -> Path:
    """Where `load_latest` moves a damaged checkpoint (kept, not deleted), so the next save
    does not push it onto the good previous one."""
    path = Path(path)
    return path.with_name(f"{path.stem}.damaged{path.suffix}")


def first_non_finite(state: Any, prefix: str = "") -> str | None:
    """The key path of the first floating-point tensor with a NaN or inf in `state`, or None."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and not bool(torch.isfinite(state).all()):
            return prefix or "<tensor>"
        return None
    items = (state.items() if isinstance(state, Mapping)
             else enumerate(state) if isinstance(state, (list, tuple)) else ())
    for key, value in items:
        found = first_non_finite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any],
                    keep_previous: bool = False) -> None:
    """Write `state` atomically with its checksum; with `keep_previous`, the checkpoint
    being replaced is kept as `previous_path(path)` (the last two survive)."""
    path = Path(path)
    bad = first_non_finite(state)
    if bad is not None:
        raise NonFiniteError(f"refusing to write {path}: {bad} holds NaN or infinite values "
                             "(the previous checkpoint is kept)")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    wrapped = {"format": _WRAPPER, "sha256": hashlib.sha256(payload).hexdigest(),
               "payload": torch.frombuffer(payload, dtype=torch.uint8)}

    def write(tmp: Path) -> None:
        torch.save(wrapped, tmp)
        if keep_previous and path.is_file():
            os.replace(path, previous_path(path))  # a crash here leaves .prev + the temp

    atomic_write(path, write)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
                    ) -> dict[str, Any]:
    """Read a checkpoint, verifying its checksum; any damage is a `CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    state = _torch_load(path, path, map_location)
    if state.get("format") == _WRAPPER:
        payload = state.get("payload")
        if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8:
            raise CheckpointError(f"{path}: damaged checkpoint (no payload)")
        data = payload.numpy().tobytes()
        if hashlib.sha256(data).hexdigest() != state.get("sha256"):
            raise CheckpointError(f"{path}: checksum mismatch: the file is corrupt (a "
                                  "partial copy or a disk error?)")
        state = _torch_load(io.BytesIO(data), path, map_location)
    return state  # older checkpoints (before the wrapper) are plain dicts


def load_latest(path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
                ) -> tuple[dict[str, Any], Path]:
    """Load `path`, or its kept previous checkpoint when `path` is damaged or missing.

    Falling back prints a warning naming both files and moves the damaged file to
    `damaged_path(path)` (kept, not deleted), so the next save cannot rotate it onto
    the good previous checkpoint. Raises `CheckpointError` when neither is readable.
    """
    path, prev = Path(path), previous_path(path)
    try:
        return load_checkpoint(path, map_location), path
    except CheckpointError as exc:
        if not prev.is_file():
            raise
        try:
            state = load_checkpoint(prev, map_location)
        except CheckpointError as exc_prev:
            raise CheckpointError(f"{exc}; the previous checkpoint is damaged too: "
                                  f"{exc_prev}") from None
        with contextlib.suppress(OSError):  # another rank may have moved it already
            os.replace(path, damaged_path(path))
        print(f"warning: {exc}; resuming from the previous checkpoint {prev} instead (the "
              f"damaged file is kept as {damaged_path(path).name})", file=sys.stderr)
        return state, prev


def _holds_objects(exc: BaseException) -> bool:
    """Whether torch.load(weights_only=True) refused the file for the objects it holds (its
    own message is several lines of advice to unpickle it, which tasprune never does)."""
    return isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in str(exc)


def _torch_load(source: Path | io.BytesIO, path: Path, map_location: str | torch.device
                ) -> dict[str, Any]:
    try:
        state = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/corrupt files
        if _holds_objects(exc):
            raise CheckpointError(f"{path}: holds Python objects besides tensors, which "
                                  "tasprune never unpickles: not a tasprune checkpoint"
                                  ) from None
        raise CheckpointError(
            f"{path}: not a readable tasprune checkpoint (truncated or corrupt?): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a tasprune checkpoint (expected a dict)")
    return state


def load_state_checked(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`, failing on the first missing, extra or mis-shaped tensor.

    The error names the layer and says the likely cause, instead of torch's list
    of every mismatch.
    """
    expected = model.state_dict()
    hint = ("; the weights were probably saved from a different model or shape "
            "(check the shape.json that goes with them)")
    for name, tensor in expected.items():
        if name not in state:
            raise CheckpointError(f"{source}: no weights for layer {name!r}{hint}")
        got = state[name]
        if tuple(got.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: layer {name!r} has shape {list(got.shape)} in the checkpoint but "
                f"{list(tensor.shape)} in the model{hint}"
            )
    extra = [k for k in state if k not in expected]
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor {extra[0]!r} "
                              f"({len(extra)} in all){hint}")
    model.load_state_dict(dict(state), strict=True)


# the metadata key of a tasprune .safetensors file: one JSON object, the shape of the
# network with the digest of the tensors (DIGEST_FIELD). One key only: safetensors writes
# its metadata in hash order, so two keys would make equal models differ byte by byte.
SHAPE_META_KEY = "tasprune.shape"
DIGEST_FIELD = "weights_sha256"


def tensor_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict: every tensor's name, dtype, shape and bytes, in name order
    (so two tensors trading places change it)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_safetensors(path: str | os.PathLike[str], what: str = ""
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a .safetensors file; a file tasprune wrote carries the
    digest of its tensors (`DIGEST_FIELD` of its `SHAPE_META_KEY`), and one that no longer
    matches it is refused."""
    label = f"{what}{path}"
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{label}: not a readable safetensors file (truncated or "
                              f"corrupt?): {_first_line(exc)}") from None
    expected = _stamped_digest(meta)
    if expected is not None and tensor_digest(state) != expected:
        raise CheckpointError(f"{label}: the weights no longer match the digest written with "
                              "them (the file was damaged or edited); copy it again from its "
                              "run, or retrain")
    return state, meta


def _stamped_digest(meta: Mapping[str, str]) -> str | None:
    try:
        data = json.loads(meta[SHAPE_META_KEY])
    except (KeyError, ValueError):
        return None  # no tasprune metadata (or damaged, which the shape reader says)
    digest = data.get(DIGEST_FIELD) if isinstance(data, dict) else None
    return digest if isinstance(digest, str) else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a state dict file (.safetensors, or .pt/.pth read with weights_only=True; a
    dict holding it under "state_dict" too) into `model`, strictly (every key, every
    shape)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            state: Any = read_safetensors(path, "--weights ")[0]
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader error, one line
        if _holds_objects(err):
            raise ValueError(f"--weights {path}: holds Python objects besides tensors, which "
                             "tasprune never unpickles; save a plain state dict "
                             "(torch.save(model.state_dict(), path)) or a .safetensors file"
                             ) from None
        raise ValueError(f"--weights {path}: cannot be read as a state dict "
                         f"({_first_line(err)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"--weights {path}: holds a {type(state).__name__}, not a state dict")
    bad = first_non_finite(state)
    if bad is not None:
        raise ValueError(f"--weights {path}: {bad} holds NaN or infinite values (the training "
                         "that wrote them diverged); give weights of a finished training")
    load_state_checked(model, state, f"--weights {path}")
    return model


def rng_state() -> dict[str, Any]:
    """The global RNG states of torch, numpy and random, in weights_only-loadable form."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(),
        "python": _python_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"]["keys"].numpy().astype(np.uint32),
                         int(state["numpy"]["pos"]), 0, 0.0))
    version, internal, gauss = state["python"]["version"], state["python"]["state"], None
    random.setstate((int(version), tuple(int(v) for v in internal.tolist()), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state() -> dict[str, Any]:
    _, keys, pos, _, _ = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)}


def _python_state() -> dict[str, Any]:
    version, internal, _ = random.getstate()
    return {"version": version, "state": torch.tensor(internal, dtype=torch.int64)}
