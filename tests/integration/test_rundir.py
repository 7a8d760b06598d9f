"""Run directories: kinds, locks, and file-system faults (read-only, full disk)."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasprune import Shape, build_model
from tasprune._io import atomic_write, atomic_write_text, read_jsonl
from tasprune.cli import main, os_error_line
from tasprune.config import load_config
from tasprune.data import same_data
from tasprune.data.folder import load_folder, to_rgb8
from tasprune.export import save_pruned
from tasprune.pipeline import PruneConfig, load_prune_config
from tasprune.rundir import check_export_target, check_kind, run_kind, run_lock

SRC = Path(__file__).resolve().parents[2] / "src"


def test_kinds_of_run_directories(tmp_path):
    assert run_kind(tmp_path / "new") is None and run_kind(tmp_path) is None
    (tmp_path / "notes.txt").write_text("mine")
    assert run_kind(tmp_path) is None
    for kind, files in (("train", ["train.pt"]), ("search", ["search.pt", "shape.json"]),
                        ("prune", ["config.yaml", "train.pt", "search.pt"]),
                        ("train", ["model.safetensors", "shape.json"])):
        d = tmp_path / "_".join(files)
        d.mkdir()
        for name in files:
            (d / name).write_text("x")
        assert run_kind(d) == kind
        check_kind(d, kind)
        for other in {"prune", "search", "train"} - {kind}:
            with pytest.raises(ValueError, match=f"holds a `tasprune {kind}` run"):
                check_kind(d, other)


def test_export_replaces_only_its_own_earlier_export(tmp_path):
    (tmp_path / "model.safetensors").write_text("x")
    for name in ("model.safetensors", "train.pt", "shape.json", "metrics.jsonl"):
        with pytest.raises(ValueError, match="would confuse the run|being exported|exists"):
            check_export_target(tmp_path, tmp_path / name, "model.onnx")
    weights = tmp_path / "model.safetensors"
    with pytest.raises(ValueError, match="being exported"):
        check_export_target(weights, weights, "model.onnx")
    check_export_target(tmp_path, tmp_path / "model.onnx", "model.onnx")
    (tmp_path / "model.onnx").write_text("an earlier export")
    check_export_target(tmp_path, tmp_path / "model.onnx", "model.onnx")
    with pytest.raises(ValueError, match="already exists"):  # not this format's file
        check_export_target(tmp_path, tmp_path / "model.onnx", "model.pt2")
    check_export_target(tmp_path, tmp_path / "elsewhere" / "train.pt", "model.onnx")
    (tmp_path / "mine.onnx").write_text("the user's")
    with pytest.raises(ValueError, match="already exists"):
        check_export_target(tmp_path, tmp_path / "mine.onnx", "model.onnx")
    (tmp_path / "link.onnx").symlink_to(weights)
    with pytest.raises(ValueError, match="being exported"):
        check_export_target(tmp_path, tmp_path / "link.onnx", "model.onnx")
    with pytest.raises(ValueError, match="names no file"):
        check_export_target(tmp_path, "", "model.onnx")


_HOLD = """
import sys, time
sys.path.insert(0, {src!r})
from tasprune.rundir import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def _holder(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD.format(src=str(SRC)), str(directory)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_locked_run_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path, capsys):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        with pytest.raises(ValueError, match=rf"{run} is in use by process {holder.pid} "):
            with run_lock(run):
                pass
        # the command line says the same in one line, and writes nothing
        status = main(["train", "--model", "resnet8", "--data", "demo", "--epochs", "1",
                       "--out", str(run)])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1 and f"in use by process {holder.pid}" in err[0]
        assert list(run.iterdir()) == []
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_lock(run):  # kill -9 released it
        (run / "x").write_text("mine")
    assert (run / "x").read_text() == "mine"


def test_a_refused_command_leaves_no_new_directory(tmp_path):
    with pytest.raises(RuntimeError):
        with run_lock(tmp_path / "new"):
            raise RuntimeError("refused")
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_two_prunes_on_one_directory_the_second_is_refused(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "tasprune", "prune", "--model", "resnet8", "--out", str(out),
            "--quiet", "teacher_train.epochs=1", "search.epochs=1", "train.epochs=1",
            "teacher_train.batch_size=256", "search.batch_size=256", "train.batch_size=256",
            "latency.repeats=1", "latency.min_repeats=1", "search.health_images=100"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 120
    while not (out / "config.yaml").is_file() and time.time() < deadline:
        time.sleep(0.2)
    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2
    assert f"is in use by process {first.pid}" in second.stderr
    assert first.wait(timeout=900) == 0, first.stderr[-2000:]
    phases = [r["phase"] for r in read_jsonl(out / "metrics.jsonl")]
    assert phases.count("derive") == 1 and phases.count("search") == 1


def test_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "train.pt"
    path.write_text("the good checkpoint")

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="no space left on the device while writing"):
        atomic_write(path, full)
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("Usage", (), {"free": 100})())

    def torch_full(tmp):  # torch.save's stream writer reports a full disk like this
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter "
                           "failed writing file data/0: file write failed")

    with pytest.raises(OSError, match="free some space"):
        atomic_write(path, torch_full)
    assert path.read_text() == "the good checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.pt"]


def test_read_only_and_permission_errors_are_one_line(tmp_path, monkeypatch, capsys):
    err = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "run" / "model.onnx"))
    assert os_error_line(err) == (f"{tmp_path}/run/model.onnx: the file system is read-only; "
                                  "choose an --out on a writable one")
    # a command without --out (report) says what to do instead
    assert os_error_line(err, has_out=False) == (
        f"{tmp_path}/run/model.onnx: the file system is read-only (this command writes into "
        "the run: copy the run somewhere writable first)")
    run = tmp_path / "run"
    save_pruned(run, build_model(Shape.full("resnet8")))

    def read_only(*args, **kwargs):
        raise err

    monkeypatch.setattr("tasprune.export.atomic_write", read_only)
    assert main(["export", str(run), "--format", "torchscript"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"tasprune export: error: {os_error_line(err)}"]


def test_model_file_reads_like_any_other(tmp_path):
    save_pruned(tmp_path, build_model(Shape.full("resnet8")))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask


# settings -------------------------------------------------------------------------------
def test_sections_keep_their_defaults_and_numbers_may_be_text(tmp_path):
    config = load_prune_config(None, ("teacher_train.seed=0", "train.lr=1e-3",
                                      "train.weight_decay=5E-4", "search.epochs=1e1"))
    assert config.teacher_train.epochs == PruneConfig().teacher_train.epochs
    assert config.train.lr == 0.001 and config.train.weight_decay == 0.0005
    assert config.search.epochs == 10
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {epochs: 3, lr: 1e-3}\n")
    assert load_config(PruneConfig, recipe).train.lr == 0.001


def test_overrides_on_both_sides_of_flags(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", "search.epochs=1", "--out", str(out), "--seed", "0",
                 "train.epochz=1"]) == 2
    assert "unknown config key train.epochz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", "--out", str(out), "--seed", "0", "--bogus"])
    assert not out.exists()


def test_worker_count_is_not_another_dataset():
    assert same_data("folder:/d,workers=2", "folder:/d,workers=8")
    assert same_data("folder:/d,resolution=64,workers=2", "folder:/d,workers=0,resolution=64")
    assert not same_data("folder:/d,resolution=64", "folder:/d,resolution=32")
    assert not same_data("folder:/d", "folder:/e")


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as img:
        rgb = np.asarray(to_rgb8(img))
    assert rgb.shape == (16, 16, 3)
    assert (rgb[..., 0] == (ramp >> 8)).all() and rgb.min() == 0 and rgb.max() == 255
    for split in ("train", "val"):
        for c, level in (("dark", 1000), ("bright", 60000)):
            (tmp_path / "ds" / split / c).mkdir(parents=True)
            Image.fromarray(np.full((8, 8), level, np.uint16)).save(
                tmp_path / "ds" / split / c / "1.png")
    bundle = load_folder(tmp_path / "ds", resolution=8, workers=0)
    images, labels = next(bundle.train.batches(2))
    means = {int(y): float(x.float().mean()) for x, y in zip(images, labels, strict=True)}
    assert means == {1: pytest.approx(1000 >> 8, abs=1), 0: pytest.approx(60000 >> 8, abs=1)}


def test_nan_weights_are_refused(tmp_path):
    from tasprune import load_pruned
    from tasprune.checkpoint import CheckpointError

    model = build_model(Shape.full("resnet8"))
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = float("inf")
    save_pruned(tmp_path, model)
    with pytest.raises(CheckpointError, match="NaN or infinite values \\(first in 'conv1.weight'"):
        load_pruned(tmp_path)


def test_weights_and_shape_json_that_disagree_are_an_error(tmp_path):
    from safetensors.torch import save_file

    from tasprune import load_pruned
    from tasprune.checkpoint import CheckpointError

    save_pruned(tmp_path, build_model(Shape.full("resnet8")))
    Shape.full("resnet20").save(tmp_path / "shape.json")
    with pytest.raises(CheckpointError, match="holds another shape than .*shape.json"):
        load_pruned(tmp_path)
    state = {k: v.contiguous() for k, v in build_model(Shape.full("resnet8")).state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"tasprune.shape": "{bad"})
    with pytest.raises(CheckpointError, match="model.safetensors: the shape in its metadata is "
                                              "damaged"):
        load_pruned(tmp_path / "model.safetensors")


def test_files_that_are_not_utf8_are_named(tmp_path):
    from tasprune.config import ConfigError
    from tasprune.pipeline import _read_saved_config

    bad = "train: {lr: 0.1} # caf\xe9\n".encode("latin-1")
    (tmp_path / "r.yaml").write_bytes(bad)
    with pytest.raises(ConfigError, match="r.yaml: not UTF-8 text"):
        load_config(PruneConfig, tmp_path / "r.yaml")
    (tmp_path / "config.yaml").write_bytes(bad)
    with pytest.raises(ConfigError, match="config.yaml: the run's saved settings are damaged "
                                          "\\(not UTF-8 text\\)"):
        _read_saved_config(tmp_path / "config.yaml")
    for text in ("", "- a\n- b\n"):
        (tmp_path / "config.yaml").write_text(text)
        with pytest.raises(ConfigError, match="expected a mapping of settings"):
            _read_saved_config(tmp_path / "config.yaml")
    (tmp_path / "metrics.jsonl").write_bytes(b'{"phase": "train"}\n\xff\xfe\n')
    with pytest.raises(ValueError, match="metrics.jsonl: not UTF-8 text"):
        read_jsonl(tmp_path / "metrics.jsonl")
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_one_missing_parent_level_is_made_and_removed_on_refusal(tmp_path):
    with pytest.raises(RuntimeError):
        with run_lock(tmp_path / "runs" / "a"):
            raise RuntimeError("refused")
    assert not (tmp_path / "runs").exists()
    with run_lock(tmp_path / "runs" / "a"):
        (tmp_path / "runs" / "a" / "x").write_text("kept")
    assert (tmp_path / "runs" / "a" / "x").is_file()
