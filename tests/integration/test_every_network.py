"""Every command on every kind of network: a built-in ResNet, the zoo's MobileNetV2 and a
ResNeXt-style network with grouped convolutions, end to end on a small subset of the real
data (slow): prune, search (FLOP, parameter and latency budgets, coupled or free residual
widths, resume), train (a shape with its teacher, the unpruned network from --weights),
the three baselines, eval, export in every format, report and flops."""

import json

import onnxruntime as ort
import pytest
import torch

from tasprune import load_model
from tasprune.cli import main
from tasprune.net.surgery import shape_of

NETWORKS = ["resnet20", "mobilenet_v2", "resnext_small"]
TINY = ["--teacher-train-epochs", "1", "--search-epochs", "1", "--train-epochs", "1",
        "--teacher-train-batch-size", "64", "--search-batch-size", "64",
        "--train-batch-size", "64", "--latency-rounds", "1", "--latency-repeats", "1",
        "--latency-min-repeats", "1", "--latency-batch-sizes", "1",
        "teacher_train.warmup_epochs=0", "train.warmup_epochs=0", "--quiet"]


def _run(*argv: str) -> int:
    return main([str(a) for a in argv])


@pytest.mark.slow
@pytest.mark.parametrize("net", NETWORKS)
def test_every_command_on_every_network(net, tmp_path, demo_subset, capsys, monkeypatch):
    monkeypatch.setenv("TASPRUNE_CACHE", str(tmp_path / "cache"))
    data = ["--data", demo_subset]
    run = tmp_path / "prune"

    # the whole job, then the things done with its output
    assert _run("prune", "--model", net, *data, "--flops-ratio", "0.5", "--out", run,
                *TINY) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["flops_pruned"] <= 0.5 * summary["flops_full"]
    assert summary["shape"]["model"]["name"] == net
    model = load_model(run)
    assert shape_of(model).count("flops") == summary["flops_pruned"]
    capsys.readouterr()
    assert _run("eval", run, *data, "--json", "--quiet", "--no-deploy") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["acc"] == pytest.approx(summary["acc_pruned"]) and out["latency_ms"]
    x = torch.randn(2, 1, 14, 14)
    with torch.no_grad():
        want = model(x)
    for fmt, name in (("onnx", "model.onnx"), ("pt2", "model.pt2"),
                      ("torchscript", "model.torchscript.pt")):
        assert _run("export", run, "--format", fmt) == 0, fmt
        assert (run / name).is_file()
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": x.numpy()})
    assert abs(torch.from_numpy(got) - want).max() < 1e-3 * max(1.0, float(want.abs().max()))
    assert torch.allclose(torch.export.load(str(run / "model.pt2")).module()(x), want,
                          atol=1e-4)
    assert _run("export", run, "--format", "hf", "--out", tmp_path / "hub") == 0
    assert torch.allclose(load_model(tmp_path / "hub")(x), want, atol=1e-5)
    assert _run("report", run) == 0 and (run / "widths.png").is_file()
    capsys.readouterr()
    assert _run("flops", run / "shape.json", "--json") == 0
    assert json.loads(capsys.readouterr().out)["flops"] == summary["flops_pruned"]
    assert _run("flops", net, "--resolution", "14", "--in-channels", "1") == 0
    assert "FLOPs (MACs)" in capsys.readouterr().out

    # the search alone: from the teacher, under a latency and a parameter budget, resumed
    teacher = run / "teacher"
    search = ["search", "--model", net, *data, "--teacher", teacher, "--epochs", "1",
              "--batch-size", "64", "--latency-ratio", "0.5", "--latency-batch-sizes", "1",
              "--params-ratio", "0.6", "--quiet", "--out", tmp_path / "search"]
    assert _run(*search) == 0
    derive = [json.loads(line) for line in (tmp_path / "search/metrics.jsonl").open()][-1]
    assert set(derive["budgets"]) == {"params", "latency@1"}
    assert all(b["ratio"] <= b["target"] + 1e-9 for b in derive["budgets"].values())
    shape = (tmp_path / "search/shape.json").read_text()
    assert _run(*search, "--resume") == 0
    assert (tmp_path / "search/shape.json").read_text() == shape
    coupled = ["search", "--model", net, *data, "--teacher", teacher, "--epochs", "1",
               "--batch-size", "64", "--flops-ratio", "0.5", "--quiet"]
    assert _run(*coupled, "--couple-residual", "--out", tmp_path / "coupled") == 0
    assert _run(*coupled, "--no-couple-residual", "--out", tmp_path / "free") == 0
    free = json.loads((tmp_path / "free/shape.json").read_text())
    assert free["free_shortcuts"] is True
    assert json.loads((tmp_path / "coupled/shape.json").read_text())["free_shortcuts"] is False
    if net == "resnet20":  # the built-in blocks open their shortcuts: more groups
        assert len(free["groups"]) > len(json.loads(
            (tmp_path / "coupled/shape.json").read_text())["groups"])

    # training: the searched shape from its teacher, the unpruned network from weights
    assert _run("train", "--shape", tmp_path / "search/shape.json", "--teacher", teacher,
                "--inherit", *data, "--epochs", "1", "--batch-size", "64", "--quiet",
                "--out", tmp_path / "train") == 0
    trained = load_model(tmp_path / "train")
    assert shape_of(trained).to_dict()["groups"] == json.loads(shape)["groups"]
    weights = tmp_path / "teacher.pt"
    torch.save(load_model(teacher).state_dict(), weights)
    assert _run("train", "--model", net, "--weights", weights, *data, "--epochs", "1",
                "--batch-size", "64", "--quiet", "--out", tmp_path / "full") == 0

    # the baselines, from the same teacher
    for method in ("uniform", "l1", "random"):
        out = tmp_path / method
        assert _run("baseline", "--method", method, "--model", net, *data, "--teacher",
                    teacher, "--flops-ratio", "0.5", "--out", out, *TINY) == 0, method
        result = json.loads((out / "summary.json").read_text())
        assert result["flops_pruned"] <= 0.5 * result["flops_full"] and result["method"] == method
