import pytest
import torch

from helpers import synthetic_bundle
from tasprune import Shape, build_model
from tasprune.data.source import BatchTransform, TensorImages
from tasprune.training.loop import (
    LoopOptions,
    evaluate,
    steps_per_epoch,
    train_drop_last,
    train_one_epoch,
)
from tasprune.training.optim import WarmupCosine, make_sgd


class _RankModel(torch.nn.Module):
    """Reads the label from pixel (0, 0) and ranks the true class at position `rank`."""

    def __init__(self, classes: int, rank: int) -> None:
        super().__init__()
        self.classes, self.rank = classes, rank
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        scores = torch.zeros(len(x), self.classes)
        for i, label in enumerate((x[:, 0, 0, 0] * 255).round().long().tolist()):
            others = [c for c in range(self.classes) if c != label]
            ranking = others[:self.rank] + [label] + others[self.rank:]
            scores[i, ranking] = -torch.arange(self.classes, dtype=torch.float32)
        return scores + 0 * self.dummy


def _labelled(n=20, classes=8):
    labels = torch.arange(n) % classes
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = labels.to(torch.uint8)
    return TensorImages(images, labels), BatchTransform(mean=(0.0,), std=(1.0,), pad=0,
                                                         flip=False)


@pytest.mark.parametrize("rank, top1, top5", [(0, 1.0, 1.0), (2, 0.0, 1.0), (6, 0.0, 0.0)])
def test_evaluate_counts_top1_and_top5(rank, top1, top5):
    source, transform = _labelled()
    out = evaluate(_RankModel(8, rank), source, transform, LoopOptions(batch_size=6, quiet=True))
    assert out["acc"] == pytest.approx(top1) and out["top5"] == pytest.approx(top5)
    assert out["images"] == 20


def test_train_one_epoch_steps_the_schedule_per_batch_and_replays_from_its_seed():
    data = synthetic_bundle(n_train=50, n_test=10)
    shape = Shape.full("resnet8", num_classes=3, in_channels=1, resolution=12)
    results, weights = [], []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(shape)
        opt = make_sgd(model, lr=0.05)
        sched = WarmupCosine(opt, total_steps=10, warmup_steps=2)
        out = train_one_epoch(model, data.train, data.transform, opt,
                              torch.Generator().manual_seed(3),
                              LoopOptions(batch_size=16, quiet=True), scheduler=sched)
        results.append({k: v for k, v in out.items() if k != "images_per_s"})
        weights.append(model.fc.weight.detach().clone())
        # 50 images in batches of 16: the ragged last batch (2 images) is dropped
        assert out["images"] == 48 and sched.last_epoch == steps_per_epoch(50, 16) == 3
    assert results[0] == results[1] and torch.equal(weights[0], weights[1])
    assert set(results[0]) >= {"loss", "task_loss", "kd_loss", "acc", "top5", "lr"}
    assert results[0]["kd_loss"] == 0.0 and results[0]["loss"] == results[0]["task_loss"]


def test_a_last_batch_of_one_image_is_dropped():
    # BatchNorm cannot train on one image: 9 images at batch 8 are one step, not two
    assert train_drop_last(9, 8) and steps_per_epoch(9, 8) == 1
    assert not train_drop_last(10, 8) and steps_per_epoch(10, 8) == 2  # a ragged 2 is kept
    assert train_drop_last(33, 16) and steps_per_epoch(33, 16) == 2
    assert not train_drop_last(8, 8) and steps_per_epoch(8, 8) == 1
    assert not train_drop_last(1, 8) and steps_per_epoch(1, 8) == 1


def test_bf16_autocast_path_runs_on_cpu():
    data = synthetic_bundle(n_train=32, n_test=8)
    model = build_model(Shape.full("resnet8", num_classes=3, in_channels=1, resolution=12))
    opt = make_sgd(model, lr=0.01)
    out = train_one_epoch(model, data.train, data.transform, opt, torch.Generator(),
                          LoopOptions(batch_size=16, amp="bf16", quiet=True))
    assert torch.isfinite(torch.tensor(out["loss"]))
    assert model.conv1.weight.dtype == torch.float32  # autocast leaves the weights alone


def test_loop_options_validation():
    with pytest.raises(ValueError, match="fp16 mixed precision needs a CUDA device"):
        LoopOptions(batch_size=8, amp="fp16")
    with pytest.raises(ValueError, match="amp must be one of"):
        LoopOptions(batch_size=8, amp="half")
    with pytest.raises(ValueError, match="batch size"):
        LoopOptions(batch_size=0)
