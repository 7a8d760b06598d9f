import pytest
import torch

from helpers import network, synthetic_bundle
from tasprune.net.importance import l1_scores, reorder
from tasprune.tas.health import accuracy, recalibrate_bn, subnet_accuracy
from tasprune.tas.space import SearchSpace
from tasprune.tas.supernet import SuperNet

pytestmark = pytest.mark.usefixtures("one_thread")


def test_recalibration_is_the_plain_average_of_the_batch_statistics():
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 2, 2, generator=gen) * (i + 1) + i for i in range(3)]
    recalibrate_bn(bn, batches)
    means = torch.stack([b.mean((0, 2, 3)) for b in batches])
    variances = torch.stack([b.var((0, 2, 3), unbiased=True) for b in batches])
    assert torch.allclose(bn[0].running_mean, means.mean(0), atol=1e-6)
    assert torch.allclose(bn[0].running_var, variances.mean(0), atol=1e-5)
    assert not bn.training and bn[0].momentum == 0.1


def test_the_full_shape_cut_from_the_supernet_is_the_teacher():
    # A supernet started from a (channel-reordered) teacher: its full shape, recalibrated,
    # gives the teacher's logits and accuracy when the teacher is recalibrated alike.
    data = synthetic_bundle(n_train=64, classes=3, size=8)
    torch.manual_seed(0)
    teacher, plan = network("resnet14", 3, 1, 8)
    full = plan.full()
    x = data.transform(data.train.images[:32])
    teacher.train()
    with torch.no_grad():
        teacher(x)  # non-trivial running statistics
    net = SuperNet(SearchSpace.from_plan(plan), reorder(teacher.eval(), plan,
                                                        l1_scores(teacher, plan)))
    calibrate, held_out = torch.arange(0, 32), torch.arange(32, 64)
    acc = subnet_accuracy(net, full, data, calibrate, held_out, batch_size=16)
    recalibrate_bn(teacher, [data.transform(data.train.images[calibrate[i:i + 16]])
                             for i in (0, 16)])
    assert acc == accuracy(teacher, data, held_out, 16, torch.device("cpu"))
    cut = net.subnet(full)
    recalibrate_bn(cut, [data.transform(data.train.images[calibrate[i:i + 16]])
                         for i in (0, 16)])
    with torch.no_grad():
        probe = data.transform(data.train.images[held_out])
        assert torch.allclose(cut(probe), teacher(probe), atol=1e-4)
