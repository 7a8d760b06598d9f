"""Issue 7: a table of bad inputs and the one-line error the user sees for each.

Every row runs `tasprune.cli.main([...])` in-process and asserts: exit status 2,
stderr a single `tasprune CMD: error: ...` line holding the key facts (the bad
value, the valid ones, the path, the reachable range), no traceback, and, where
an output directory is involved, that a pre-existing directory (a sentinel file,
and the files of an existing run where relevant) is left byte-identical. The
same table, for users, is docs/errors.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import synthetic_bundle
from tasprune import cli
from tasprune.commands import _common
from tasprune.data.idx import write_idx
from tasprune.export import load_shape, save_pruned
from tasprune.models import build_model
from tasprune.models.shape import PAPER_SHAPES_DIR, Shape
from tasprune.models.zoo import concat_net, resnet18
from tasprune.training.trainer import TrainConfig, train

SRC = Path(__file__).resolve().parents[2] / "src"
SENTINEL = "sentinel.txt"
SEEN: dict[str, str] = {}  # case id -> its stderr, for the check of docs/errors.md
ERRORS_MD = Path(__file__).resolve().parents[2] / "docs" / "errors.md"
# the bundled demo data: 10 classes of 1x28x28 images
DEMO = {"num_classes": 10, "in_channels": 1, "resolution": 28}
SYNTHETIC = synthetic_bundle(n_train=48, n_test=24, classes=3, size=12)


def _run_dir(path: Path, shape: Shape) -> str:
    torch.manual_seed(0)
    save_pruned(path, build_model(shape))
    return str(path)


def _json(path: Path, data: object) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def _images(directory: Path, n: int = 3) -> None:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            directory / f"{i}.png")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every bad (and good) input file of the table, made once (on one thread: tiny nets)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _make_files(tmp_path_factory.mktemp("bad_input"))
    torch.set_num_threads(threads)


def _make_files(root: Path) -> dict[str, str]:
    f: dict[str, str] = {}
    demo20 = Shape.full("resnet20", **DEMO)
    f["run20"] = _run_dir(root / "run20", demo20)
    f["run32"] = _run_dir(root / "run32", Shape.full("resnet32", **DEMO))
    f["run18"] = _run_dir(root / "run18", Shape.full("resnet18", **DEMO))
    f["run8c3"] = _run_dir(root / "run8c3", Shape.full("resnet8", num_classes=3,
                                                        in_channels=1, resolution=28))
    f["run8rgb2"] = _run_dir(root / "run8rgb2", Shape.full("resnet8", num_classes=2,
                                                            resolution=16))
    # weights of a resnet8 (no shape in their metadata) beside the shape.json of a resnet20
    mismatch = root / "mismatch"
    mismatch.mkdir()
    state = build_model(Shape.full("resnet8", **DEMO)).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(mismatch / "model.safetensors"))
    demo20.save(mismatch / "shape.json")
    f["mismatch"] = str(mismatch)
    # a resumable training run (train.pt) of a resnet8 on the synthetic data
    f["tr8"] = str(root / "tr8")
    train(Shape.full("resnet8", num_classes=3, in_channels=1, resolution=12), SYNTHETIC,
          TrainConfig(epochs=1, batch_size=16, quiet=True), f["tr8"])

    full = Shape.full("resnet20").to_dict()
    widths = full["widths"]
    for name, change in {
        "widths_len": {"widths": widths[:-1]}, "blocks_len": {"blocks": [3, 3]},
        "width0": {"widths": [0, *widths[1:]]}, "width_neg": {"widths": [-4, *widths[1:]]},
        "width_wide": {"widths": [999, *widths[1:]]},
        "width_float": {"widths": [7.5, *widths[1:]]},
        "width_str": {"widths": ["x", *widths[1:]]},
    }.items():
        f[name] = _json(root / f"{name}.json", {**full, **change})
    # the layer plan's format (what searches write), of a zoo network
    plan = load_shape("concat_net").to_dict()
    first = next(iter(plan["groups"]))
    for name, change in {
        "plan_wide": {"groups": {**plan["groups"], first: 999}},
        "plan_float": {"groups": {**plan["groups"], first: 7.5}},
        "plan_other": {"groups": {"conv1": 8}},
    }.items():
        f[name] = _json(root / f"{name}.json", {**plan, **change})
    f["not_json"] = _json(root / "not_json.json", "widths: [16, 16")
    f["empty_json"] = _json(root / "empty.json", "")
    tas = json.loads((PAPER_SHAPES_DIR / "C010-ResNet20.config").read_text())
    tas["xchannels"][1] = tas["xchannels"][1][:-2]
    f["tas_short"] = _json(root / "short.config", tas)
    tas = json.loads((PAPER_SHAPES_DIR / "C010-ResNet20.config").read_text())
    tas["depth"][1] = "21"
    f["tas_depth21"] = _json(root / "depth21.config", tas)

    # datasets
    (root / "empty").mkdir()
    f["empty"] = str(root / "empty")
    garbage = root / "garbage" / "cifar-10-batches-py"
    garbage.mkdir(parents=True)
    for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"):
        (garbage / name).write_bytes(b"not a pickle")
    f["garbage"] = str(root / "garbage")
    fm = root / "fmnist"
    fm.mkdir()
    images, labels = np.zeros((6, 28, 28), np.uint8), np.zeros(6, np.uint8)
    for stem, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels),
                        ("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)):
        write_idx(fm / stem, array)
    truncated = fm / "train-images-idx3-ubyte"
    truncated.write_bytes(truncated.read_bytes()[:100])
    f["fmnist_truncated"] = str(fm)
    fm2 = root / "fmnist_swapped"
    shutil.copytree(fm, fm2)
    write_idx(fm2 / "train-images-idx3-ubyte", images)
    write_idx(fm2 / "train-labels-idx1-ubyte", images)  # images where labels belong
    f["fmnist_swapped"] = str(fm2)
    (root / "no_classes" / "train").mkdir(parents=True)
    (root / "no_classes" / "val").mkdir()
    f["no_classes"] = str(root / "no_classes")
    for name, broken in (("bad_train", "train/a/1.png"), ("bad_val", "val/b/2.png")):
        for split in ("train", "val"):
            for cls in ("a", "b"):
                _images(root / name / split / cls)
        (root / name / broken).write_bytes(b"\x89PNG garbage, not an image")
        f[name] = str(root / name)

    # run directories of each kind, damaged ones, and folders no classifier can learn from
    srch = root / "srch"
    srch.mkdir()
    (srch / "search.pt").write_bytes(b"a search checkpoint")
    demo20.save(srch / "shape.json")
    f["srch"] = str(srch)
    for name, text, sha in (("edited", "model: resnet20\n", "0" * 64),
                            ("damaged", "model: [resnet20\n", None)):
        (root / name).mkdir()
        (root / name / "config.yaml").write_text(text)
        if sha:
            (root / name / "run.json").write_text(json.dumps({"config_sha256": sha}))
        f[name] = str(root / name)
    for split in ("train", "val"):
        _images(root / "one_class" / split / "only")
    f["one_class"] = str(root / "one_class")
    nan = build_model(Shape.full("resnet8", **DEMO))
    with torch.no_grad():
        nan.fc.weight[0, 0] = float("nan")
    save_pruned(root / "nan", nan)
    f["nan"] = str(root / "nan")

    # a model whose weights were damaged after they were written (their digest disagrees)
    damaged = Path(shutil.copytree(f["run20"], root / "run20_damaged"))
    raw = bytearray((damaged / "model.safetensors").read_bytes())
    raw[-64:] = b"\x7f" * 64  # the last tensor's bytes
    (damaged / "model.safetensors").write_bytes(bytes(raw))
    f["damagedweights"] = str(damaged)
    # a run directory where `logs` is a file, so the csv tracker cannot write logs/
    logs = root / "logs_file"
    logs.mkdir()
    (logs / "logs").write_text("not a directory\n")
    f["logs_file"] = str(logs)
    # a directory of the user's own files (an hf export must not touch them)
    proj = root / "proj"
    proj.mkdir()
    (proj / "README.md").write_text("mine\n")
    f["proj"] = str(proj)
    users = root / "users_files"
    users.mkdir()
    (users / "shape.json").write_text("{}\n")
    f["users_files"] = str(users)

    # recipes
    f["recipe_empty"] = _json(root / "empty.yaml", "# nothing yet\n")
    f["recipe_duplicate"] = _json(root / "duplicate.yaml", "model: resnet20\nmodel: resnet8\n")
    f["recipe_unknown_key"] = _json(root / "unknown_key.yaml",
                                    "model: resnet20\nsearch:\n  epochz: 3\n")
    f["recipe_malformed"] = _json(root / "malformed.yaml", "model: [resnet20\nsearch: {\n")
    f["afile"] = _json(root / "afile.txt", "not a directory\n")

    # networks of your own
    user = root / "user_models.py"
    user.write_text(
        "from torch import nn\n\n\n"
        "class Dynamic(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(1, 4, 3)\n\n"
        "    def forward(self, x):\n"
        "        return self.conv(x) if x.sum() > 0 else x\n\n\n"
        "def dynamic(num_classes=10, in_channels=1):\n"
        "    return Dynamic()\n\n\n"
        "def no_arguments():\n"
        "    return nn.Conv2d(1, 1, 1)\n")
    f["usermodels"] = str(user)
    (root / "syntax_error.py").write_text("def net(num_classes=10:\n    pass\n")
    f["syntaxfile"] = str(root / "syntax_error.py")
    (root / "needs_torchvision.py").write_text(
        "import torchvision_is_not_here\n\n\ndef net(num_classes=10):\n    pass\n")
    f["importfile"] = str(root / "needs_torchvision.py")
    (root / "factories.py").write_text(
        "from tasprune.models.zoo import concat_net\n\n\n"
        "def returns_dict(num_classes=10, in_channels=1):\n    return {'net': 1}\n\n\n"
        "def raises(num_classes=10, in_channels=1):\n"
        "    raise RuntimeError('my factory is broken')\n\n\n"
        "def type_error_inside(num_classes=10, in_channels=1):\n"
        "    return concat_net(num_classes, in_channels, 'extra')\n\n\n"
        "def five_classes(num_classes=10, in_channels=1):\n"
        "    return concat_net(num_classes=5, in_channels=in_channels)\n\n\n"
        "def ignores_classes(num_classes=10, in_channels=1):\n"
        "    return concat_net(num_classes=1000, in_channels=in_channels)\n")
    f["factories"] = str(root / "factories.py")
    f["r18weights"] = str(root / "resnet18.pth")
    torch.save(resnet18(num_classes=10, in_channels=1).state_dict(), f["r18weights"])
    nan_state = concat_net(num_classes=10, in_channels=1).state_dict()
    nan_state["fc.weight"][0, 0] = float("nan")
    f["nanweights"] = str(root / "nan.pth")
    torch.save(nan_state, f["nanweights"])
    f["pickleweights"] = str(root / "objects.pth")
    torch.save({"fc.weight": torch.zeros(1), "note": Path("a Python object")},
               f["pickleweights"])
    f["concatweights"] = str(root / "concat.safetensors")
    save_file(concat_net(num_classes=10, in_channels=1).state_dict(), f["concatweights"])
    return f


@pytest.fixture(autouse=True)
def synthetic_spec(monkeypatch):
    """`--data synthetic` is a tiny in-memory dataset; every other spec loads as usual."""
    real = _common.get_data
    monkeypatch.setattr(_common, "get_data", lambda spec, quiet=True:
                        SYNTHETIC if spec == "synthetic" else real(spec, quiet))


def _snapshot(path: Path) -> dict[str, tuple[bytes, int]]:
    if path.is_file():
        return {"": (path.read_bytes(), path.stat().st_mtime_ns)}
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else b"<dir>",
                                       p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))}


T = ["--data", "demo", "--epochs", "1"]  # train/search on the bundled data
S = ["--data", "synthetic", "--epochs", "1", "--batch-size", "8", "--quiet"]

# (id, argv with {placeholders}, fragments stderr must hold, what --out is:
#  "out" an existing directory with a sentinel file, a key of `files` for a copy of that
#  run (plus a sentinel), "missing" a path whose parent does not exist, or None)
CASES = [
    # unknown model name
    ("flops-unknown-model", ["flops", "resnet999"], ["'resnet999'", "known: resnet8"], None),
    ("train-unknown-model", ["train", "--model", "resnet999", *T, "--out", "{out}"],
     ["'resnet999'", "resnet20"], "out"),
    ("search-unknown-model", ["search", "--model", "resnet999", "--flops-ratio", "0.5", *T,
                              "--out", "{out}"], ["'resnet999'", "resnet56"], "out"),
    ("prune-unknown-model", ["prune", "--model", "resnet999", "--out", "{out}", "--quiet"],
     ["'resnet999'", "resnet110"], "out"),
    ("baseline-unknown-model", ["baseline", "--method", "uniform", "--model", "resnet999",
                                "--out", "{out}", "--quiet"], ["'resnet999'"], "out"),
    # FLOP ratio outside (0, 1], not a number, or below what the space can reach
    *[(f"{cmd}-ratio-{r}", [cmd, *args, "--flops-ratio", r, "--out", "{out}"],
       [f"argument --flops-ratio: expected a number, got '{r}'"], "out")
      for r in ("nan", "inf", "half")
      for cmd, args in (("search", ["--model", "resnet20", *T]), ("prune", ["--quiet"]))],
    *[(f"{cmd}-ratio-{r}", [cmd, *args, "--flops-ratio", r, "--out", "{out}"],
       [f"flops_ratio = {float(r)}", "in (0, 1]"], "out")
      for r in ("0", "-0.5", "1.5")
      for cmd, args in (("search", ["--model", "resnet20", *T]), ("prune", ["--quiet"]))],
    ("baseline-ratio-neg", ["baseline", "--method", "l1", "--flops-ratio", "-1", "--out",
                            "{out}"], ["flops_ratio = -1.0", "in (0, 1]"], "out"),
    ("search-ratio-unreachable", ["search", "--model", "resnet20", "--flops-ratio", "0.01", *T,
                                  "--out", "{out}"],
     ["flops ratio 0.01 cannot be reached", "0.0229", "[0.023, 1]"], "out"),
    ("prune-ratio-unreachable", ["prune", "--flops-ratio", "0.01", "--out", "{out}", "--quiet"],
     ["flops ratio 0.01 cannot be reached", "[0.023, 1]"], "out"),
    ("prune-params-unreachable", ["prune", "--params-ratio", "0.01", "--out", "{out}",
                                  "--quiet"], ["params ratio 0.01 cannot be reached"], "out"),
    ("prune-override-ratio-unreachable", ["prune", "search.flops_ratio=0.005", "--out", "{out}",
                                          "--quiet"], ["0.005 cannot be reached"], "out"),
    ("prune-override-ratio-text", ["prune", "search.flops_ratio=abc", "--out", "{out}"],
     ["search.flops_ratio: expected a number, got 'abc'"], "out"),
    ("baseline-uniform-unreachable", ["baseline", "--method", "uniform", "--flops-ratio", "0.001",
                                      "--out", "{out}", "--quiet"],
     ["0.001 is below the smallest reachable 0.0020", "uniform method", "[0.0021, 1]"], "out"),
    ("baseline-l1-unreachable", ["baseline", "--method", "l1", "--flops-ratio", "0.01",
                                 "--teacher", "{run20}", "--out", "{out}", "--quiet"],
     ["0.01 is below the smallest reachable 0.0149", "l1 method"], "out"),
    # shape files: wrong lengths, wrong widths, not JSON
    ("flops-widths-length", ["flops", "{widths_len}"],
     ["widths_len.json", "has 19 conv slots, got 18 widths"], None),
    ("flops-blocks-length", ["flops", "{blocks_len}"],
     ["blocks_len.json", "expected 3 entries (one per stage), got 2"], None),
    ("flops-width-zero", ["flops", "{width0}"], ["Shape.widths[0] = 0", "between 1 and 16"],
     None),
    ("flops-width-negative", ["flops", "{width_neg}"], ["Shape.widths[0] = -4"], None),
    ("flops-width-too-wide", ["flops", "{width_wide}"], ["= 999", "between 1 and 16"], None),
    ("flops-width-float", ["flops", "{width_float}"], ["must hold integers, got 7.5"], None),
    ("flops-width-str", ["flops", "{width_str}"], ["must hold integers, got 'x'"], None),
    ("flops-plan-too-wide", ["flops", "{plan_wide}"],
     ["plan_wide.json", "width 999, not 1 to 24"], None),
    ("flops-plan-float", ["flops", "{plan_float}"], ["= 7.5: must be an integer"], None),
    ("flops-plan-other-network", ["flops", "{plan_other}"],
     ["searched on another network", "unknown ['conv1']"], None),
    ("flops-not-json", ["flops", "{not_json}"], ["not_json.json: not valid JSON"], None),
    ("flops-empty-json", ["flops", "{empty_json}"], ["empty.json: not valid JSON"], None),
    ("flops-missing-shape", ["flops", "nowhere.json"], ["nowhere.json: no such file"], None),
    ("train-shape-width-zero", ["train", "--shape", "{width0}", *T, "--out", "{out}"],
     ["width0.json: invalid shape", "Shape.widths[0] = 0"], "out"),
    # TAS .config files: of another depth than the teacher, or inconsistent
    ("train-config-56-teacher-20", ["train", "--shape", "C010-ResNet56", "--teacher", "{run20}",
                                    *T, "--out", "{out}"],
     ["the teacher is a resnet20", "the shape prunes a resnet56"], "out"),
    ("train-config-file-56-teacher-20", ["train", "--shape",
                                         str(PAPER_SHAPES_DIR / "C010-ResNet56.config"),
                                         "--teacher", "{run20}", "--inherit", *T, "--out",
                                         "{out}"], ["the teacher is a resnet20", "resnet56"],
     "out"),
    ("flops-config-widths", ["flops", "{tas_short}"],
     ["short.config: not a valid TAS shape config", "19 conv slots, got 17"], None),
    ("flops-config-depth", ["flops", "{tas_depth21}"],
     ["depth21.config", "depth 21 does not fit ResNetBasicblock"], None),
    # datasets: missing, empty, garbage, truncated, no class folders
    ("data-cifar-missing", ["data", "info", "cifar10:{empty}/nope"],
     ["nope: no such directory", "tasprune data download cifar10"], None),
    ("data-cifar-empty", ["data", "info", "cifar10:{empty}"],
     ["holds no cifar-10-batches-py/", "tasprune data download cifar10"], None),
    ("data-cifar-garbage", ["data", "info", "cifar10:{garbage}"],
     ["data_batch_1: wrong checksum"], None),
    ("data-cifar-garbage-noverify", ["data", "info", "cifar10:{garbage},verify=no"],
     ["data_batch_1: not a readable CIFAR python batch"], None),
    ("data-fmnist-truncated", ["data", "info", "fashion-mnist:{fmnist_truncated}"],
     ["train-images-idx3-ubyte: truncated", "download the file again"], None),
    ("data-fmnist-swapped", ["data", "info", "fashion-mnist:{fmnist_swapped}"],
     ["train-labels-idx1-ubyte: expected uint8 data with 1 dimension(s)"], None),
    ("data-folder-empty", ["data", "info", "folder:{empty}"],
     ["empty/train: no such directory"], None),
    ("data-folder-no-classes", ["data", "info", "folder:{no_classes}"],
     ["no_classes/train: no class folders"], None),
    ("train-into-a-users-shape", ["train", "--model", "resnet8", *S, "--out", "{target}"],
     ["holds shape.json, which no tasprune run wrote there", "would overwrite it"],
     "users_files"),
    ("data-unknown-kind", ["data", "info", "imagenet:{empty}"],
     ["unknown dataset", "folder:DIR"], None),
    ("train-cifar-missing", ["train", "--model", "resnet20", "--data", "cifar10:{empty}/nope",
                             "--epochs", "1", "--out", "{out}"], ["nope: no such directory"],
     "out"),
    # an unreadable image, found when its batch is decoded (in a worker or not)
    ("train-folder-bad-image", ["train", "--model", "resnet8", "--data",
                                "folder:{bad_train},resolution=16,workers=0", "--epochs", "1",
                                "--batch-size", "4", "--out", "{out}", "--quiet"],
     ["bad_train/train/a/1.png: cannot read image", "remove or replace the file"], None),
    ("eval-folder-bad-image", ["eval", "{run8rgb2}", "--data",
                               "folder:{bad_val},resolution=16", "--no-latency", "--quiet"],
     ["bad_val/val/b/2.png: cannot read image"], None),
    # a model or checkpoint from another model
    ("eval-weights-not-shape", ["eval", "{mismatch}", "--data", "demo", "--no-latency",
                                "--quiet"],
     ["mismatch/model.safetensors: no weights for layer", "different model or shape"],
     "mismatch"),
    ("export-weights-not-shape", ["export", "{target}", "--format", "torchscript"],
     ["model.safetensors: no weights for layer"], "mismatch"),
    ("eval-other-classes", ["eval", "{run8c3}", "--data", "demo", "--no-latency", "--quiet"],
     ["has 3 classes", "has 10 classes"], None),
    ("eval-threads-zero", ["eval", "{run8c3}", "--data", "demo", "--threads", "0", "--quiet"],
     ["--threads must be >= 1, got 0"], None),
    ("prune-latency-threads-zero", ["prune", "latency.threads=0", "--out", "{out}", "--quiet"],
     ["latency threads must be >= 1", "got 0"], "out"),
    ("train-teacher-other-classes", ["train", "--model", "resnet20", "--teacher", "{run8c3}",
                                     *T, "--out", "{out}"], ["teacher has 3 classes"], "out"),
    ("train-teacher-other-family", ["train", "--shape", "C010-ResNet20", "--teacher", "{run18}",
                                    *T, "--out", "{out}"],
     ["the teacher is a resnet18", "the shape prunes a resnet20"], "out"),
    ("train-inherit-other-family", ["train", "--model", "resnet20", "--inherit", "--teacher",
                                    "{run18}", *T, "--out", "{out}"],
     ["the teacher is a resnet18", "resnet20"], "out"),
    ("search-teacher-other-family", ["search", "--model", "resnet20", "--teacher", "{run18}",
                                     "--flops-ratio", "0.5", *T, "--out", "{out}"],
     ["the teacher is a resnet18", "tasprune train --model resnet20"], "out"),
    ("prune-teacher-other-classes", ["prune", "--teacher", "{run8c3}", "--out", "{out}",
                                     "--quiet"], ["run8c3 has 3 classes", "10 classes"], "out"),
    ("baseline-l1-teacher-other-depth", ["baseline", "--method", "l1", "--teacher", "{run32}",
                                         "--out", "{out}", "--quiet"],
     ["run32 is a resnet32, not a resnet20"], "out"),
    ("train-resume-other-shape", ["train", "--model", "resnet14", *S, "--resume",
                                  "--out", "{target}"],
     ["train.pt: was written for another shape"], "tr8"),
    ("train-over-finished-model", ["train", "--model", "resnet20", *T, "--out", "{target}"],
     ["already holds a trained model (model.safetensors)", "choose another --out"], "run20"),
    ("train-over-run", ["train", "--model", "resnet8", *S, "--out", "{target}"],
     ["already holds a training run (train.pt)", "--resume"], "tr8"),
    # output directory: parent missing, or an existing file
    *[(f"{cmd}-out-parent-missing", argv, ["output directory parent", "missing/x does not exist",
                                           "create it first"], "missing")
      for cmd, argv in (
          ("train", ["train", "--model", "resnet8", *S, "--out", "{missing}"]),
          ("search", ["search", "--model", "resnet8", "--flops-ratio", "0.5", *S,
                      "--out", "{missing}"]),
          ("prune", ["prune", "--out", "{missing}", "--quiet"]),
          ("baseline", ["baseline", "--method", "uniform", "--out", "{missing}", "--quiet"]))],
    ("export-out-parent-missing", ["export", "{run20}", "--format", "torchscript", "--out",
                                   "{missing}/model.pt"],
     ["output file parent", "does not exist"], "missing"),
    ("export-out-directory", ["export", "{run20}", "--format", "onnx", "--out", "{out}"],
     ["is a directory; give a file name", "model.onnx"], "out"),
    *[(f"{cmd}-out-is-file", [*argv, "--out", "{afile}"],
       ["afile.txt is an existing file, not a directory"], "afile")
      for cmd, argv in (("train", ["train", "--model", "resnet8", *S]),
                        ("search", ["search", "--model", "resnet8", "--flops-ratio", "0.5", *S]),
                        ("prune", ["prune", "--quiet"]), ("demo", ["demo", "--quiet"]))],
    ("recipe-unknown-key", ["prune", "--config", "{recipe_unknown_key}", "--out", "{out}"],
     ["unknown_key.yaml: unknown config key search.epochz", "valid keys under search:",
      "epochs"], "out"),
    ("recipe-malformed", ["prune", "--config", "{recipe_malformed}", "--out", "{out}"],
     ["malformed.yaml: not valid YAML", "line"], "out"),
    ("recipe-unknown-name", ["prune", "--config", "cifar10-resnet21", "--out", "{out}"],
     ["no recipe 'cifar10-resnet21'", "cifar10-resnet20", "demo"], "out"),
    ("recipe-missing-file", ["baseline", "--method", "uniform", "--config", "nowhere.yaml",
                             "--out", "{out}"], ["nowhere.yaml: no such config file"], "out"),
    ("override-unknown-key", ["prune", "train.epochz=3", "--out", "{out}"],
     ["unknown config key train.epochz", "valid keys under train:"], "out"),
    # one run directory, one kind of run; no export over a run's files
    ("search-into-a-train-run", ["search", "--model", "resnet8", "--flops-ratio", "0.5", *S,
                                 "--out", "{target}"],
     ["holds a `tasprune train` run", "`tasprune search` would overwrite"], "tr8"),
    ("prune-into-a-train-run", ["prune", "--out", "{target}", "--quiet"],
     ["holds a `tasprune train` run", "choose another --out"], "tr8"),
    ("train-into-a-search-run", ["train", "--model", "resnet8", *S, "--out", "{target}"],
     ["holds a `tasprune search` run"], "srch"),
    *[(f"export-over-{name}", ["export", "{target}", "--format", "torchscript", "--out",
                               "{target}/" + name], [name, fragment], "run20")
      for name, fragment in (("model.safetensors", "is the model being exported"),
                             ("shape.json", "did not write it"),
                             ("train.pt", "a file name of the run"))],
    ("prune-edited-config", ["prune", "--out", "{target}", "--quiet"],
     ["config.yaml was edited after the run wrote it", "restore it"], "edited"),
    ("prune-damaged-config", ["prune", "--out", "{target}", "--quiet"],
     ["config.yaml: the run's saved settings are damaged", "line 2"], "damaged"),
    # settings checked before any work
    ("prune-section-null", ["prune", "train=null", "--out", "{out}", "--quiet"],
     ["train: expected a mapping of train settings"], "out"),
    ("prune-device-tpu", ["prune", "search.device=tpu", "--out", "{out}", "--quiet"],
     ["device = 'tpu'", "'cuda:N'"], "out"),
    ("prune-cuda-absent", ["prune", "search.device=cuda", "--out", "{out}", "--quiet"],
     ["search.device 'cuda': CUDA is not available"], "out"),
    ("train-lr-inf", ["train", "--model", "resnet8", *S, "--lr", "inf", "--out", "{out}"],
     ["argument --lr: expected a number, got 'inf'"], "out"),
    ("train-lr-overflow", ["train", "--model", "resnet8", *S, "--lr", "1e999", "--out",
                           "{out}"], ["learning rate must be a finite number > 0, got inf"],
     "out"),
    ("override-blamed-not-recipe", ["prune", "--config", "demo", "train.lr=abc", "--out",
                                    "{out}"], ["override: train.lr: expected a number"], "out"),
    ("prune-ratio-tiny", ["prune", "search.flops_ratio=1e-9", "--out", "{out}", "--quiet"],
     ["cannot be reached"], "out"),
    ("flops-huge-depth", ["flops", "cifar-resnet8000000000"],
     ["1333333333 blocks per stage", "at most 1000"], None),
    ("eval-nan-weights", ["eval", "{nan}", "--data", "demo", "--no-latency", "--quiet"],
     ["NaN or infinite values", "diverged"], None),
    ("train-one-class-folder", ["train", "--model", "resnet8", "--data",
                                "folder:{one_class},resolution=16,workers=0", "--epochs", "1",
                                "--out", "{out}"],
     ["only one class folder (only)", "at least two"], "out"),
    # integrations: trackers, mixed precision, Hub export
    ("log-unknown-tracker", ["demo", "--log", "wandb", "--out", "{out}"],
     ["argument --log: unknown tracker 'wandb'; choose from csv, tensorboard"], "out"),
    ("search-fp16-on-cpu", ["search", "--model", "resnet8", "--flops-ratio", "0.5", *S,
                            "--amp", "fp16", "--device", "cpu", "--out", "{out}"],
     ["search amp fp16 needs a CUDA device"], "out"),
    ("export-hf-into-the-run", ["export", "{target}", "--format", "hf", "--out", "{target}"],
     ["holds files that are not an earlier export"], "run20"),
    # a network of your own (--model FILE.py:FACTORY)
    ("own-model-missing-file", ["prune", "--model", "{out}/nothere.py:net", "--out", "{out}"],
     ["nothere.py:net", "no file"], "out"),
    ("own-model-no-callable", ["prune", "--model", "tasprune.models.zoo:nothing", "--out",
                               "{out}"], ["no callable 'nothing'"], "out"),
    ("own-model-untraceable", ["flops", "{usermodels}:dynamic"],
     ["Dynamic cannot be traced by torch.fx"], None),
    ("own-model-factory-arguments", ["flops", "{usermodels}:no_arguments"],
     ["no_arguments", "must take num_classes="], None),
    ("own-model-weights-of-another-net", ["search", "--model", "tasprune.models.zoo:resnet50",
                                          "--weights", "{r18weights}", *T, "--out", "{out}"],
     ["resnet18.pth"], "out"),
    ("train-into-a-users-shape", ["train", "--model", "resnet8", *S, "--out", "{target}"],
     ["holds shape.json, which no tasprune run wrote there", "would overwrite it"],
     "users_files"),
    ("data-unknown-kind", ["train", "--model", "resnet8", "--data", "imagenet:/data/x",
                           "--epochs", "1", "--out", "{out}"],
     ["unknown dataset 'imagenet:/data/x'", "use one of: demo"], "out"),
    ("train-run-already-there", ["train", "--model", "resnet8", *S, "--out", "{target}"],
     ["already holds a training run (train.pt)", "pass --resume"], "tr8"),
    ("flops-channel-shuffle", ["flops", "tasprune.models.zoo:shufflenet_v2_x1_0"],
     ["stage2.0 (call_method view): reshapes the channel axis"], None),
    # nothing a user owns is overwritten (issue 26)
    ("export-over-another-runs-model", ["export", "{run32}", "--format", "pt2", "--out",
                                        "{target}/model.safetensors"],
     ["model.safetensors already exists", "did not write it"], "run20"),
    ("export-over-a-users-file", ["export", "{run20}", "--format", "torchscript", "--out",
                                  "{out}/" + SENTINEL], ["already exists", "new file name"],
     "out"),
    ("export-hf-into-a-users-directory", ["export", "{run20}", "--format", "hf", "--out",
                                          "{target}"],
     ["holds files that are not an earlier export", "README.md"], "proj"),
    *[(f"{cmd}-out-empty", [cmd, *args, "--out", ""], ["--out ''", "names no"], None)
      for cmd, args in (("train", ["--model", "resnet8", *S]),
                        ("search", ["--model", "resnet8", "--flops-ratio", "0.5", *S]),
                        ("prune", ["--quiet"]), ("export", ["{run20}", "--format", "onnx"]))],
    ("export-hf-out-empty", ["export", "{run20}", "--format", "hf", "--out", ""],
     ["--out ''", "names no directory"], None),
    # damaged weights never evaluate
    ("eval-damaged-weights", ["eval", "{damagedweights}", "--data", "demo", "--no-latency",
                              "--quiet"], ["no longer match the digest", "copy it again"],
     None),
    ("export-damaged-weights", ["export", "{target}", "--format", "onnx"],
     ["no longer match the digest"], "damagedweights"),
    # a network of your own: every fault of its file is one line
    ("own-model-syntax-error", ["flops", "{syntaxfile}:net"],
     ["syntax_error.py cannot be loaded (line 1)"], None),
    ("own-model-missing-import", ["flops", "{importfile}:net"],
     ["needs_torchvision.py cannot be loaded", "No module named 'torchvision_is_not_here'"],
     None),
    ("own-model-factory-raises", ["flops", "{factories}:raises"],
     ["the factory raised", "my factory is broken"], None),
    ("own-model-factory-type-error", ["flops", "{factories}:type_error_inside"],
     ["the factory raised", "argument"], None),
    ("own-model-returns-a-dict", ["flops", "{factories}:returns_dict"],
     ["returned a dict, not an nn.Module"], None),
    ("own-model-wrong-classes", ["train", "--model", "{factories}:five_classes", *T, "--out",
                                 "{out}"], ["gives 5 outputs per image", "10 classes"], "out"),
    ("own-model-ignores-num-classes", ["train", "--model", "{factories}:ignores_classes", *T,
                                       "--out", "{out}"],
     ["gives 1000 outputs per image", "num_classes="], "out"),
    ("own-model-nan-weights", ["search", "--model", "tasprune.models.zoo:concat_net",
                               "--weights", "{nanweights}", "--flops-ratio", "0.5", *T,
                               "--out", "{out}"], ["nan.pth: fc.weight holds NaN"], "out"),
    ("own-model-pickled-objects", ["search", "--model", "tasprune.models.zoo:concat_net",
                                   "--weights", "{pickleweights}", "--flops-ratio", "0.5", *T,
                                   "--out", "{out}"],
     ["objects.pth: holds Python objects besides tensors", "never unpickles"], "out"),
    # checked before the first epoch
    ("train-logs-not-writable", ["train", "--model", "resnet8", *S, "--log", "csv", "--out",
                                 "{target}"], ["log:", "logs cannot be written"], "logs_file"),
    ("train-absurd-resolution", ["train", "--model", "resnet8", "--data",
                                 "folder:{bad_train},resolution=100000", "--epochs", "1",
                                 "--out", "{out}"],
     ["resolution=100000", "GiB as float32", "1 to 4096"], "out"),
    ("train-seed-too-large", ["train", "--model", "resnet8", *S, "--seed",
                              str(2**64), "--out", "{out}"],
     ["seed must be an integer in [0, 2**63)"], "out"),
    ("search-seed-too-large", ["search", "--model", "resnet8", "--flops-ratio", "0.5", *S,
                               "--seed", str(2**64), "--out", "{out}"],
     ["seed =", "[0, 2**63)"], "out"),
    ("prune-empty-recipe", ["prune", "--config", "{recipe_empty}", "--out", "{out}"],
     ["empty.yaml: the recipe holds no settings"], "out"),
    ("prune-duplicate-key", ["prune", "--config", "{recipe_duplicate}", "--out", "{out}"],
     ["duplicate.yaml", "key 'model' given twice", "line 2"], "out"),
    # --resume with nothing to resume
    ("train-resume-nothing", ["train", "--model", "resnet8", *S, "--resume", "--out", "{out}"],
     ["has no train.pt to resume", "run without --resume"], "out"),
    ("search-resume-nothing", ["search", "--model", "resnet8", "--flops-ratio", "0.5", *S,
                               "--resume", "--out", "{out}"],
     ["has no search.pt to resume", "run without --resume"], "out"),
]


@pytest.mark.parametrize("argv, fragments, out", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(files, tmp_path, capsys, request, argv, fragments, out):
    paths = dict(files, out=str(tmp_path / "out"), missing=str(tmp_path / "missing/x/run"),
                 target=str(tmp_path / "target"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / SENTINEL).write_text("keep me\n")
    watched = None
    if out == "out":
        watched = tmp_path / "out"
    elif out == "afile":
        watched = Path(files["afile"])
    elif out in files:  # an existing run of `files`, copied (with a sentinel)
        watched = Path(shutil.copytree(files[out], tmp_path / "target"))
        (watched / SENTINEL).write_text("keep me\n")
    before = _snapshot(watched) if watched is not None else None

    try:
        status = cli.main([a.format(**paths) for a in argv])
    except SystemExit as exc:  # argparse rejects the arguments themselves
        status = exc.code

    captured = capsys.readouterr()
    SEEN[request.node.callspec.id] = captured.err
    command = argv[0]
    assert status == 2, captured.err
    assert "Traceback" not in captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"tasprune {command}: error: "), lines[0]
    for fragment in fragments:
        assert fragment.format(**paths) in lines[0], (fragment, lines[0])
    if watched is not None:
        assert _snapshot(watched) == before
    if out == "missing":
        assert not (tmp_path / "missing").exists()


def test_bad_image_in_a_decoding_worker_reaches_the_terminal_as_one_line(files, tmp_path):
    """A real process: the error of a DataLoader worker at the first batch, without traceback."""
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "tasprune", "train", "--model", "resnet8", "--data",
         f"folder:{files['bad_train']},resolution=16,workers=1", "--epochs", "1",
         "--batch-size", "4", "--out", str(tmp_path / "run"), "--quiet"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"tasprune train: error: {files['bad_train']}/train/a/1.png: cannot read "
                     "image (cannot identify image file "
                     f"'{files['bad_train']}/train/a/1.png'); remove or replace the file"]


# docs/errors.md in step with the code ---------------------------------------------------
_PATHLIKE = re.compile(r"\S*/\S*|\S+\.(?:json|yaml|py|pt|pth|safetensors|config|png|onnx|pt2|md|"
                       r"txt)\b\S*")


def _doc_rows() -> list[tuple[str, list[list[str]], bool]]:
    """(row text, its messages as lists of fixed fragments, whether it opts out) per table
    row of docs/errors.md. A message is a code span of the third column (a row may show
    several, from several cases), cut at "...", paths and file names (the page shortens
    them); fragments under 12 characters are dropped."""
    rows = []
    for line in ERRORS_MD.read_text().splitlines():
        cells = line.split(" | ")
        if not line.startswith("| ") or len(cells) < 3 or line.startswith("| You give"):
            continue
        spans = []
        for span in " | ".join(cells[2:]).split("`")[1::2]:
            pieces = [piece.strip(" ,;:()'\"") for part in span.split("...")
                      for piece in _PATHLIKE.split(part)]
            if any(len(p) >= 12 for p in pieces):
                spans.append([p for p in pieces if len(p) >= 12])
        rows.append((line, spans, "<!-- not run:" in line))
    return rows


def test_every_message_of_docs_errors_md_is_what_the_code_says(files, tmp_path_factory,
                                                                 capsys):
    """Each row's message, but for the parts the page shortens, is on the stderr of one
    case of the table above (cases not run yet in this session are run here)."""
    for case in CASES:
        if case[0] not in SEEN:
            tmp = tmp_path_factory.mktemp("doc_case")
            paths = dict(files, out=str(tmp / "out"), missing=str(tmp / "missing/x/run"),
                         target=str(tmp / "target"))
            (tmp / "out").mkdir()
            if case[3] in files and case[3] not in ("afile",):
                shutil.copytree(files[case[3]], tmp / "target")
            try:
                cli.main([a.format(**paths) for a in case[1]])
            except SystemExit:
                pass
            SEEN[case[0]] = capsys.readouterr().err
    errors = list(SEEN.values())
    drifted = [line for line, spans, opted_out in _doc_rows() if not opted_out
               and not all(any(all(f in err for f in span) for err in errors)
                           for span in spans)]
    assert not drifted, "rows of docs/errors.md no case prints:\n" + "\n".join(drifted)
