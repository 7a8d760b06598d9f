"""Fault tolerance of the search: stop, kill, damaged checkpoints and NaN losses.

Every interrupted run is resumed and compared with an uninterrupted one of the same
seed: final supernet state (arch logits included), shape.json and every metrics
record except its timing fields must be identical (CPU, one process).
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import brightness_bundle, supernet_from
from tasprune import Shape
from tasprune._io import read_jsonl
from tasprune.checkpoint import (
    CheckpointError,
    first_non_finite,
    load_checkpoint,
    previous_path,
    save_checkpoint,
)
from tasprune.cli import main
from tasprune.data.source import DataBundle
from tasprune.export import read_shape
from tasprune.faults import Interrupted, NonFiniteLoss
from tasprune.tas import searcher
from tasprune.tas.searcher import SearchConfig, search
from tasprune.tas.supernet import SuperNet

pytestmark = pytest.mark.usefixtures("one_thread")

TIMING = ("seconds", "images_per_s")
STEPS = 6  # per epoch: 192 images, halves of 96, batch 16


def _data(n: int = 192, **kwargs) -> DataBundle:
    return brightness_bundle(n, **kwargs)


FULL = Shape.full("resnet8", num_classes=4, resolution=8)


def _config(**kw) -> SearchConfig:
    return SearchConfig(**{"flops_ratio": 0.5, "epochs": 2, "batch_size": 16, "device": "cpu",
                           "seed": 0, **kw})


def _strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def assert_same_run(a: Path, b: Path) -> None:
    """Two finished run directories hold the same search."""
    assert _strip(read_jsonl(a / "metrics.jsonl")) == _strip(read_jsonl(b / "metrics.jsonl"))
    assert read_shape(a / "shape.json") == read_shape(b / "shape.json")
    sa, sb = load_checkpoint(a / "search.pt"), load_checkpoint(b / "search.pt")
    assert sa["epoch"] == sb["epoch"] and sa["step"] == sb["step"] == 0
    for key in sa["supernet"]:
        assert torch.equal(sa["supernet"][key], sb["supernet"][key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted search (2 epochs of 6 steps) to compare every resumed one with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reference")
    search(FULL, _data(), _config(), out, quiet=True)
    torch.set_num_threads(threads)
    return out


def _at_call(monkeypatch, n: int, action, after: bool = False) -> None:
    """Run `action()` just before (or after) the n-th search step (1-based, counted over
    the search)."""
    real, calls = searcher.search_step, [0]

    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n and not after:
            action()
        out = real(*args, **kwargs)
        if calls[0] == n and after:
            action()
        return out

    monkeypatch.setattr(searcher, "search_step", step)


def _signal_after(monkeypatch, n: int, sig: int = signal.SIGTERM) -> None:
    """A signal arriving during step n: step n + 1 sees it (and is the last one run)."""
    _at_call(monkeypatch, n, lambda: os.kill(os.getpid(), sig), after=True)


@pytest.mark.parametrize("sig, at", [(signal.SIGTERM, 2), (signal.SIGTERM, 6),
                                     (signal.SIGINT, 8), (signal.SIGTERM, 11)])
def test_a_signal_saves_the_step_and_the_resume_is_bit_identical(tmp_path, monkeypatch,
                                                                 reference, sig, at):
    _signal_after(monkeypatch, at - 1, sig)
    with pytest.raises(Interrupted) as err:
        search(FULL, _data(), _config(), tmp_path, quiet=True)
    assert err.value.exit_status == 128 + sig
    assert err.value.checkpoint == str(tmp_path / "search.pt")
    assert f"epoch {(at - 1) // STEPS + 1}" in str(err.value)
    state = load_checkpoint(tmp_path / "search.pt")  # the step that was running finished
    assert (state["epoch"], state["step"]) == divmod(at, STEPS)
    assert (state["epoch_state"] is None) == (at % STEPS == 0)
    monkeypatch.undo()
    search(FULL, _data(), _config(), tmp_path, resume=True, quiet=True)
    assert_same_run(reference, tmp_path)


def test_a_signal_during_the_last_step_lets_the_search_finish(tmp_path, monkeypatch, reference):
    _signal_after(monkeypatch, 2 * STEPS - 1)
    search(FULL, _data(), _config(), tmp_path, quiet=True)
    assert_same_run(reference, tmp_path)


def test_a_crash_at_a_random_step_resumes_from_the_last_checkpoint(tmp_path, monkeypatch,
                                                                   reference):
    at = random.randint(5, 2 * STEPS)
    print(f"crash before step {at}")

    def crash():
        raise RuntimeError("killed")

    _at_call(monkeypatch, at, crash)
    with pytest.raises(RuntimeError, match="killed"):
        search(FULL, _data(), _config(checkpoint_every=4), tmp_path, quiet=True)
    state = load_checkpoint(tmp_path / "search.pt")
    done = state["epoch"] * STEPS + state["step"]  # the last multiple of 4 or epoch end
    assert done == max(s for s in range(at) if s % 4 == 0 or s % STEPS == 0)
    assert previous_path(tmp_path / "search.pt").is_file() == (done > 4)
    monkeypatch.undo()
    # checkpoint_every may change on resume; other settings may not
    with pytest.raises(ValueError, match="other search settings: seed"):
        search(FULL, _data(), _config(seed=1), tmp_path, resume=True, quiet=True)
    search(FULL, _data(), _config(checkpoint_every=5), tmp_path, resume=True, quiet=True)
    assert_same_run(reference, tmp_path)


def test_a_crash_between_the_metrics_line_and_the_checkpoint(tmp_path, monkeypatch, reference):
    real, calls = searcher.SearchLoop.save, [0]

    def save(self, epoch, run=None):
        calls[0] += 1
        if run is None and epoch == 2:  # epoch 2's line is written, its checkpoint is not
            raise RuntimeError("killed")
        return real(self, epoch, run)

    monkeypatch.setattr(searcher.SearchLoop, "save", save)
    with pytest.raises(RuntimeError, match="killed"):
        search(FULL, _data(), _config(checkpoint_every=3), tmp_path, quiet=True)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    assert load_checkpoint(tmp_path / "search.pt")["epoch"] == 1
    monkeypatch.undo()
    search(FULL, _data(), _config(), tmp_path, resume=True, quiet=True)
    assert_same_run(reference, tmp_path)  # epoch 2's line was redone, not doubled


def _stopped_run(tmp_path: Path, monkeypatch, at: int = 11) -> None:
    """A search interrupted at step `at`, with mid-epoch checkpoints every 3 steps."""
    _signal_after(monkeypatch, at - 1)
    with pytest.raises(Interrupted):
        search(FULL, _data(), _config(checkpoint_every=3), tmp_path, quiet=True)
    monkeypatch.undo()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_a_bit])
def test_a_damaged_checkpoint_falls_back_to_the_previous(tmp_path, monkeypatch, capsys,
                                                         reference, damage):
    _stopped_run(tmp_path, monkeypatch)
    ckpt, prev = tmp_path / "search.pt", tmp_path / "search.prev.pt"
    assert (load_checkpoint(prev)["epoch"], load_checkpoint(prev)["step"]) == (1, 3)
    damage(ckpt)
    with pytest.raises(CheckpointError):
        load_checkpoint(ckpt)
    capsys.readouterr()
    search(FULL, _data(), _config(), tmp_path, resume=True, quiet=True)
    err = capsys.readouterr().err
    assert "warning" in err and str(prev) in err and str(ckpt) in err
    assert_same_run(reference, tmp_path)


def test_both_checkpoints_damaged_is_a_clear_error_and_deletes_nothing(tmp_path, monkeypatch):
    _stopped_run(tmp_path, monkeypatch)
    ckpt, prev = tmp_path / "search.pt", tmp_path / "search.prev.pt"
    _truncate(ckpt)
    _flip_a_bit(prev)
    sizes = (ckpt.stat().st_size, prev.stat().st_size)
    with pytest.raises(CheckpointError, match="damaged too") as err:
        search(FULL, _data(), _config(), tmp_path, resume=True, quiet=True)
    assert "search.pt" in str(err.value) and "search.prev.pt" in str(err.value)
    assert (ckpt.stat().st_size, prev.stat().st_size) == sizes


def test_a_checkpoint_tagged_by_format_still_resumes(tmp_path, monkeypatch, reference):
    _stopped_run(tmp_path, monkeypatch)
    state = load_checkpoint(tmp_path / "search.pt")
    state["format"] = state.pop("kind")  # the tag's key before it was "kind"
    save_checkpoint(tmp_path / "search.pt", state)
    search(FULL, _data(), _config(checkpoint_every=3), tmp_path, resume=True, quiet=True)
    assert_same_run(reference, tmp_path)  # resumed where it stopped, not started afresh


def test_a_checkpoint_of_the_earlier_search_is_refused_with_advice(tmp_path, monkeypatch):
    _stopped_run(tmp_path, monkeypatch)
    state = load_checkpoint(tmp_path / "search.pt")
    del state["kind"]
    state["format"] = "tasprune.search"  # as written before the default search changed
    save_checkpoint(tmp_path / "search.pt", state)
    before = (tmp_path / "search.pt").read_bytes()
    with pytest.raises(ValueError, match="earlier tasprune whose search differs.*start a new"):
        search(FULL, _data(), _config(), tmp_path, resume=True, quiet=True)
    assert (tmp_path / "search.pt").read_bytes() == before


def test_a_mid_epoch_checkpoint_needs_the_same_number_of_processes(tmp_path, monkeypatch):
    _stopped_run(tmp_path, monkeypatch)
    state = load_checkpoint(tmp_path / "search.pt")
    state["epoch_state"]["world_size"] = 2
    save_checkpoint(tmp_path / "search.pt", state)
    with pytest.raises(ValueError, match="on 2 processes; resume it on 2"):
        search(FULL, _data(), _config(), tmp_path, resume=True, quiet=True)


def test_a_diverging_search_stops_with_non_finite_loss(tmp_path):
    with pytest.raises(NonFiniteLoss) as err:
        search(FULL, _data(), _config(lr=1e6, checkpoint_every=1), tmp_path, quiet=True)
    e = err.value
    assert e.phase == "search" and e.epoch >= 1 and 1 <= e.step <= STEPS
    assert not np.isfinite(e.value)
    assert f"search: the loss became {e.value} at epoch {e.epoch} step {e.step}" in str(e)
    state = load_checkpoint(tmp_path / "search.pt")  # the last good step's, finite
    assert first_non_finite(state) is None
    assert (state["epoch"], state["step"]) == divmod((e.epoch - 1) * STEPS + e.step - 1, STEPS)


def _nan_on_forward(monkeypatch, n: int) -> None:
    """Make the n-th supernet forward return NaN logits."""
    real, calls = SuperNet.forward, [0]

    def forward(self, x, arch=None):
        calls[0] += 1
        out = real(self, x, arch)
        return out * float("nan") if calls[0] == n else out

    monkeypatch.setattr(SuperNet, "forward", forward)


@pytest.mark.parametrize("which", ["weight", "arch"])
def test_the_guard_runs_before_each_optimiser_step(monkeypatch, which):
    torch.manual_seed(0)
    net = supernet_from(FULL)
    cfg = _config()
    w_opt = torch.optim.SGD(net.weight_parameters(), lr=0.1)
    a_opt = torch.optim.Adam(net.arch_parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 4
    weights = [p.detach().clone() for p in net.weight_parameters()]
    logits = [p.detach().clone() for p in net.arch_parameters()]
    _nan_on_forward(monkeypatch, 1 if which == "weight" else 2)
    with pytest.raises(NonFiniteLoss, match="epoch 2 step 5"):
        searcher.search_step(net, (x, y), (x, y), w_opt, a_opt, cfg, 1.0, None, 10**6,
                             at=(2, 5))
    same_weights = all(torch.equal(a, b) for a, b in zip(weights, net.weight_parameters()))
    assert same_weights == (which == "weight")  # the weight step ran before an arch NaN
    assert all(torch.equal(a, b) for a, b in zip(logits, net.arch_parameters()))




def _cli_args(data: str, out: Path, *extra: str) -> list[str]:
    return ["search", "--model", "resnet8", "--data", data, "--flops-ratio", "0.5",
            "--epochs", "3", "--batch-size", "16", "--out", str(out), "--quiet",
            "--device", "cpu", *extra]


def test_cli_non_finite_loss_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys,
                                                    demo_subset):
    _nan_on_forward(monkeypatch, 6)  # in the weight-only warm-up: the forward of step 6
    assert main(_cli_args(demo_subset, tmp_path, "--checkpoint-every", "1")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tasprune search: error: search: the loss became nan at epoch 1 step 6; "
                   "stopped without writing a checkpoint, so the last good one is kept. Lower "
                   "the learning rate (or check the data for bad values) and resume"]
    state = load_checkpoint(tmp_path / "search.pt")
    assert (state["epoch"], state["step"]) == (0, 5) and first_non_finite(state) is None


def test_cli_both_checkpoints_damaged_is_one_line(tmp_path, capsys, demo_subset):
    for name in ("search.pt", "search.prev.pt"):
        (tmp_path / name).write_bytes(b"not a checkpoint")
    assert main(_cli_args(demo_subset, tmp_path, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "search.prev.pt" in err[0] and "damaged too" in err[0]
    assert (tmp_path / "search.pt").read_bytes() == b"not a checkpoint"


# the command line in a subprocess: SIGKILL and SIGTERM --------------------------------------
def _env() -> dict[str, str]:
    # one thread: the numbers depend on the thread count, and the machine is shared
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(Path(searcher.__file__).parents[2]),
                                           os.environ.get("PYTHONPATH", "")])}


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tasprune", *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory, demo_subset) -> Path:
    out = tmp_path_factory.mktemp("cli-reference")
    proc = _start(_cli_args(demo_subset, out))
    assert proc.wait(timeout=300) == 0, proc.communicate()
    return out


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume(tmp_path, demo_subset, cli_reference):
    proc = _start(_cli_args(demo_subset, tmp_path, "--checkpoint-every", "3"))
    _wait_for(tmp_path / "search.pt", proc)
    delay = random.uniform(0.0, 3.0)
    print(f"SIGKILL {delay:.3f} s after the first checkpoint")
    time.sleep(delay)
    proc.kill()
    proc.wait(timeout=60)
    state = load_checkpoint(tmp_path / "search.pt")
    print(f"killed with rc {proc.returncode}; resuming from epoch {state['epoch']} step "
          f"{state['step']}")
    resumed = _start(_cli_args(demo_subset, tmp_path, "--resume", "--checkpoint-every", "2"))
    assert resumed.wait(timeout=300) == 0, resumed.communicate()
    assert_same_run(cli_reference, tmp_path)


@pytest.mark.slow
def test_sigterm_saves_exits_143_and_resumes(tmp_path, demo_subset, cli_reference):
    proc = _start(_cli_args(demo_subset, tmp_path, "--checkpoint-every", "4"))
    _wait_for(tmp_path / "search.pt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tasprune search: search: stopped by SIGTERM at ")
    assert f"checkpoint saved to {tmp_path / 'search.pt'}" in lines[0]
    state = load_checkpoint(tmp_path / "search.pt")
    assert state["step"] > 0 or state["epoch"] > 0
    resumed = _start(_cli_args(demo_subset, tmp_path, "--resume"))
    assert resumed.wait(timeout=300) == 0, resumed.communicate()
    assert_same_run(cli_reference, tmp_path)
