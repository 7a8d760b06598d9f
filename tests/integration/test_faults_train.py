"""Fault tolerance of training: stops, kills, damaged checkpoints and diverging losses.

The fast tests run `train()` in-process on synthetic data; a SIGTERM/SIGINT is sent
to the test process itself from inside the training step (the trainer's StopRequest
catches it). The slow ones kill a real `python -m tasprune train` on the demo data.
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import synthetic_bundle
from tasprune import Shape, load_pruned
from tasprune._io import read_jsonl
from tasprune.checkpoint import CheckpointError, load_checkpoint, previous_path
from tasprune.cli import main
from tasprune.commands import _common
from tasprune.faults import Interrupted, NonFiniteLoss
from tasprune.training import loop as loop_module
from tasprune.training.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

_TIMING = {"images_per_s", "time_s", "seconds"}
# 64 images in batches of 16: 4 steps per epoch, 12 in the run
_STEPS_PER_EPOCH, _EPOCHS = 4, 3


def _data():
    return synthetic_bundle(n_train=64, n_test=16)


def _shape(data):
    return Shape.full("resnet8", num_classes=data.num_classes, in_channels=data.in_channels,
                      resolution=data.resolution)


def _config(**kw):
    return TrainConfig(**{"epochs": _EPOCHS, "batch_size": 16, "seed": 7, "quiet": True, **kw})


def _stable(path):
    return [{k: v for k, v in r.items() if k not in _TIMING} for r in read_jsonl(path)]


def _assert_same_run(a, b):
    """Two run directories hold the same final weights and the same metrics."""
    wa, wb = load_pruned(a).state_dict(), load_pruned(b).state_dict()
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _stable(a / "metrics.jsonl") == _stable(b / "metrics.jsonl")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (module-wide: several tests compare against it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reference")
    data = _data()
    train(_shape(data), data, _config(), out)
    torch.set_num_threads(threads)
    return out


def _signal_at_step(monkeypatch, step, signum=signal.SIGTERM):
    """Send `signum` to this process during training step `step` (1-based, over the run)."""
    real = loop_module.distill_loss
    calls = {"n": 0}

    def loss_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_module, "distill_loss", loss_then_signal)


@pytest.mark.parametrize("stop_step, signum", [
    (2, signal.SIGTERM),   # in the middle of epoch 1
    (4, signal.SIGINT),    # the last step of epoch 1
    (7, signal.SIGTERM),   # in the middle of epoch 2, after a checkpoint_every one
])
def test_a_stop_request_checkpoints_and_the_resume_equals_an_uninterrupted_run(
        tmp_path, monkeypatch, reference, stop_step, signum):
    data = _data()
    _signal_at_step(monkeypatch, stop_step, signum)
    with pytest.raises(Interrupted) as stopped:
        train(_shape(data), data, _config(checkpoint_every=3), tmp_path)
    monkeypatch.undo()
    assert stopped.value.exit_status == 128 + signum
    message = str(stopped.value)
    assert str(tmp_path / "train.pt") in message and signal.Signals(signum).name in message
    epoch, step = divmod(stop_step, _STEPS_PER_EPOCH)
    if step == 0:  # the stop came at an epoch's last step: a checkpoint with every step done
        epoch, step = epoch - 1, _STEPS_PER_EPOCH
    assert f"epoch {epoch + 1} step {step}/{_STEPS_PER_EPOCH}" in message
    state = load_checkpoint(tmp_path / "train.pt")
    assert (state["epoch"], state["step"]) == (epoch, step)
    assert state["progress"]["count"] == 16 * step and len(state["progress"]["generators"]) == 1
    assert not (tmp_path / "model.safetensors").exists()

    train(_shape(data), data, _config(), tmp_path, resume=True)  # checkpoint_every may change
    _assert_same_run(reference, tmp_path)


def test_checkpoint_every_writes_mid_epoch_checkpoints_and_keeps_the_previous(tmp_path):
    data = _data()
    saved = []
    real = loop_module.EpochProgress.to_state

    def record(self):
        saved.append(self.step)
        return real(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop_module.EpochProgress, "to_state", record)
        train(_shape(data), data, _config(epochs=2, checkpoint_every=3), tmp_path)
    # run steps 3 and 6 are mid-epoch (epoch steps 3 and 2); 4 and 8 end epochs
    assert saved == [3, 2]
    assert load_checkpoint(tmp_path / "train.pt")["step"] == 0
    previous = load_checkpoint(previous_path(tmp_path / "train.pt"))
    assert (previous["epoch"], previous["step"]) == (1, 2)


def _damage(path, how):
    raw = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    else:  # one bit flipped in the middle of the payload
        raw[len(raw) // 2] ^= 0x10
        path.write_bytes(raw)


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, monkeypatch, capsys,
                                                             reference, how):
    data = _data()
    _signal_at_step(monkeypatch, 6)
    with pytest.raises(Interrupted):
        train(_shape(data), data, _config(checkpoint_every=2), tmp_path)
    monkeypatch.undo()
    ckpt = tmp_path / "train.pt"
    assert load_checkpoint(previous_path(ckpt))["epoch"] == 1  # the epoch-1 checkpoint
    _damage(ckpt, how)
    capsys.readouterr()

    train(_shape(data), data, _config(), tmp_path, resume=True)
    err = capsys.readouterr().err
    assert "warning" in err and "train.prev.pt" in err
    _assert_same_run(reference, tmp_path)


def test_both_checkpoints_damaged_is_a_clear_error_and_deletes_nothing(tmp_path, monkeypatch):
    data = _data()
    _signal_at_step(monkeypatch, 6)
    with pytest.raises(Interrupted):
        train(_shape(data), data, _config(checkpoint_every=2), tmp_path)
    monkeypatch.undo()
    ckpt, prev = tmp_path / "train.pt", previous_path(tmp_path / "train.pt")
    _damage(ckpt, "truncated")
    _damage(prev, "bit-flipped")
    before = {p.name: p.read_bytes() for p in (ckpt, prev)}
    with pytest.raises(CheckpointError, match="train.pt.*the previous checkpoint is damaged too"):
        train(_shape(data), data, _config(), tmp_path, resume=True)
    assert {p.name: p.read_bytes() for p in (ckpt, prev)} == before


def test_a_diverging_loss_stops_before_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    data = _data()
    with pytest.raises(NonFiniteLoss) as diverged:
        train(_shape(data), data, _config(lr=1e6, checkpoint_every=2), tmp_path)
    err = diverged.value
    assert err.phase == "train" and err.epoch == 1 and err.step == 3
    assert not torch.isfinite(torch.tensor(err.value))
    assert "train: the loss became" in str(err) and "epoch 1 step 3" in str(err)
    state = load_checkpoint(tmp_path / "train.pt")  # written after step 2, before the bad one
    assert (state["epoch"], state["step"]) == (0, 2)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "metrics.jsonl").exists() or _stable(tmp_path / "metrics.jsonl") == []


def test_the_cli_reports_a_diverging_loss_on_one_line(tmp_path, monkeypatch, capsys):
    data = _data()
    monkeypatch.setattr(_common, "get_data", lambda spec, quiet=True: data)
    code = main(["train", "--model", "resnet8", "--data", "synthetic", "--epochs", "2",
                 "--batch-size", "16", "--lr", "1e6", "--out", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "tasprune train: error: train: the loss became" in err and "epoch 1 step" in err


def test_checkpoint_every_is_validated_and_may_change_on_resume(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every must be >= 0"):
        _config(checkpoint_every=-1)
    data = synthetic_bundle(n_train=32, n_test=16)
    train(_shape(data), data, _config(epochs=1, checkpoint_every=1), tmp_path)
    again = train(_shape(data), data, _config(epochs=1, checkpoint_every=0), tmp_path,
                  resume=True)
    assert again.metrics["epoch"] == 1


# --- real processes on the bundled demo data -----------------------------------------------

def _tiny_shape(path):
    """ResNet-8 at a quarter of its widths for the demo data (10 classes, 1x28x28)."""
    full = Shape.full("resnet8", num_classes=10, in_channels=1, resolution=28)
    full.replace(widths=tuple(max(1, w // 4) for w in full.widths)).save(path)
    return path


def _command(shape, out, *extra):
    return [sys.executable, "-m", "tasprune", "train", "--shape", str(shape), "--data", "demo",
            "--epochs", "2", "--batch-size", "128", "--seed", "3", "--device", "cpu",
            "--out", str(out), "--quiet", *extra]


def _env():
    # one intra-op thread: reproducible speed on a busy machine; PYTHONPATH is inherited
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(args, **kw):
    return subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def demo_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    shape = _tiny_shape(root / "tiny.json")
    done = _run(_command(shape, root / "reference"))
    assert done.returncode == 0, done.stderr
    return shape, root / "reference"


def _start_and_wait_for_checkpoint(args):
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    ckpt = args[args.index("--out") + 1] + "/train.pt"
    deadline = time.monotonic() + 240
    while not os.path.exists(ckpt):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.05)
    return proc


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_equals_an_uninterrupted_run(
        tmp_path, demo_reference):
    shape, reference = demo_reference
    args = _command(shape, tmp_path / "run", "--checkpoint-every", "5")
    proc = _start_and_wait_for_checkpoint(args)
    delay = random.Random(os.getpid()).uniform(0.0, 2.0)
    print(f"SIGKILL {delay:.2f}s after the first checkpoint")
    time.sleep(delay)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished before the signal
    assert not (tmp_path / "run/model.safetensors").exists()

    done = _run([*args, "--resume"])
    assert done.returncode == 0, done.stderr
    _assert_same_run(reference, tmp_path / "run")


@pytest.mark.slow
def test_sigterm_exits_143_with_one_line_and_the_resume_equals_an_uninterrupted_run(
        tmp_path, demo_reference):
    shape, reference = demo_reference
    args = _command(shape, tmp_path / "run", "--checkpoint-every", "20")
    proc = _start_and_wait_for_checkpoint(args)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert "stopped by SIGTERM" in lines[0] and str(tmp_path / "run/train.pt") in lines[0]
    state = load_checkpoint(tmp_path / "run/train.pt")
    assert state["epoch"] * 46 + state["step"] > 20  # 46 steps per epoch; past the first one

    done = _run([*args, "--resume"])
    assert done.returncode == 0, done.stderr
    _assert_same_run(reference, tmp_path / "run")
