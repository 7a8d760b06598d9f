import pytest
import torch

from tasprune import Shape, build_model, create_model, list_models


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_builds_and_runs(name):
    # ImageNet nets at 32 px: the forward is the same code, just cheaper on CPU
    model = create_model(name, num_classes=5, resolution=32)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()


def test_one_channel_28px_input():
    model = create_model("resnet20", num_classes=10, in_channels=1, resolution=28)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("name, stages", [("cifar-resnet26", (4, 4, 4)),
                                          ("cifar-resnet29-bottleneck", (3, 3, 3))])
def test_generic_depths(name, stages):
    assert Shape.full(name).depths == stages
    assert create_model(name)(torch.randn(1, 3, 16, 16)).shape == (1, 10)


def test_bad_names_are_clear():
    with pytest.raises(ValueError, match="unknown model 'vgg16'"):
        create_model("vgg16")
    with pytest.raises(ValueError, match="not 6n\\+2"):
        create_model("cifar-resnet21")


def test_pruned_model_uses_shape_widths_and_projections():
    full = Shape.full("resnet8")
    shape = full.replace(widths=(10, 7, 4, 20, 9, 33, 17))  # stem 10 -> block out 4: projection
    model = build_model(shape)
    assert model.layer1[0].conv1.weight.shape == (7, 10, 3, 3)
    assert model.layer1[0].downsample.conv.weight.shape == (4, 10, 1, 1)
    assert model.layer2[0].downsample.conv.weight.shape == (9, 4, 1, 1)
    assert isinstance(model.layer2[0].downsample.bn, torch.nn.Identity)  # CIFAR: no BN at stride 2
    assert model.fc.in_features == 17
    same = full.replace(widths=(16, 7, 16, 20, 9, 33, 17))  # widths equal: identity shortcut
    assert build_model(same).layer1[0].downsample is None


def test_dropped_blocks_are_identities_without_weights():
    shape = Shape.full("resnet20").replace(blocks=(1, 2, 3))
    model = build_model(shape)
    kept = [sum(not isinstance(b, torch.nn.Identity) for b in s) for s in model.stage_modules()]
    assert kept == [1, 2, 3]
    assert not any(k.startswith(("layer1.1.", "layer1.2.", "layer2.2.")) for k in
                   model.state_dict())  # the keys of the blocks kept only, as always
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_list_models_orders_names_without_a_depth_too(monkeypatch):
    from tasprune.models import registry

    monkeypatch.setitem(registry.MODELS, "mobilenet", registry.MODELS["resnet18"])
    names = list_models()
    assert names.index("resnet8") < names.index("resnet20") < names.index("resnet110")
    assert names.index("mobilenet") < names.index("resnet18")  # same family, no depth
