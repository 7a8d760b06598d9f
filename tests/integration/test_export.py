import importlib.util

import pytest
import torch
from safetensors.torch import save_file

from helpers import example_input, pruned_model
from tasprune import Shape, load_pruned
from tasprune.checkpoint import CheckpointError, save_checkpoint
from tasprune.export import export_onnx, export_torchscript, read_shape, save_pruned
from tasprune.models.network import from_view
from tasprune.net.surgery import shape_of


def test_save_and_load_pruned_round_trip(tmp_path):
    model = pruned_model()
    weights = save_pruned(tmp_path / "run", model)
    assert weights.name == "model.safetensors" and (tmp_path / "run/shape.json").is_file()
    assert read_shape(tmp_path / "run/shape.json") == shape_of(model)
    with torch.no_grad():
        expected = model(example_input())
        for path in (tmp_path / "run", weights):
            loaded = load_pruned(path)
            assert shape_of(loaded) == shape_of(model) and not loaded.training
            assert torch.equal(loaded(example_input()), expected)
    # the weights file alone carries its shape (metadata)
    (tmp_path / "run/shape.json").unlink()
    assert shape_of(load_pruned(weights)) == shape_of(model)


def test_a_shape_file_of_an_earlier_version_still_loads(tmp_path):
    """A built-in ResNet's shape.json of earlier versions (format tasprune.shape) with its
    weights: the same network, the same function."""
    model = pruned_model()
    view = Shape.full("resnet14", num_classes=4, in_channels=1, resolution=12)
    widths = shape_of(model).group_widths()
    plan = shape_of(model).plan
    slots = [widths[plan.layer(n).writes] for n in ["conv1"] + [
        f"layer{s}.{b}.conv{j}" for s in (1, 2, 3) for b in (0, 1) for j in (1, 2)]]
    old = view.replace(widths=tuple(slots), blocks=(1, 2, 1))
    assert from_view(old) == shape_of(model)
    (tmp_path / "old").mkdir()
    old.save(tmp_path / "old/shape.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "old/model.safetensors"))
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "old")(example_input()),
                           model(example_input()))


def test_load_pruned_reads_training_checkpoints(tmp_path):
    model = pruned_model()
    save_checkpoint(tmp_path / "best.pt", {"model": model.state_dict(),
                                           "shape": shape_of(model).to_dict()})
    with torch.no_grad():
        x = example_input()
        assert torch.equal(load_pruned(tmp_path / "best.pt")(x), model(x))
    save_checkpoint(tmp_path / "other.pt", {"weights": model.state_dict()})
    with pytest.raises(CheckpointError, match="not a tasprune training checkpoint"):
        load_pruned(tmp_path / "other.pt")


def test_mismatched_weights_name_the_first_bad_layer(tmp_path):
    model = pruned_model(0)
    other = pruned_model(1)  # other widths, same layer names
    save_checkpoint(tmp_path / "x.pt", {"model": other.state_dict(),
                                        "shape": shape_of(model).to_dict()})
    with pytest.raises(CheckpointError, match=r"layer 'conv1.weight' has shape .* different "
                                              r"model or shape"):
        load_pruned(tmp_path / "x.pt")
    state = model.state_dict()
    state.pop("fc.bias")
    save_checkpoint(tmp_path / "y.pt", {"model": state, "shape": shape_of(model).to_dict()})
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
    model = pruned_model()
    path = export_torchscript(model, tmp_path / "m.pt")
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        assert torch.allclose(loaded(example_input(5)), model(example_input(5)), atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None
                    or importlib.util.find_spec("onnx") is None,
                    reason="needs onnx and onnxruntime")
def test_onnx_runtime_matches_pytorch(tmp_path):
    import onnxruntime as ort

    model = pruned_model()
    path = export_onnx(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    for n in (1, 5):  # the batch axis is dynamic
        x = example_input(n)
        (out,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            expected = model(x).numpy()
        assert out.shape == expected.shape
        assert abs(out - expected).max() < 1e-4
