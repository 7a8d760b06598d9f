import pytest
import torch

from tasprune import Shape, build_model
from tasprune.training.inherit import reorder_channels, taylor_importance

pytestmark = pytest.mark.usefixtures("one_thread")


def _teacher(name: str, res: int, seed: int):
    torch.manual_seed(seed)
    model = build_model(Shape.full(name, num_classes=5, in_channels=3, resolution=res))
    with torch.no_grad():  # non-trivial BN parameters and statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _importance(model, x, y):
    return taylor_importance(model, [(x, y)])


@pytest.mark.parametrize("name, res", [("resnet14", 8), ("cifar-resnet11-bottleneck", 8),
                                       ("resnet18", 32), ("resnet50", 32)])
@pytest.mark.parametrize("by", ["l1", "taylor"])
def test_reordering_keeps_the_function(name, res, by):
    teacher = _teacher(name, res, seed=0)
    x, y = torch.randn(4, 3, res, res), torch.arange(4) % 5
    importance = _importance(teacher, x, y) if by == "taylor" else None
    moved = reorder_channels(teacher, importance)
    with torch.no_grad():
        assert torch.allclose(moved(x), teacher(x), atol=1e-5)
    changed = [k for k, v in teacher.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, moved.state_dict()[k])]
    assert len(changed) > 10  # the weights really were permuted


def test_the_first_channels_are_the_most_important():
    teacher = _teacher("resnet14", 8, seed=1)
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 5
    importance = _importance(teacher, x, y)
    moved = reorder_channels(teacher, importance)
    again = _importance(moved, x, y)
    inner = again["layer1.0.conv1"]  # an inner conv is a stream of its own: sorted exactly
    assert torch.all(inner[:-1] >= inner[1:] - 1e-6 * inner.max())
    # a residual stream is sorted by the sum of its writers' normalised scores
    writers = ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    total = sum(again[w] / again[w].sum() for w in writers)
    assert torch.all(total[:-1] >= total[1:] - 1e-6)


def test_taylor_importance_of_a_dead_channel_is_zero():
    teacher = _teacher("resnet14", 8, seed=2)
    with torch.no_grad():
        teacher.layer2[0].bn1.weight[3] = 0
        teacher.layer2[0].bn1.bias[3] = 0
    scores = _importance(teacher, torch.randn(4, 3, 8, 8), torch.arange(4) % 5)
    assert scores["layer2.0.conv1"][3] == 0
    assert set(scores) == {n.removesuffix(".weight") for n in teacher.state_dict()
                           if n.endswith("weight") and "conv" in n}
    assert teacher.conv1.weight.grad is None  # the teacher is left as it was


def test_reordering_needs_the_unpruned_network():
    full = Shape.full("resnet14", num_classes=5, resolution=8)
    pruned = build_model(full.replace(blocks=(1, 2, 2)))
    with pytest.raises(ValueError, match="unpruned"):
        reorder_channels(pruned)
