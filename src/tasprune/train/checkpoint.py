"""Checkpoints: dicts of tensors and plain values, written atomically, loaded safely.

A checkpoint holds what resuming needs (model, optimisers, schedulers, epoch,
RNG states, config). It is written to a temp file and renamed, so a crash
leaves the previous checkpoint intact, and read with `weights_only=True`, so
loading never unpickles code.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tasprune._io import atomic_write


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not what the caller expected."""


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
                    ) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/corrupt files
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
