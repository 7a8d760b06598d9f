"""Integrations: trackers (CSV, TensorBoard), torch.export and Hub-layout sharing, mixed
precision in the search, persistent folder decoding."""

import csv
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from helpers import example_input as _x
from helpers import pruned_model as _model
from helpers import supernet_from
from tasprune import Shape, from_pretrained, load_data, save_pretrained
from tasprune._io import read_jsonl
from tasprune.cli import main
from tasprune.export import export_pt2
from tasprune.net.surgery import shape_of
from tasprune.tas.searcher import SearchConfig, search
from tasprune.tracking import check_sinks, log_record, parse_sinks, tensorboard_dir

needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="needs tensorboard (pip install "
                                       "'tasprune[tensorboard]')")


def _scalars(event_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


# trackers ------------------------------------------------------------------------------
def test_sink_names_are_checked():
    assert parse_sinks("csv, csv") == ("csv",)
    with pytest.raises(ValueError, match="unknown tracker 'wandb'; choose from csv, tensorboard"):
        check_sinks(["wandb"])
    with pytest.raises(SystemExit):
        main(["demo", "--log", "mlflow", "--out", "x"])


def test_csv_has_one_row_per_record_and_follows_dropped_lines(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    log_record(metrics, {"phase": "search", "epoch": 1, "acc": 0.5}, ["csv"])
    log_record(metrics, {"phase": "train", "epoch": 1, "loss": 2.0}, ["csv"])
    log_record(metrics, {"phase": "search", "epoch": 2, "acc": 0.75, "blocks": [1, 2]}, ["csv"])
    with open(tmp_path / "logs" / "search.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[1]["acc"] == "0.75" and json.loads(rows[1]["blocks"]) == [1, 2]
    assert rows[0]["blocks"] == ""
    assert len(read_jsonl(metrics)) == 3


@needs_tensorboard
def test_tensorboard_purges_redone_epochs(tmp_path):
    import tasprune.tracking as tracking

    metrics = tmp_path / "metrics.jsonl"
    for epoch, value in ((1, 0.1), (2, 0.2), (3, 0.3)):
        log_record(metrics, {"phase": "train", "epoch": epoch, "acc": value}, ["tensorboard"])
    tracking.close_trackers()  # as a new process would: a resume redoes epochs 2 and 3
    for epoch, value in ((2, 0.25), (3, 0.35)):
        log_record(metrics, {"phase": "train", "epoch": epoch, "acc": value}, ["tensorboard"])
    tracking.close_trackers()
    events = _scalars(tensorboard_dir(tmp_path, "train")).Scalars("acc")
    assert [(e.step, round(e.value, 6)) for e in events] == [(1, 0.1), (2, 0.25), (3, 0.35)]


@pytest.mark.slow
@needs_tensorboard
def test_demo_with_trackers_matches_metrics(tmp_path, demo_subset):
    out = tmp_path / "run"
    assert main(["prune", "--model", "resnet8", "--data", demo_subset, "--out", str(out),
                 "--quiet", "--log", "tensorboard,csv", "teacher_train.epochs=1",
                 "search.epochs=2", "train.epochs=2", "search.batch_size=64",
                 "latency.repeats=2", "latency.min_repeats=1", "search.health_images=50"]) == 0
    records = read_jsonl(out / "metrics.jsonl")
    for phase in ("search", "derive", "teacher", "train"):
        mine = [r for r in records if r["phase"] == phase]
        with open(out / "logs" / f"{phase}.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == len(mine) > 0, phase
        acc = _scalars(tensorboard_dir(out, phase))
        for key in ("train_acc", "expected_ratio", "test_acc", "flops_ratio"):
            numbers = [(r["epoch"], r[key]) for r in mine if key in r]
            if not numbers:
                continue
            logged = [(e.step, e.value) for e in acc.Scalars(key)]
            assert [s for s, _ in logged] == [s for s, _ in numbers], (phase, key)
            assert [v for _, v in logged] == pytest.approx([v for _, v in numbers], rel=1e-6)
        if phase == "search":
            hists = [t for t in acc.Tags()["histograms"] if t.startswith("width/group")]
            assert hists and len(acc.Histograms(hists[0])) == len(mine)
    teacher = [r for r in read_jsonl(out / "teacher" / "metrics.jsonl")]
    with open(out / "teacher" / "logs" / "train.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(teacher)


# sharing -------------------------------------------------------------------------------
def test_pt2_export_loads_without_tasprune(tmp_path):
    model = _model()
    path = export_pt2(model, tmp_path / "model.pt2")
    x = _x(5)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x), tmp_path / "expected.pt")
    code = (
        "import sys; sys.modules['tasprune'] = None\n"  # importing tasprune would fail
        "import torch\n"
        f"m = torch.export.load({str(path)!r}).module()\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)\n"
        f"e = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)\n"
        "assert (m(x) - e).abs().max() < 1e-5\n"
        "assert m(x[:1]).shape == (1, e.shape[1])\n"  # dynamic batch
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_save_pretrained_round_trip_and_card(tmp_path):
    model = _model()
    summary = {"model": "resnet8", "data": "demo", "method": "tas", "acc_full": 0.8,
               "acc_pruned": 0.75, "flops_full": 100, "flops_pruned": 50,
               "flops_ratio_target": 0.5, "params_full": 10, "params_pruned": 5}
    out = save_pretrained(model, tmp_path / "hub", summary=summary,
                          settings={"search": {"epochs": 3}, "secret": 1})
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json",
                                                     "model.safetensors", "shape.json"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: tasprune")
    assert "top-1 accuracy (test)" in card and "epochs: 3" in card and "secret" not in card
    config = json.loads((out / "config.json").read_text())
    assert config["flops"] > 0 and config["shape"] == shape_of(model).to_dict()
    for loaded in (from_pretrained(out), from_pretrained(str(out))):
        with torch.no_grad():
            assert (loaded(_x()) - model(_x())).abs().max() < 1e-5
    with pytest.raises(FileNotFoundError, match="nor a Hub repository id"):
        from_pretrained(tmp_path / "nowhere" / "deep" / "x")
    (tmp_path / "runs").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        with pytest.raises(FileNotFoundError, match="nor a Hub repository id"):
            from_pretrained("runs/typo")  # runs/ is here: a local path, never a download
    with pytest.raises(ValueError, match="push_to_hub needs repo_id"):
        save_pretrained(model, tmp_path / "hub2", push_to_hub=True)


def test_export_cli_pt2_and_hf(tmp_path, capsys):
    model = _model()
    run = tmp_path / "run"
    run.mkdir()
    from tasprune.export import save_pruned

    save_pruned(run, model)
    assert main(["export", str(run), "--format", "pt2"]) == 0
    assert (run / "model.pt2").is_file()
    assert main(["export", str(run), "--format", "hf"]) == 0
    assert "wrote" in capsys.readouterr().out
    with torch.no_grad():
        assert (from_pretrained(run / "hub")(_x()) - model(_x())).abs().max() < 1e-5
    assert main(["export", str(run), "--format", "hf", "--out", str(run)]) == 2
    assert "not an earlier export" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "hf", "--out", str(run / "hub")]) == 0
    other = tmp_path / "other"  # another run: its model must not be replaced
    other.mkdir()
    (other / "train.pt").write_text("a checkpoint")
    assert main(["export", str(run), "--format", "hf", "--out", str(other)]) == 2
    assert "not an earlier export" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["train.pt"]


# mixed precision -----------------------------------------------------------------------
def test_search_in_bf16_on_cpu_runs_and_fp16_needs_cuda(tmp_path, demo_subset, one_thread):
    data = load_data(demo_subset)
    full = Shape.full("resnet8", num_classes=data.num_classes, in_channels=data.in_channels,
                      resolution=data.resolution)
    config = SearchConfig(epochs=1, batch_size=64, health_images=0, amp="bf16", device="cpu")
    result = search(full, data, config, tmp_path / "bf16", quiet=True)
    record = next(r for r in read_jsonl(tmp_path / "bf16" / "metrics.jsonl")
                  if r["phase"] == "search")
    assert torch.isfinite(torch.tensor(record["train_loss"])) and result.flops > 0
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        search(full, data, SearchConfig(epochs=1, batch_size=64, amp="fp16", device="cpu"),
               tmp_path / "fp16", quiet=True)
    with pytest.raises(ValueError, match="amp"):
        SearchConfig(amp="fp8")


def test_supernet_bn_stays_float32_under_autocast():
    full = Shape.full("resnet8", num_classes=4, in_channels=1, resolution=12)
    net = supernet_from(full).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(_x(4), net.sample(1.0, 2, torch.Generator().manual_seed(1)))
    out.float().sum().backward()
    assert torch.isfinite(net.width_logits.grad).all()


# data ----------------------------------------------------------------------------------
def test_folder_workers_persist_between_passes(tmp_path):
    import numpy as np
    from PIL import Image

    from tasprune.data.folder import default_workers, load_folder

    for split in ("train", "val"):
        for c in range(2):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((10, 10, 3), 40 * i + c, np.uint8)).save(
                    tmp_path / split / f"c{c}" / f"{i}.png")
    bundle = load_folder(tmp_path, resolution=8, workers=1)
    passes = [[y.tolist() for _, y in bundle.train.batches(3)] for _ in range(2)]
    assert passes[0] == passes[1] and sum(len(b) for b in passes[0]) == 8
    loader, _ = bundle.train._idle[0]
    pids = loader._iterator._workers[0].pid
    # two passes at once (the search reads both halves together), then a third alone
    both = list(zip(bundle.train.batches(4), bundle.train.batches(2), strict=False))
    assert len(both) == 2 and len(bundle.train._idle) == 2
    list(bundle.train.batches(4))
    assert any(lo._iterator._workers[0].pid == pids for lo, _ in bundle.train._idle)
    assert 1 <= default_workers() <= 16
