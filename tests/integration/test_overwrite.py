"""Issue 26: no command ever modifies a file that was there before it ran.

Every writing command (train, search, prune, baseline, export in every format) is run with
every form of `--out` a user may give by mistake: an existing file, a run of another kind, a
directory of the user's own files (including files named like a run's), the empty path, and
a symlink to such a directory. Whatever each command does (refuse, or write new files
beside the old ones), every file that existed before is byte-identical after, and nothing
raises a traceback.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from helpers import synthetic_bundle
from tasprune import cli
from tasprune.commands import _common
from tasprune.export import save_pruned
from tasprune.models import build_model
from tasprune.models.shape import Shape

SYNTHETIC = synthetic_bundle(n_train=32, n_test=16, classes=3, size=12)
TINY = ["--data", "synthetic", "--epochs", "1", "--batch-size", "8", "--quiet"]
PRUNE_TINY = ["--quiet", "teacher_train.epochs=1", "search.epochs=1", "train.epochs=1",
              "teacher_train.warmup_epochs=0", "train.warmup_epochs=0", "data=demo",
              "model=resnet8", "teacher_train.batch_size=512", "train.batch_size=512",
              "search.batch_size=512"]

COMMANDS = {
    "train": ["train", "--model", "resnet8", *TINY],
    "search": ["search", "--model", "resnet8", "--flops-ratio", "0.6", *TINY],
    "prune": ["prune", *PRUNE_TINY],
    "baseline": ["baseline", "--method", "uniform", "--flops-ratio", "0.6", *PRUNE_TINY],
    "export-onnx": ["export", "{run}", "--format", "onnx"],
    "export-pt2": ["export", "{run}", "--format", "pt2"],
    "export-torchscript": ["export", "{run}", "--format", "torchscript"],
    "export-hf": ["export", "{run}", "--format", "hf"],
}
# what a run directory of each kind holds (enough for `run_kind` to tell them apart)
RUNS = {"a-train-run": ("model.safetensors", "shape.json", "train.pt", "metrics.jsonl"),
        "a-search-run": ("search.pt", "shape.json", "metrics.jsonl"),
        "a-prune-run": ("config.yaml", "run.json", "model.safetensors", "summary.json")}
# a directory of the user's: notes, and files whose names a run or an export writes
USERS = ("README.md", "notes.txt", "config.json", "model.onnx", "model.pt2", "shape.json",
         "logs")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained model to export (a built-in ResNet of the synthetic data)."""
    root = tmp_path_factory.mktemp("source")
    torch.manual_seed(0)
    save_pruned(root / "run", build_model(Shape.full("resnet8", num_classes=3, in_channels=1,
                                                     resolution=12)))
    return root / "run"


@pytest.fixture(autouse=True)
def synthetic_spec(monkeypatch):
    real = _common.get_data
    monkeypatch.setattr(_common, "get_data", lambda spec, quiet=True:
                        SYNTHETIC if spec == "synthetic" else real(spec, quiet))


def _out_forms(root: Path) -> dict[str, str]:
    forms: dict[str, str] = {}
    (root / "a-file.txt").write_text("the user's file\n")
    forms["a-file"] = str(root / "a-file.txt")
    for name, files in RUNS.items():
        (root / name).mkdir()
        for f in files:
            (root / name / f).write_text(f"{name}/{f}\n")
        forms[name] = str(root / name)
    users = root / "users-dir"
    users.mkdir()
    for f in USERS:
        (users / f).write_text(f"the user's {f}\n")
    forms["a-users-directory"] = str(users)
    notes = root / "notes-dir"  # only files no command writes: a run may go there
    notes.mkdir()
    (notes / "notes.txt").write_text("the user's notes\n")
    forms["a-directory-of-notes"] = str(notes)
    forms["a-users-file-in-it"] = str(users / "model.onnx")
    (root / "link").symlink_to(users, target_is_directory=True)
    forms["a-symlink-to-it"] = str(root / "link")
    forms["a-symlinked-file"] = str(root / "link" / "model.pt2")
    forms["empty"] = ""
    return forms


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


FORMS = ("a-file", *RUNS, "a-users-directory", "a-directory-of-notes", "a-users-file-in-it",
         "a-symlink-to-it", "a-symlinked-file", "empty")
# a whole prune runs where it may write: those two are end-to-end runs (slow)
CASES = [pytest.param(command, form, id=f"{command}-{form}",
                      marks=[pytest.mark.slow] if command in ("prune", "baseline")
                      and form == "a-directory-of-notes" else [])
         for command in COMMANDS for form in FORMS]


@pytest.mark.parametrize("command, form", CASES)
def test_no_pre_existing_file_is_modified(source, tmp_path, capsys, monkeypatch, command, form):
    root = tmp_path / "place"
    root.mkdir()
    forms = _out_forms(root)
    run = tmp_path / "run"
    shutil.copytree(source, run)
    monkeypatch.chdir(tmp_path)
    watched = {"place": root, "run": run}
    before = {k: _hashes(v) for k, v in watched.items()}
    argv = [a.format(run=run) for a in COMMANDS[command]] + ["--out", forms[form]]
    try:
        status = cli.main(argv)
    except SystemExit as exc:
        status = exc.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert status in (0, 2), captured.err
    if status == 2:
        assert len(captured.err.strip().splitlines()) == 1, captured.err
    after = {k: _hashes(v) for k, v in watched.items()}
    for name, old in before.items():
        changed = [p for p, digest in old.items() if after[name].get(p) != digest]
        assert not changed, (name, changed, captured.err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["place", "run"]  # nothing in cwd
