import importlib.util

import pytest
import torch

from tasprune import Shape, build_model, load_pruned
from tasprune.checkpoint import CheckpointError, save_checkpoint
from tasprune.export import export_onnx, export_torchscript, save_pruned


def _pruned(seed=0):
    full = Shape.full("resnet14", num_classes=4, in_channels=1, resolution=12)
    gen = torch.Generator().manual_seed(seed)
    widths = [max(1, int(w * 0.5) + int(torch.randint(0, 3, (1,), generator=gen)))
              for w in full.widths]
    torch.manual_seed(seed)
    model = build_model(full.replace(widths=tuple(widths), blocks=(1, 2, 1)))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _x(n=3):
    return torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(7))


def test_save_and_load_pruned_round_trip(tmp_path):
    model = _pruned()
    weights = save_pruned(tmp_path / "run", model)
    assert weights.name == "model.safetensors" and (tmp_path / "run/shape.json").is_file()
    assert Shape.load(tmp_path / "run/shape.json") == model.shape
    with torch.no_grad():
        expected = model(_x())
        for path in (tmp_path / "run", weights):
            loaded = load_pruned(path)
            assert loaded.shape == model.shape and not loaded.training
            assert torch.equal(loaded(_x()), expected)
    # the weights file alone carries its shape (metadata)
    (tmp_path / "run/shape.json").unlink()
    assert load_pruned(weights).shape == model.shape


def test_load_pruned_reads_training_checkpoints(tmp_path):
    model = _pruned()
    save_checkpoint(tmp_path / "best.pt", {"model": model.state_dict(),
                                           "shape": model.shape.to_dict()})
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "best.pt")(_x()), model(_x()))
    save_checkpoint(tmp_path / "other.pt", {"weights": model.state_dict()})
    with pytest.raises(CheckpointError, match="not a tasprune training checkpoint"):
        load_pruned(tmp_path / "other.pt")


def test_mismatched_weights_name_the_first_bad_layer(tmp_path):
    model = _pruned(0)
    other = _pruned(1)  # other widths, same layer names
    save_checkpoint(tmp_path / "x.pt", {"model": other.state_dict(),
                                        "shape": model.shape.to_dict()})
    with pytest.raises(CheckpointError, match=r"layer 'conv1.weight' has shape .* different "
                                              r"model or shape"):
        load_pruned(tmp_path / "x.pt")
    state = model.state_dict()
    state.pop("fc.bias")
    save_checkpoint(tmp_path / "y.pt", {"model": state, "shape": model.shape.to_dict()})
    with pytest.raises(CheckpointError, match="no weights for layer 'fc.bias'"):
        load_pruned(tmp_path / "y.pt")


def test_load_pruned_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_pruned(tmp_path / "missing.safetensors")
    (tmp_path / "run").mkdir()
    (tmp_path / "run/train.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no model.safetensors.*train.pt"):
        load_pruned(tmp_path / "run")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="bad.safetensors: not a readable"):
        load_pruned(tmp_path / "bad.safetensors")


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_export_matches(tmp_path):
    model = _pruned()
    path = export_torchscript(model, tmp_path / "m.pt")
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        assert torch.allclose(loaded(_x(5)), model(_x(5)), atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None
                    or importlib.util.find_spec("onnx") is None,
                    reason="needs onnx and onnxruntime")
def test_onnx_runtime_matches_pytorch(tmp_path):
    import onnxruntime as ort

    model = _pruned()
    path = export_onnx(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    for n in (1, 5):  # the batch axis is dynamic
        x = _x(n)
        (out,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            expected = model(x).numpy()
        assert out.shape == expected.shape
        assert abs(out - expected).max() < 1e-4
