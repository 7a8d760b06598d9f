import math

import pytest
import torch

from helpers import brightness_bundle, space_from, supernet_from
from tasprune import Shape, count_flops
from tasprune._io import read_jsonl
from tasprune.checkpoint import load_checkpoint
from tasprune.data.source import DataBundle
from tasprune.export import read_shape
from tasprune.tas import searcher
from tasprune.tas.budgets import check_budget
from tasprune.tas.cost import flop_loss, supernet_expected_flops, supernet_flop_loss
from tasprune.tas.searcher import SearchConfig, search

pytestmark = pytest.mark.usefixtures("one_thread")



def _data(n: int = 96, **kwargs) -> DataBundle:
    return brightness_bundle(n, **kwargs)


def _full(name: str = "resnet8") -> Shape:
    return Shape.full(name, num_classes=4, resolution=8)


def _config(**kw) -> SearchConfig:
    base = dict(flops_ratio=0.5, epochs=3, batch_size=16, device="cpu", seed=0)
    return SearchConfig(**{**base, **kw})


def test_flop_loss_sign_and_zero_band():
    full, ratio, tol = 1000, 0.5, 0.05  # target 500, band [450, 500]
    for current, direction in ((600, 1), (501, 1), (500, 0), (450, 0), (449, -1), (100, -1)):
        expected = torch.tensor(300.0, dtype=torch.float64, requires_grad=True)
        fl = flop_loss(expected, current, full, ratio, tol)
        assert fl.direction == direction
        if direction == 0:
            assert fl.loss.item() == 0 and not fl.loss.requires_grad
            continue
        fl.loss.backward()
        assert fl.loss.item() == pytest.approx(direction * math.log(300.0))
        # gradient descent on the loss moves E[F] down above the target, up below the band
        assert math.copysign(1, -expected.grad.item()) == -direction


def test_expected_flops_follow_the_logits():
    net = supernet_from(_full("resnet14"))
    full = count_flops(net.space.full)
    start = supernet_expected_flops(net).item()
    assert count_flops(net.space.smallest()) < start < full
    opt = torch.optim.Adam(net.arch_parameters(), lr=0.1)
    assert supernet_flop_loss(net, ratio=0.2).direction == 1  # argmax above 20% of the FLOPs
    steps = 0
    while (fl := supernet_flop_loss(net, ratio=0.2, tolerance=0.05)).direction == 1:
        opt.zero_grad()
        fl.loss.backward()
        opt.step()
        steps += 1
        assert steps < 100, "the FLOP loss never brought the argmax shape down to the target"
    assert supernet_expected_flops(net).item() < start
    assert count_flops(net.derive()) <= 0.2 * full


def test_impossible_budgets_are_refused_with_the_smallest_ratio():
    space = space_from(_full())
    low = space.min_flops_ratio()
    for ratio in (0.0, -0.5, 1.5, low / 2):
        with pytest.raises(ValueError, match="smallest shape") as err:
            check_budget(space, ratio)
        assert f"{low:.4f}" in str(err.value)
    check_budget(space, 0.5)
    with pytest.raises(ValueError, match="smallest shape"):
        search(_full(), _data(), _config(flops_ratio=low / 2), "/nonexistent/never-written")


def test_config_validation_messages():
    with pytest.raises(ValueError, match="flops_ratio"):
        SearchConfig(flops_ratio=0)
    with pytest.raises(ValueError, match="batch_size"):
        SearchConfig(batch_size=0)
    with pytest.raises(ValueError, match="tau_min"):
        SearchConfig(tau_min=6.0)
    with pytest.raises(ValueError, match="betas"):
        SearchConfig(arch_betas=(0.5, 1.5))
    with pytest.raises(ValueError, match="tau_schedule"):
        SearchConfig(tau_schedule="step")
    with pytest.raises(ValueError, match="batch size 64 is larger"):
        search(_full(), _data(n=40), _config(batch_size=64), "/nonexistent/never-written")
    with pytest.raises(ValueError, match="10 classes"):
        search(Shape.full("resnet8", resolution=8), _data(), _config(), "/nonexistent/x")


def test_search_writes_its_run_directory(tmp_path):
    result = search(_full("resnet14"), _data(), _config(epochs=3), tmp_path, quiet=True)
    assert read_shape(tmp_path / "shape.json") == result.shape
    assert result.flops == count_flops(result.shape)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    search_lines = [r for r in records if r["phase"] == "search"]
    assert [r["epoch"] for r in search_lines] == [1, 2, 3]
    # tau is annealed per step after the weight-only warm-up; the record has the last one
    assert 0.1 < search_lines[0]["tau"] < 5.0
    assert search_lines[-1]["tau"] == pytest.approx(0.1)
    assert search_lines[0]["lr"] == pytest.approx(0.03)
    assert search_lines[-1]["lr"] < search_lines[0]["lr"]
    steps = 48 // 16  # per epoch: halves of 48 images, batch 16
    warmup = int(0.2 * 3 * steps)
    assert [r["arch_steps"] for r in search_lines] == [steps - warmup, steps, steps]
    assert search_lines[0]["arch_lr"] == pytest.approx(0.05 * 150 / (3 * steps - warmup))
    for key in ("train_loss", "valid_acc", "expected_flops", "argmax_flops", "width_entropy",
                "depth_entropy", "images_per_s", "flop_loss", "subnet_acc"):
        assert all(math.isfinite(r[key]) for r in search_lines), key
    assert all(0 <= r["subnet_acc"] <= 1 and "teacher_acc" not in r for r in search_lines)
    assert search_lines[-1]["argmax_flops"] == result.argmax_flops
    derive = records[-1]
    assert derive["phase"] == "derive" and derive["in_band"] == result.in_band
    assert derive["flops"] == result.flops and derive["target_ratio"] == 0.5
    state = load_checkpoint(tmp_path / "search.pt")
    assert state["epoch"] == 3 and {"supernet", "w_optimizer", "a_optimizer", "w_scheduler",
                                    "rng", "config"} <= set(state)


@pytest.mark.slow
@pytest.mark.parametrize("relaxation, seed", [("expected", 0), ("expected", 1), ("gumbel", 0)])
@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_the_search_ends_in_the_band_with_the_expected_flops_near_it(tmp_path, relaxation,
                                                                     seed, ratio):
    # The derived shape is in the band by construction (argmax, or moved into the band);
    # the expected FLOPs get there by the FLOP loss (measured over 4 seeds at the end of
    # this search: 0.246-0.298 for the 0.3 target and 0.465-0.493 for 0.5; the paper's
    # gumbel relaxation, noisier, 0.25-0.37 and 0.41-0.51 over 4 and 14 seeds).
    cfg = _config(epochs=6, batch_size=8, flops_ratio=ratio, seed=seed, relaxation=relaxation)
    result = search(_full("resnet14"), _data(seed=seed), cfg, tmp_path, quiet=True)
    assert result.in_band and result.flops <= ratio * result.full_flops
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert lines[-1]["in_band"] is True
    assert lines[-1]["adjusted"] == (lines[-1]["argmax_flops"] != result.flops)
    slack = 0.02 if relaxation == "expected" else 0.08
    assert ratio - 0.1 <= lines[-2]["expected_ratio"] <= ratio + slack
    assert lines[-2]["width_entropy"] < 0.5 * lines[-2]["width_entropy_max"]


def _strip(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")}
            for r in records]


def test_same_seed_same_result_and_resume_is_exact(tmp_path, monkeypatch):
    cfg = _config(epochs=4)
    data = _data()
    a = search(_full("resnet14"), data, cfg, tmp_path / "a", quiet=True)
    b = search(_full("resnet14"), data, cfg, tmp_path / "b", quiet=True)
    assert a.shape == b.shape
    assert _strip(read_jsonl(tmp_path / "a/metrics.jsonl")) == _strip(
        read_jsonl(tmp_path / "b/metrics.jsonl"))

    real_epoch = searcher.search_epoch

    def crash_at_epoch_2(loop, epoch, quiet=False):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(loop, epoch, quiet)

    monkeypatch.setattr(searcher, "search_epoch", crash_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        search(_full("resnet14"), data, cfg, tmp_path / "c", quiet=True)
    assert load_checkpoint(tmp_path / "c/search.pt")["epoch"] == 2
    monkeypatch.setattr(searcher, "search_epoch", real_epoch)
    with pytest.raises(ValueError, match="--resume"):
        search(_full("resnet14"), data, cfg, tmp_path / "c", quiet=True)
    with pytest.raises(ValueError, match="other search settings"):
        search(_full("resnet14"), data, _config(epochs=5), tmp_path / "c", resume=True)
    c = search(_full("resnet14"), data, cfg, tmp_path / "c", resume=True, quiet=True)
    assert c.shape == a.shape
    assert _strip(read_jsonl(tmp_path / "c/metrics.jsonl")) == _strip(
        read_jsonl(tmp_path / "a/metrics.jsonl"))
    sa = load_checkpoint(tmp_path / "a/search.pt")["supernet"]
    sc = load_checkpoint(tmp_path / "c/search.pt")["supernet"]
    assert all(torch.equal(sa[k], sc[k]) for k in sa)
