import pytest
import torch

from helpers import synthetic_bundle
from tasprune import Shape, load_pruned
from tasprune._io import append_jsonl, read_jsonl
from tasprune.checkpoint import CheckpointError, load_checkpoint
from tasprune.models.network import from_view
from tasprune.net.surgery import shape_of
from tasprune.training import trainer as trainer_module
from tasprune.training.trainer import TrainConfig, train

_VOLATILE = {"images_per_s", "time_s"}  # wall-clock fields differ between runs


def _shape(data, model="resnet8"):
    return Shape.full(model, num_classes=data.num_classes, in_channels=data.in_channels,
                      resolution=data.resolution)


def _config(**kw):
    return TrainConfig(**{"epochs": 3, "batch_size": 16, "quiet": True, **kw})


def _stable(records):
    return [{k: v for k, v in r.items() if k not in _VOLATILE} for r in records]


def test_train_writes_the_run_directory_and_learns(tmp_path):
    data = synthetic_bundle()
    result = train(_shape(data), data, _config(epochs=4), tmp_path)
    for name in ("train.pt", "best.pt", "metrics.jsonl", "model.safetensors", "shape.json",
                 "train_config.yaml"):
        assert (tmp_path / name).is_file(), name
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert all(r["phase"] == "train" and 0 <= r["test_acc"] <= 1 for r in records)
    assert records[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine reaches 0
    assert records[-1]["test_acc"] >= 0.9  # an easy dataset: far above chance (1/3)
    assert result.metrics["flops"] > 0 and result.metrics["best_test_acc"] >= 0.9
    loaded = load_pruned(tmp_path)
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model.eval()(x))
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["test_acc"] == max(r["test_acc"] for r in records)
    ckpt = load_checkpoint(tmp_path / "train.pt")
    assert ckpt["epoch"] == 4 and ckpt["config"]["epochs"] == 4


def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    data = synthetic_bundle()
    config = _config(epochs=3, seed=5)
    straight = train(_shape(data), data, config, tmp_path / "a")

    calls = {"n": 0}
    real = trainer_module.train_one_epoch

    def dies_in_epoch_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # stands in for a kill during the third epoch
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_one_epoch", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train(_shape(data), data, config, tmp_path / "b")
    monkeypatch.setattr(trainer_module, "train_one_epoch", real)
    assert load_checkpoint(tmp_path / "b/train.pt")["epoch"] == 2
    assert not (tmp_path / "b/model.safetensors").exists()
    # a line logged just before the kill, for an epoch the checkpoint does not hold
    append_jsonl(tmp_path / "b/metrics.jsonl", {"phase": "train", "epoch": 3, "loss": 9.0})

    resumed = train(_shape(data), data, config, tmp_path / "b", resume=True)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _stable(read_jsonl(tmp_path / "a/metrics.jsonl")) == \
        _stable(read_jsonl(tmp_path / "b/metrics.jsonl"))


def test_existing_run_needs_resume_and_the_same_settings(tmp_path):
    data = synthetic_bundle(n_train=32, n_test=16)
    train(_shape(data), data, _config(epochs=1), tmp_path)
    with pytest.raises(ValueError, match="already holds a training run.*--resume"):
        train(_shape(data), data, _config(epochs=1), tmp_path)
    with pytest.raises(CheckpointError, match="lr: 0.1 -> 0.05"):
        train(_shape(data), data, _config(epochs=1, lr=0.05), tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="another shape"):
        train(_shape(data, "resnet14"), data, _config(epochs=1), tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="other data"):
        train(_shape(data), synthetic_bundle(n_train=40, n_test=16), _config(epochs=1),
              tmp_path, resume=True)
    # resuming a finished run only re-exports; quiet/device may change
    again = train(_shape(data), data, _config(epochs=1, quiet=False), tmp_path, resume=True)
    assert again.metrics["epoch"] == 1


def test_distillation_run_logs_the_teacher_and_kd_loss(tmp_path):
    data = synthetic_bundle(n_train=48, n_test=24)
    teacher = train(_shape(data, "resnet14"), data, _config(epochs=2), tmp_path / "t").model
    shape = _shape(data, "resnet14")
    pruned = shape.replace(widths=tuple(max(1, w // 2) for w in shape.widths), blocks=(1, 1, 2))
    result = train(pruned, data, _config(epochs=1, inherit=True), tmp_path / "s",
                   teacher=teacher)
    records = read_jsonl(tmp_path / "s/metrics.jsonl")
    assert records[0]["phase"] == "teacher" and 0 <= records[0]["test_acc"] <= 1
    assert records[1]["kd_loss"] > 0 and records[1]["loss"] != records[1]["task_loss"]
    assert shape_of(result.model) == from_view(pruned.replace(resolution=12))
    with pytest.raises(ValueError, match="needs a teacher"):
        train(pruned, data, _config(epochs=1, inherit=True), tmp_path / "s", resume=True)
    with pytest.raises(CheckpointError, match="started without a teacher"):
        train(shape, data, _config(epochs=2), tmp_path / "t", teacher=teacher, resume=True)


def test_input_errors(tmp_path):
    data = synthetic_bundle(n_train=32, n_test=16)
    wrong = Shape.full("resnet8", num_classes=10, in_channels=1, resolution=12)
    with pytest.raises(ValueError, match="10 classes.*3 classes.*for this data"):
        train(wrong, data, _config(), tmp_path)
    with pytest.raises(ValueError, match="needs a teacher"):
        train(_shape(data), data, _config(inherit=True), tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch size"), ({"lr": -1}, "learning rate"),
    ({"warmup_epochs": 3}, "warm-up"), ({"kd_alpha": 2}, "alpha"), ({"amp": "fp8"}, "amp"),
    ({"device": "gpu9"}, "not one tasprune can run on"), ({"eval_every": 0}, "eval_every"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"epochs": 3, **kwargs})


def test_short_runs_shorten_the_warmup():
    assert TrainConfig(epochs=300).warmup() == 5
    assert TrainConfig(epochs=3).warmup() == pytest.approx(0.3)
    assert TrainConfig(epochs=3, warmup_epochs=1).warmup() == 1


def test_kd_alpha_zero_never_runs_the_teacher_in_training(tmp_path, one_thread):
    data = synthetic_bundle()
    teacher = train(_shape(data), data, _config(epochs=1), tmp_path / "t").model
    forwards = []
    teacher.register_forward_pre_hook(lambda m, i: forwards.append(i[0].shape[0]))
    result = train(_shape(data), data, _config(epochs=2, kd_alpha=0.0), tmp_path / "s",
                   teacher=teacher)
    # the teacher ran once over the test split (the "teacher" metrics line), never in training
    assert sum(forwards) == len(data.test)
    records = read_jsonl(tmp_path / "s" / "metrics.jsonl")
    assert [r["phase"] for r in records] == ["teacher", "train", "train"]
    assert all(r["kd_loss"] == 0 and r["loss"] == r["task_loss"] for r in records[1:])
    assert result.metrics["epoch"] == 2
    # with alpha > 0 the teacher does run on every training batch
    forwards.clear()
    train(_shape(data), data, _config(epochs=1, kd_alpha=0.5), tmp_path / "k", teacher=teacher)
    assert sum(forwards) > len(data.test)
