"""Checkpoint files: checksum, keep-two rotation, fallback, NaN refusal; torn metrics lines."""

from __future__ import annotations

import pytest
import torch

from tasprune._io import append_jsonl, read_jsonl
from tasprune.checkpoint import (
    CheckpointError,
    NonFiniteError,
    damaged_path,
    load_checkpoint,
    load_latest,
    previous_path,
    save_checkpoint,
)


def _state(value: int) -> dict:
    return {"epoch": value, "w": torch.full((64, 64), float(value)), "nested": {"b": [1, 2]}}


def _flip_byte(path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_round_trip_and_keep_previous(tmp_path):
    path = tmp_path / "train.pt"
    save_checkpoint(path, _state(1), keep_previous=True)
    assert not previous_path(path).exists()
    save_checkpoint(path, _state(2), keep_previous=True)
    save_checkpoint(path, _state(3), keep_previous=True)
    assert previous_path(path).name == "train.prev.pt"
    assert load_checkpoint(path)["epoch"] == 3
    assert load_checkpoint(previous_path(path))["epoch"] == 2
    assert torch.equal(load_checkpoint(path)["w"], torch.full((64, 64), 3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.prev.pt", "train.pt"]


@pytest.mark.parametrize("damage", ["bit-flip", "truncate", "empty"])
def test_damage_is_detected(tmp_path, damage):
    path = tmp_path / "search.pt"
    save_checkpoint(path, _state(1))
    if damage == "bit-flip":  # inside the tensor payload: torch's zip reader misses this
        _flip_byte(path)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="search.pt"):
        load_checkpoint(path)


def test_fallback_keeps_the_good_previous_and_sets_the_damaged_one_aside(tmp_path, capsys):
    path = tmp_path / "train.pt"
    save_checkpoint(path, _state(1), keep_previous=True)
    save_checkpoint(path, _state(2), keep_previous=True)
    _flip_byte(path)
    state, used = load_latest(path)
    assert (state["epoch"], used) == (1, previous_path(path))
    assert "warning" in capsys.readouterr().err
    assert not path.exists() and damaged_path(path).is_file()  # set aside, not deleted
    with pytest.raises(CheckpointError):
        load_checkpoint(damaged_path(path))
    # the next save must not push the damaged file onto the good previous one
    save_checkpoint(path, _state(3), keep_previous=True)
    assert load_checkpoint(previous_path(path))["epoch"] == 1
    assert load_checkpoint(path)["epoch"] == 3
    save_checkpoint(path, _state(4), keep_previous=True)  # back to normal rotation
    assert load_checkpoint(previous_path(path))["epoch"] == 3


def test_both_damaged_is_an_error_naming_both(tmp_path):
    path = tmp_path / "train.pt"
    save_checkpoint(path, _state(1), keep_previous=True)
    save_checkpoint(path, _state(2), keep_previous=True)
    _flip_byte(path)
    _flip_byte(previous_path(path), 0.4)
    with pytest.raises(CheckpointError, match="previous checkpoint is damaged too"):
        load_latest(path)
    assert path.is_file() and previous_path(path).is_file()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_state_is_refused_and_the_old_file_kept(tmp_path, bad):
    path = tmp_path / "train.pt"
    save_checkpoint(path, _state(1), keep_previous=True)
    state = _state(2)
    state["optimizer"] = {"state": {0: {"momentum": torch.tensor([0.0, bad])}}}
    with pytest.raises(NonFiniteError, match="optimizer.state.0.momentum"):
        save_checkpoint(path, state, keep_previous=True)
    assert load_checkpoint(path)["epoch"] == 1
    assert not previous_path(path).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["train.pt"]  # no temp file left


def test_plain_torch_save_files_still_load(tmp_path):
    path = tmp_path / "old.pt"
    torch.save(_state(7), path)  # written before checkpoints carried a checksum
    assert load_checkpoint(path)["epoch"] == 7


def test_append_after_a_torn_line_starts_a_fresh_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"epoch": 1})
    with open(path, "a") as fh:
        fh.write('{"epoch": 2, "loss": 0.')  # a kill during the write
    append_jsonl(path, {"epoch": 2, "loss": 0.5})
    assert read_jsonl(path) == [{"epoch": 1}, {"epoch": 2, "loss": 0.5}]
    assert path.read_text().count("\n") == 2
