import copy
import importlib.util

import pytest
import torch
from torch import nn

from tasprune import Shape, build_model, create_model, paper_shape
from tasprune.deploy import OnnxRuntimeTarget, fold_batchnorm, onnxruntime_missing
from tasprune.export import export_onnx
from tasprune.latency import LatencyConfig, paired_latency

HAS_ORT = all(importlib.util.find_spec(p) is not None
              for p in ("onnxruntime", "onnx", "onnxscript"))


def _trained_like(shape: Shape, seed: int = 0) -> nn.Module:
    """A model whose BN layers hold statistics estimated on data and affine parameters away
    from their initial values (folding the initial ones is nearly the identity and would
    prove little). The last BN of every block scales down, as in trained ResNets; without
    that a deep random net amplifies float32 rounding past any fixed tolerance."""
    torch.manual_seed(seed)
    model = build_model(shape)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.momentum = None  # running statistics = the average over the batches
            if hasattr(m, "downsample"):  # a residual block
                getattr(m, "bn3", m.bn2).weight.uniform_(0.05, 0.3)
        model.train()
        for _ in range(2):
            model(torch.randn(8, shape.in_channels, shape.resolution, shape.resolution))
    return model.eval()


SHAPES = {
    "cifar-basic-pruned": lambda: paper_shape("C010-ResNet20").replace(resolution=16),
    "cifar-basic-full": lambda: Shape.full("resnet20", resolution=16),
    "cifar-bottleneck-pruned": lambda: paper_shape("C100-ResNet164").replace(resolution=16),
    "imagenet-basic-pruned": lambda: paper_shape("ImageNet-ResNet18V1").replace(
        resolution=64, num_classes=10),
    "imagenet-bottleneck-pruned": lambda: paper_shape("ImageNet-ResNet50V1").replace(
        resolution=64, num_classes=10),
    "imagenet-basic-full": lambda: Shape.full("resnet18", resolution=64, num_classes=10),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_folded_model_matches_the_unfolded_one(name, one_thread):
    shape = SHAPES[name]()
    model = _trained_like(shape)
    model.train()
    folded = fold_batchnorm(model)
    assert model.training  # the original is left as it was
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(m.bias is not None for m in folded.modules() if isinstance(m, nn.Conv2d)) == n_bn
    assert not folded.training and not any(p.requires_grad for p in folded.parameters())
    assert folded.tasprune_shape == model.tasprune_shape
    x = torch.randn(2, shape.in_channels, shape.resolution, shape.resolution,
                    generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.eval()(x)
        got = folded(x)
        exact = copy.deepcopy(model).double()(x.double())
    if shape.block == "basic":
        assert (got - expected).abs().max() <= 1e-5
    else:
        # the deep bottleneck nets (ResNet-164: 54 blocks) carry float32 rounding errors
        # above 1e-5 in the unfolded model already; the folded one must not add to them
        own = (expected.double() - exact).abs().max()
        assert (got.double() - exact).abs().max() <= max(1e-5, 2 * own)


@pytest.mark.parametrize("name", ["cifar-bottleneck-pruned", "imagenet-basic-pruned"])
def test_folding_is_exact_in_float64(name, one_thread):
    shape = SHAPES[name]()
    model = _trained_like(shape).double()
    folded = fold_batchnorm(model)
    assert all(p.dtype == torch.float64 for p in folded.parameters())
    x = torch.randn(2, shape.in_channels, shape.resolution, shape.resolution,
                    dtype=torch.float64)
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max() < 1e-9


def test_cifar_strided_shortcut_without_bn_is_kept():
    model = _trained_like(Shape.full("resnet8", resolution=8))
    projections = [m for m in model.modules() if hasattr(m, "pool") and hasattr(m, "conv")]
    assert any(isinstance(p.bn, nn.Identity) for p in projections)  # the case exists
    folded = fold_batchnorm(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_a_batchnorm_after_no_conv_stays_and_zoo_networks_fold():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    folded = fold_batchnorm(model)
    assert isinstance(folded[2], nn.BatchNorm2d)
    assert torch.equal(folded[0].weight, model[0].weight)
    for name in ("mobilenet_v2", "efficientnet_b0", "densenet121"):
        torch.manual_seed(0)
        net = create_model(name, num_classes=5, in_channels=3, resolution=16).eval()
        folded = fold_batchnorm(net)
        left = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        # DenseNet normalises concatenations before its convs (58 dense layers, 3
        # transitions and norm5): those stay; every BN after a conv folds
        assert left == (62 if name == "densenet121" else 0)
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            want = net(x)
            assert torch.allclose(folded(x), want, atol=1e-4 * float(want.abs().max()))


@pytest.mark.skipif(not HAS_ORT, reason="needs onnx, onnxscript and onnxruntime")
def test_onnx_export_is_folded_and_matches_pytorch(tmp_path, one_thread):
    import onnx

    shape = paper_shape("C010-ResNet20").replace(resolution=16)
    model = _trained_like(shape)
    path = export_onnx(model, tmp_path / "m.onnx")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    target = OnnxRuntimeTarget(path)
    session = target.session(1)
    for n in (1, 3):
        x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(n))
        (out,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            expected = model(x).numpy()
        assert abs(out - expected).max() < 1e-4
    result = paired_latency({"torch": fold_batchnorm(model), "ort": target}, (3, 16, 16),
                            LatencyConfig(batch_sizes=(1, 2), warmup=1, repeats=2,
                                          min_repeats=1, rounds=2, threads=1))
    assert set(result.ms("ort")) == {1, 2} and result.threads == 1
    assert all(s.median > 0 for s in result.speedup("torch", "ort").values())


def test_onnxruntime_missing_names_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert onnxruntime_missing() == ("onnxruntime is not installed "
                                     "(pip install 'tasprune[dev]')")


def _tiny_config(**kwargs):
    return LatencyConfig(**{"batch_sizes": (1,), "warmup": 0, "repeats": 1, "min_repeats": 1,
                            "rounds": 2, **kwargs})


def test_latency_report_says_why_onnxruntime_was_skipped(monkeypatch, one_thread):
    import tasprune.evaluation as evaluation

    full = Shape.full("resnet8", resolution=8)
    model = build_model(full.replace(widths=tuple(max(1, w // 2) for w in full.widths)))
    monkeypatch.setattr(evaluation, "onnxruntime_missing", lambda: "onnx is not installed")
    out = evaluation.latency_report(model, (3, 8, 8), _tiny_config(), dense=build_model(full),
                                    name="pruned")
    assert set(out["ms"]) == {"dense", "pruned", "folded"} and out["baseline"] == "dense"
    assert set(out["speedup"]) == {"pruned", "folded"}
    assert out["onnxruntime_skipped"] == "onnx is not installed"
    lines = evaluation.latency_lines(out)
    assert lines[0].startswith(f"CPU latency, {out['threads']} threads, 2 rounds")
    assert "speed-up vs unpruned" in lines[1] and "folded BN, PyTorch" in lines[-2]
    assert lines[-1] == "  ONNX Runtime skipped: onnx is not installed"

    def broken(*args, **kwargs):
        raise RuntimeError("exporter says no\nwith a long trace")

    monkeypatch.setattr(evaluation, "onnxruntime_missing", lambda: None)
    monkeypatch.setattr(evaluation, "export_onnx", broken)
    out = evaluation.latency_report(model, (3, 8, 8), _tiny_config())
    assert out["onnxruntime_skipped"] == "the ONNX export or session failed: exporter says no"
    assert set(out["ms"]) == {"model", "folded"} and out["baseline"] == "model"
    out = evaluation.latency_report(model, (3, 8, 8), _tiny_config(deploy=False))
    assert set(out["ms"]) == {"model"} and "latency.deploy=false" in out["onnxruntime_skipped"]
