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


def _paired_summary():
    """A summary as `prune` writes it now: a paired measurement with ORT skipped."""
    from tasprune.latency import PairedLatency

    paired = PairedLatency(threads=2, rounds=3, device="cpu", round_ms={
        "dense": {1: (2.0, 3.0, 2.2), 64: (50.0, 60.0, 55.0)},
        "pruned": {1: (1.0, 2.0, 1.0), 64: (25.0, 40.0, 50.0)},
        "folded": {1: (0.8, 1.5, 1.1), 64: (20.0, 30.0, 44.0)}}).to_dict(baseline="dense")
    paired["onnxruntime_skipped"] = "onnxruntime is not installed (pip install 'tasprune[dev]')"
    return {"flops_full": 40_813_194, "flops_pruned": 22_444_482, "flops_ratio_target": 0.55,
            "acc_full": 0.92, "acc_pruned": 0.9, "params_full": 272_282,
            "params_pruned": 228_130, "latency_threads": 2, "latency": paired,
            "latency_ms": {n: {b: s["median"] for b, s in rows.items()}
                           for n, rows in paired["ms"].items()}}


def test_report_of_paired_latency(tmp_path):
    run = _run_dir(tmp_path, summary=False)
    (run / "summary.json").write_text(json.dumps(_paired_summary()))
    text = write_report(run).read_text()
    # speed-up: median of the per-round ratios 2.0, 1.5, 2.2 (not 2.2 / 1.0)
    assert ("| CPU latency, batch 1 | 2.20 ms [2.00, 3.00] | 1.00 ms [1.00, 2.00] | "
            "2.00x faster [1.50, 2.20] |") in text
    # ratios 2.0, 1.5, 1.1
    assert ("| CPU latency, batch 64 | 55.00 ms [50.00, 60.00] | 40.00 ms [25.00, 50.00] | "
            "1.50x faster [1.10, 2.00] |") in text
    assert "| folded BN, PyTorch, batch 1 | | 1.10 ms [0.80, 1.50] | 2.00x faster [2.00, 2.50] |" \
        in text
    assert ("Latency: 2 threads, 3 rounds alternating the models; ms = median of the round "
            "medians [min, max]; speed-up = median of the per-round ratios unpruned / pruned "
            "[min, max]. ONNX Runtime skipped: onnxruntime is not installed") in text


def test_terminal_summary_paired_and_old():
    from tasprune.report import format_summary

    text = format_summary(_paired_summary())
    assert "2.20 ms [2.00, 3.00]" in text and "2.00x speed-up [1.50, 2.20]" in text
    assert "folded BN, PyTorch, batch 64" in text and "2 threads, 3 rounds" in text
    old = _paired_summary()
    del old["latency"]  # summary.json of a run from before paired timing
    text = format_summary(old)
    assert "1.67x speed-up" not in text and "1.38x speed-up" in text  # 55 / 40
    assert "rounds" not in text


def test_latency_and_params_budgets_are_reported():
    from tasprune.report import _derive_lines, format_summary

    summary = _paired_summary()
    summary["flops_ratio_target"] = None  # a latency budget alone
    summary["budgets"] = {"latency@1": {"ratio": 0.47, "target": 0.5},
                          "params": {"ratio": 0.412, "target": 0.6}}
    text = format_summary(summary)
    assert "(no FLOP budget)" in text
    # measured: 1 / (median of the per-round speed-ups 2.0, 1.5, 2.2) = 0.5
    assert "latency budget, batch 1" in text and "target 0.5: table 0.470, measured 0.500" in text
    assert "params budget" in text and "target 0.6: 0.412" in text
    derive = {"target_ratio": None, "flops_ratio": 0.24, "in_band": True, "adjusted": True,
              "budgets": summary["budgets"]}
    line = _derive_lines(derive)[0]
    assert line.startswith("The derived shape (moved from the argmax shape) meets every budget")
    assert "latency@1 0.470 (target 0.5)" in line
