import json

import pytest

from tasprune import paper_shape
from tasprune._io import append_jsonl
from tasprune.report import write_report


def _run_dir(tmp_path, search=True, train=True, summary=True, adjusted=False):
    paper_shape("C010-ResNet20").save(tmp_path / "shape.json")
    metrics = tmp_path / "metrics.jsonl"
    if search:
        for e in range(1, 4):
            append_jsonl(metrics, {"phase": "search", "epoch": e, "tau": 5.0 / e,
                                   "train_acc": 0.3 * e, "valid_acc": 0.25 * e,
                                   "expected_ratio": 1 - 0.1 * e, "flops_ratio": 1 - 0.15 * e,
                                   "target_ratio": 0.55, "width_entropy": 2 - 0.4 * e,
                                   "depth_entropy": 1 - 0.2 * e, "width_entropy_max": 2.0,
                                   "depth_entropy_max": 1.0, "subnet_acc": 0.2 * e,
                                   "teacher_acc": 0.8})
        append_jsonl(metrics, {"phase": "derive", "epoch": 3, "flops_ratio": 0.53,
                               "argmax_ratio": 0.6, "adjusted": adjusted,
                               "target_ratio": 0.55, "tolerance": 0.05, "in_band": True,
                               "subnet_acc": 0.61, "teacher_acc": 0.8})
    if train:
        for e in range(1, 3):
            append_jsonl(metrics, {"phase": "train", "epoch": e, "acc": 0.4 * e,
                                   "test_acc": 0.35 * e})
    if summary:
        (tmp_path / "summary.json").write_text(json.dumps({
            "flops_full": 40_813_194, "flops_pruned": 22_444_482, "flops_ratio_target": 0.55,
            "acc_full": 0.92, "acc_pruned": 0.9, "params_full": 272_282,
            "params_pruned": 228_130,
            "latency_ms": {"dense": {"1": 2.0, "64": 50.0}, "pruned": {"1": 1.0, "64": 30.0}}}))
    return tmp_path


def test_full_report(tmp_path):
    path = write_report(_run_dir(tmp_path))
    text = path.read_text()
    for png in ("widths.png", "blocks.png", "flops.png", "tau.png", "accuracy.png"):
        assert (tmp_path / png).stat().st_size > 5000
        assert f"]({png})" in text
    assert "| FLOPs (MACs) | 40.81M | 22.44M | 0.550 (target 0.55) |" in text
    assert "| CPU latency, batch 64 (median) | 50.00 ms | 30.00 ms | 1.67x faster |" in text
    assert "The argmax shape is inside the target band [0.500, 0.550]: 0.530" in text
    assert "(BatchNorm recalibrated, held-out half): 61.00% (teacher 80.00%)" in text
    assert ("The distributions converged (at most half of the uniform entropy counts "
            "as converged): mean width entropy 0.80 nats of at most 2.00; mean depth entropy "
            "0.40 nats of at most 1.00.") in text
    assert "| 3 | 1.67 | 0.700 | 0.550 | 0.80 | 0.40 | 60.00% (80.00%) |" in text
    assert "final test accuracy 70.00%" in text


def test_report_of_a_shape_moved_into_the_band(tmp_path):
    text = write_report(_run_dir(tmp_path, adjusted=True)).read_text()
    assert ("The argmax shape (0.600 of the full FLOPs) was outside the target band "
            "[0.500, 0.550]; the derived shape is the in-band shape closest to the learned "
            "distributions, at 0.530.") in text


def test_report_without_search_skips_search_plots(tmp_path):
    write_report(_run_dir(tmp_path, search=False, summary=False))
    assert not (tmp_path / "flops.png").exists()
    assert (tmp_path / "accuracy.png").exists() and (tmp_path / "widths.png").exists()


def test_report_needs_a_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a tasprune run directory"):
        write_report(tmp_path)
