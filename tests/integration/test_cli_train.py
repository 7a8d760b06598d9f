import json

import pytest
import torch

from helpers import synthetic_bundle
from tasprune import load_pruned
from tasprune._io import read_jsonl
from tasprune.cli import main
from tasprune.commands import _common
from tasprune.net.surgery import shape_of


@pytest.fixture
def synthetic_data(monkeypatch):
    data = synthetic_bundle(n_train=48, n_test=24)
    monkeypatch.setattr(_common, "get_data", lambda spec, quiet=True: data)
    return data


def _train(out, *extra):
    return main(["train", "--data", "synthetic", "--epochs", "2", "--batch-size", "16",
                 "--out", str(out), "--quiet", *extra])


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_train_eval_export_from_the_command_line(tmp_path, synthetic_data, capsys):
    assert _train(tmp_path / "teacher", "--model", "resnet8") == 0
    assert "test accuracy" in capsys.readouterr().out
    assert shape_of(load_pruned(tmp_path / "teacher")).num_classes == 3

    # a pruned shape with KD from the teacher, weights inherited
    shape = shape_of(load_pruned(tmp_path / "teacher"))
    pruned = shape.replace(widths=tuple(max(1, w // 2) for w in shape.widths))
    pruned.save(tmp_path / "pruned.json")
    assert _train(tmp_path / "student", "--shape", str(tmp_path / "pruned.json"),
                  "--teacher", str(tmp_path / "teacher"), "--inherit",
                  "--kd-alpha", "0.5", "--kd-temperature", "2") == 0
    records = read_jsonl(tmp_path / "student/metrics.jsonl")
    assert records[0]["phase"] == "teacher" and records[-1]["kd_loss"] > 0
    assert shape_of(load_pruned(tmp_path / "student")) == pruned
    capsys.readouterr()

    assert main(["eval", str(tmp_path / "student"), "--data", "synthetic", "--json",
                 "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0 <= out["acc"] <= 1 and out["acc"] == pytest.approx(records[-1]["test_acc"])
    assert out["flops"] > 0 and out["params"] > 0
    assert set(out["latency_ms"]) == {"1", "64"} and all(v > 0 for v in
                                                          out["latency_ms"].values())
    # paired with the unpruned counterpart, and the folded form (PyTorch, ONNX Runtime)
    lat = out["latency"]
    assert lat["baseline"] == "dense" and lat["threads"] == out["threads"]
    assert {"dense", "model", "folded"} <= set(lat["ms"]) and lat["rounds"] == 5
    speed = lat["speedup"]["model"]["64"]
    assert speed["min"] <= speed["median"] <= speed["max"]
    assert ("onnxruntime" in lat["ms"]) == (lat["onnxruntime_skipped"] is None)
    assert main(["eval", str(tmp_path / "student/best.pt"), "--data", "synthetic",
                 "--no-latency", "--quiet"]) == 0
    assert "test accuracy" in capsys.readouterr().out

    assert main(["export", str(tmp_path / "student"), "--format", "torchscript"]) == 0
    scripted = torch.jit.load(str(tmp_path / "student/model.torchscript.pt"))
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        assert torch.allclose(scripted(x), load_pruned(tmp_path / "student")(x), atol=1e-6)


def test_resume_from_the_command_line(tmp_path, synthetic_data, capsys):
    assert _train(tmp_path / "run", "--model", "resnet8") == 0
    assert _train(tmp_path / "run", "--model", "resnet8") == 2
    assert "--resume" in capsys.readouterr().err
    assert _train(tmp_path / "run", "--model", "resnet8", "--resume") == 0
    assert len(read_jsonl(tmp_path / "run/metrics.jsonl")) == 2


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet8", "--kd-alpha", "0.5"], "needs a teacher"),
    (["--model", "resnet8", "--inherit"], "needs a teacher"),
    (["--model", "resnet8", "--teacher", "nowhere"], "no such file"),
    (["--model", "resnet999"], "unknown model"),
    (["--shape", "missing.json"], "no such file"),
    (["--model", "resnet8", "--lr", "-1"], "learning rate"),
])
def test_train_errors_are_one_line(tmp_path, synthetic_data, capsys, args, message):
    assert _train(tmp_path / "run", *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_eval_rejects_a_model_for_other_data(tmp_path, synthetic_data, capsys, monkeypatch):
    assert _train(tmp_path / "run", "--model", "resnet8") == 0
    monkeypatch.setattr(_common, "get_data", lambda spec, quiet=True: synthetic_bundle(classes=5))
    assert main(["eval", str(tmp_path / "run"), "--data", "x", "--no-latency"]) == 2
    assert "3 classes" in capsys.readouterr().err


@pytest.mark.slow
def test_train_and_eval_on_the_bundled_demo_data(tmp_path, capsys):
    # the real data layer end to end (the fast tests above use synthetic data)
    assert main(["train", "--model", "resnet8", "--data", "demo", "--epochs", "1",
                 "--out", str(tmp_path / "run"), "--quiet"]) == 0
    record = read_jsonl(tmp_path / "run/metrics.jsonl")[-1]
    assert record["images"] == 5888  # 6,000 images in full batches of 128
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--data", "demo", "--json", "--quiet",
                 "--no-latency"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 1000 and out["acc"] == pytest.approx(record["test_acc"])
    assert out["acc"] > 0.2  # above chance (0.1) after one epoch
