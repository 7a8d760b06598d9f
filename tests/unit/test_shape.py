import json

import pytest
import torch

from helpers import hook_flops
from tasprune import (
    Shape,
    build_model,
    count_flops,
    count_params,
    load_shape,
    paper_shape,
    paper_shape_names,
)
from tasprune.models.network import from_view, to_view
from tasprune.models.shape import PAPER_SHAPES_DIR


def test_full_shape_fields():
    s = Shape.full("resnet20")
    assert (s.family, s.block, s.depths, s.blocks) == ("cifar_resnet", "basic", (3, 3, 3),
                                                       (3, 3, 3))
    assert len(s.widths) == 19 and s.widths[0] == 16 and s.widths[-1] == 64
    assert s.is_full
    b = Shape.full("resnet50")
    assert b.widths[1:4] == (64, 64, 256) and b.num_classes == 1000 and b.resolution == 224


def test_json_roundtrip(tmp_path):
    s = Shape.full("resnet8", num_classes=3, in_channels=1, resolution=28)
    s = s.replace(widths=(5,) + s.widths[1:], blocks=(1, 1, 1))
    s.save(tmp_path / "shape.json")
    loaded = Shape.load(tmp_path / "shape.json")
    assert loaded == s
    assert json.loads((tmp_path / "shape.json").read_text())["format"] == "tasprune.shape"


@pytest.mark.parametrize(
    "change, field",
    [
        ({"widths": (16,) * 3}, "Shape.widths"),
        ({"widths": (17,) + Shape.full("resnet8").widths[1:]}, "Shape.widths[0]"),
        ({"widths": (0,) + Shape.full("resnet8").widths[1:]}, "Shape.widths[0]"),
        ({"blocks": (1, 1)}, "Shape.blocks"),
        ({"blocks": (2, 1, 1)}, "Shape.blocks[0]"),
        ({"family": "vgg"}, "Shape.family"),
        ({"block": "dense"}, "Shape.block"),
        ({"num_classes": 0}, "Shape.num_classes"),
        ({"widths": "16"}, "Shape.widths"),
    ],
)
def test_validation_names_the_field(change, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        Shape.full("resnet8").replace(**change)


def test_load_rejects_unknown_fields_and_bad_json(tmp_path):
    data = Shape.full("resnet8").to_dict() | {"depth": 3}
    (tmp_path / "a.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown shape field"):
        Shape.load(tmp_path / "a.json")
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(ValueError, match="b.json: not valid JSON"):
        Shape.load(tmp_path / "b.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Shape.load(tmp_path / "missing.json")


def test_a_searched_shape_file_is_read_by_load_shape(tmp_path):
    view = Shape.full("resnet14", num_classes=3, in_channels=1, resolution=28)
    view = view.replace(widths=(5,) + view.widths[1:], blocks=(1, 2, 1))
    from_view(view).save(tmp_path / "shape.json")
    with pytest.raises(ValueError, match="searched shape.*tasprune.load_shape"):
        Shape.load(tmp_path / "shape.json")
    assert to_view(load_shape(str(tmp_path / "shape.json"))) == view


def test_all_twelve_paper_shapes_load_build_and_count():
    names = paper_shape_names()
    assert len(names) == 12
    for name in names:
        shape = paper_shape(name)
        # count and run at a CPU-friendly size: the count is a formula of the resolution
        small = shape.replace(resolution=32 if shape.family == "imagenet_resnet" else 16)
        model = build_model(small).eval()
        x = torch.randn(1, 3, small.resolution, small.resolution)
        assert model(x).shape == (1, shape.num_classes)
        assert count_flops(small) == hook_flops(model, x), name
        assert count_params(shape) == sum(p.numel() for p in model.parameters())


# FLOPs and params of the published shapes, as the per-ResNet walker of earlier versions
# counted them (and as the hook counter of the test above agrees at small sizes)
_PINNED = {
    "C010-ResNet110": (119_259_268, 795_864), "C010-ResNet164": (178_071_234, 1_280_969),
    "C010-ResNet20": (22_444_482, 228_130), "C010-ResNet32": (34_945_354, 320_539),
    "C010-ResNet56": (59_858_440, 449_307), "C100-ResNet110": (119_578_384, 843_653),
    "C100-ResNet164": (171_143_892, 1_327_338), "C100-ResNet20": (22_433_892, 241_237),
    "C100-ResNet32": (42_468_708, 427_330), "C100-ResNet56": (61_233_936, 470_977),
    "ImageNet-ResNet18V1": (1_210_758_120, 11_275_098),
    "ImageNet-ResNet50V1": (2_309_249_169, 18_624_362),
}


@pytest.mark.parametrize("name", sorted(_PINNED))
def test_paper_shapes_are_exact_in_the_plan(name):
    """A published shape read into the layer plan keeps every width and depth: the view
    comes back unchanged, and the counts are the pinned ones."""
    view = paper_shape(name)
    shape = from_view(view)
    assert to_view(shape) == view
    assert (shape.count("flops"), shape.count("params")) == _PINNED[name]


def test_paper_shape_fields():
    s = paper_shape("C010-ResNet20")
    assert s.blocks == (3, 3, 3) and s.widths[:3] == (16, 6, 4) and s.num_classes == 10
    r50 = paper_shape("ImageNet-ResNet50V1")
    assert r50.blocks == (3, 4, 5, 3) and r50.block == "bottleneck"
    # the paper reports ~2.3 GFLOPs for its ResNet-50 shape
    assert 2.2e9 < count_flops(r50) < 2.4e9


def test_tas_config_roundtrip(tmp_path):
    for name in ("C100-ResNet164", "ImageNet-ResNet18V1"):
        s = paper_shape(name)
        text = s.to_tas_config(count_flops(s), tmp_path / "x.config")
        assert f'"{count_flops(s) / 1e6:.6f}"' in text  # the count of the network it builds
        again = Shape.from_tas_config(tmp_path / "x.config")
        assert again == s
        assert Shape.load(tmp_path / "x.config") == s


def test_tas_config_errors(tmp_path):
    raw = json.loads((PAPER_SHAPES_DIR / "C010-ResNet20.config").read_text())
    raw["depth"] = ["int", "21"]
    (tmp_path / "bad.config").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="bad.config: not a valid TAS shape config: depth 21"):
        Shape.from_tas_config(tmp_path / "bad.config")
    del raw["xchannels"]
    (tmp_path / "bad2.config").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="missing key 'xchannels'"):
        Shape.from_tas_config(tmp_path / "bad2.config")
