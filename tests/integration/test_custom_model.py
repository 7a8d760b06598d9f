"""A network of the user's own, end to end: `tasprune prune --model FILE.py:FACTORY` on
the bundled data, the saved model reloaded with the factory, the exports against PyTorch;
and `tasprune.prune_model` from Python."""

import json
import textwrap

import pytest
import torch

from helpers import synthetic_bundle
from tasprune import ModelSpec, load_model, load_pruned_model, prune_model
from tasprune.cli import main
from tasprune.models.registry import load_factory
from tasprune.net.surgery import shape_of
from tasprune.settings import SearchConfig, TrainConfig

USER_FILE = textwrap.dedent('''
    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


    class Net(nn.Module):
        def __init__(self, num_classes, in_channels):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 2, 1, bias=False),
                                      nn.BatchNorm2d(16), nn.ReLU())
            self.stage = nn.Sequential(Block(16), Block(16))
            self.head = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1, bias=False),
                                      nn.BatchNorm2d(32), nn.ReLU(6.0))
            self.fc = nn.Linear(32, num_classes)

        def forward(self, x):
            x = self.head(self.stage(self.stem(x)))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


    def small_net(num_classes=10, in_channels=3):
        return Net(num_classes, in_channels)
''')


@pytest.mark.slow
def test_prune_a_user_file_from_the_command_line(tmp_path, capsys):
    src = tmp_path / "my_models.py"
    src.write_text(USER_FILE)
    out = tmp_path / "run"
    code = main(["prune", "--model", f"{src}:small_net", "--data", "demo", "--flops-ratio",
                 "0.5", "--out", str(out), "--teacher-train-epochs", "1",
                 "--search-epochs", "1", "--train-epochs", "1", "--latency-rounds", "1",
                 "--latency-batch-sizes", "1", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "unpruned" in printed and "report.md" in printed
    for name in ("model.safetensors", "shape.json", "report.md", "summary.json",
                 "metrics.jsonl", "search.pt", "teacher/model.safetensors"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert 0.45 <= summary["flops_pruned"] / summary["flops_full"] <= 0.5
    assert summary["shape"]["model"]["name"] == f"{src}:small_net"
    report = (out / "report.md").read_text()
    assert "| stem.0 | 16 |" in report and "| stage.1 | 2 |" in report
    # the shape names its factory: loading, evaluating and exporting need nothing else
    model = load_model(out)
    assert shape_of(model).count("params") == summary["params_pruned"]
    assert sum(p.numel() for p in model.parameters()) == summary["params_pruned"]
    assert main(["eval", str(out), "--data", "demo", "--no-latency", "--json",
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["acc"] == pytest.approx(summary["acc_pruned"])
    assert main(["export", str(out), "--format", "pt2"]) == 0
    x = torch.rand(2, 1, 28, 28)
    program = torch.export.load(str(out / "model.pt2")).module()
    with torch.no_grad():
        assert torch.allclose(program(x), model(x), atol=1e-4)


@pytest.mark.slow
def test_prune_model_from_python(tmp_path):
    data = synthetic_bundle(n_train=256, n_test=64, classes=4, size=16)
    factory = load_factory("tasprune.models.zoo:concat_net")
    model = factory(num_classes=4, in_channels=1)
    pruned, result = prune_model(model, data, flops_ratio=0.6,
                                 search=SearchConfig(epochs=1, batch_size=32,
                                                     health_images=32),
                                 train=TrainConfig(epochs=1, batch_size=32),
                                 out_dir=tmp_path / "mine", quiet=True)
    assert result.flops <= 0.6 * result.full_flops
    assert result.acc is not None and 0 <= result.acc <= 1
    assert (tmp_path / "mine" / "train.pt").is_file()  # fine-tuned with checkpoints
    with pytest.raises(ValueError, match="pass its factory"):
        load_model(tmp_path / "mine")  # given as a module: the shape names no factory
    again = load_pruned_model(tmp_path / "mine", factory)
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(again(x), pruned.eval()(x))


def test_bad_factory_specs_say_what_is_wrong(tmp_path, capsys):
    assert main(["prune", "--model", f"{tmp_path}/missing.py:net", "--out",
                 str(tmp_path / "r")]) != 0
    assert "no file" in capsys.readouterr().err
    assert main(["prune", "--model", "tasprune.models.zoo:nothing", "--out",
                 str(tmp_path / "r")]) != 0
    assert "no callable 'nothing'" in capsys.readouterr().err


@pytest.mark.slow
def test_search_and_train_phase_by_phase_and_resume(tmp_path, capsys):
    src = tmp_path / "my_models.py"
    src.write_text(USER_FILE)
    spec = f"{src}:small_net"
    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    torch.save(load_factory(spec)(num_classes=10, in_channels=1).state_dict(), weights)
    search = ["search", "--model", spec, "--weights", str(weights), "--data", "demo",
              "--epochs", "1", "--batch-size", "128", "--health-images", "64", "--quiet",
              "--out", str(tmp_path / "s")]
    assert main(search) == 0
    first = json.loads((tmp_path / "s" / "shape.json").read_text())
    assert main([*search, "--resume"]) == 0  # a finished search resumes to the same shape
    assert json.loads((tmp_path / "s" / "shape.json").read_text()) == first
    assert main(["train", "--model", spec, "--weights", str(weights), "--shape",
                 str(tmp_path / "s" / "shape.json"), "--data", "demo", "--epochs", "1",
                 "--quiet", "--out", str(tmp_path / "p")]) == 0
    model = load_model(tmp_path / "p")
    assert sum(p.numel() for p in model.parameters()) < sum(
        p.numel() for p in load_factory(spec)(num_classes=10, in_channels=1).parameters())
    assert "test accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_a_rerun_of_prune_takes_the_teacher_and_the_search_it_made(tmp_path, capsys):
    src = tmp_path / "my_models.py"
    src.write_text(USER_FILE)
    argv = ["prune", "--model", f"{src}:small_net", "--data", "demo", "--flops-ratio", "0.5",
            "--out", str(tmp_path / "run"), "--teacher-train-epochs", "1", "--search-epochs",
            "1", "--train-epochs", "1", "--latency-rounds", "1", "--latency-batch-sizes", "1",
            "--quiet"]
    assert main(argv) == 0
    teacher = (tmp_path / "run" / "teacher" / "model.safetensors").read_bytes()
    shape = (tmp_path / "run" / "shape.json").read_text()
    assert main(argv) == 0
    assert (tmp_path / "run" / "teacher" / "model.safetensors").read_bytes() == teacher
    assert (tmp_path / "run" / "shape.json").read_text() == shape
    metrics = (tmp_path / "run" / "teacher" / "metrics.jsonl").read_text()
    assert metrics.count('"phase": "train"') == 1  # trained once (1 epoch)
    assert (tmp_path / "run" / "config.yaml").is_file()  # a prune run, which a rerun continues
    capsys.readouterr()
    other = [("0.4" if a == "0.5" else a) for a in argv]
    assert main(other) == 2  # other settings: refused before any work
    assert "holds a run with other settings" in capsys.readouterr().err


# torchvision's factories take `weights=` and pass **kwargs to the network, which has no
# in_channels: the stem is adapted to gray data instead
TORCHVISION_STYLE = USER_FILE + textwrap.dedent('''

    class RGBNet(Net):
        def __init__(self, num_classes=1000):
            super().__init__(num_classes, 3)


    def rgb_net(*, weights=None, progress=True, **kwargs):
        return RGBNet(**kwargs)
''')


def test_a_torchvision_style_factory_on_gray_data(tmp_path, capsys, monkeypatch):
    import tasprune.commands._common

    monkeypatch.setattr(tasprune.commands._common, "load_data", lambda *a, **k: DATA)
    src = tmp_path / "tv_like.py"
    src.write_text(TORCHVISION_STYLE)
    factory = f"{src}:rgb_net"
    rgb = load_factory(factory)(num_classes=3)
    weights = tmp_path / "rgb.pt"
    torch.save(rgb.state_dict(), weights)
    out = tmp_path / "run"
    assert main(["train", "--model", factory, "--weights", str(weights), "--data", "demo",
                 "--epochs", "1", "--batch-size", "16", "--lr", "1e-12", "--out", str(out),
                 "--quiet"]) == 0, capsys.readouterr().err
    said = capsys.readouterr().err
    assert said.count("summed over the 3") == 1, said
    model = load_model(out)
    stem = model.stem[0]
    assert stem.in_channels == 1
    # lr ~0: the stem is the RGB one summed over its input channels, as said
    torch.testing.assert_close(stem.weight, rgb.stem[0].weight.sum(1, keepdim=True))
    assert main(["eval", str(out), "--data", "demo", "--no-latency", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["acc"] >= 0


DATA = synthetic_bundle(classes=3, size=16)


def test_a_factory_is_seeded_before_it_is_called():
    """Issue 26: the same seed gives the same initial weights, whatever the global RNG."""
    from tasprune.models.network import full_network

    spec = ModelSpec("tasprune.models.zoo:concat_net", 10, 1, 28)
    states = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        states.append(full_network(spec, seed=0)[0].state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    other = full_network(spec, seed=1)[0].state_dict()
    assert not all(torch.equal(states[0][k], other[k]) for k in states[0])
