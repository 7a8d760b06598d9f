"""The benchmark scripts' pieces that do not time or train: selection, tables, reuse."""

import importlib.util
import json
from pathlib import Path

import pytest

from helpers import space_of
from tasprune import count_flops
from tasprune._io import read_jsonl
from tasprune.baselines import uniform_shape
from tasprune.latency import LatencyConfig

ROOT = Path(__file__).resolve().parents[2]


def _script(name):
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_latency_selects_paper_shapes_and_compares(one_thread):
    latency = _script("latency")
    assert latency.select_paper(["C010"]) == [f"C010-ResNet{d}" for d in (110, 164, 20, 32, 56)]
    assert latency.select_paper(["C100-ResNet20", "ImageNet-ResNet18V1"]) == [
        "C100-ResNet20", "ImageNet-ResNet18V1"]
    with pytest.raises(SystemExit, match="no published shape matches"):
        latency.select_paper(["C20"])
    full = space_of("resnet8", 10, 3, 8).full
    pruned = uniform_shape(full, 0.5)
    record = latency.compare("r8", pruned, "cpu", LatencyConfig(
        batch_sizes=(1, 2), warmup=0, repeats=1, min_repeats=1, rounds=2, threads=1))
    assert record["flops_ratio"] == count_flops(pruned) / count_flops(full)
    assert record["flops_speedup"] == pytest.approx(1 / record["flops_ratio"])
    lat = record["latency_ms"]
    assert set(lat["dense"]) == set(lat["pruned"]) == {"1", "2"}
    assert record["threads"] == 1 and record["rounds"] == 2
    low, high = record["speedup_spread"]["2"]
    assert low <= record["speedup"]["2"] <= high  # median of the per-round ratios
    low, high = record["latency_spread_ms"]["dense"]["1"]
    assert low <= lat["dense"]["1"] <= high
    assert "| r8 | cpu | " in latency.markdown([record])


def _row(method, seed, acc):
    lat = {"1": 1.0, "64": 10.0}
    return {"method": method, "seed": seed, "acc": acc, "flops": 5e6, "params": 4e4,
            "ratio": 0.5, "latency_ms": lat, "acc_teacher": 0.9, "flops_teacher": 1e7,
            "params_teacher": 8e4, "latency_ms_teacher": lat, "run": "x"}


def test_accuracy_table_and_search_reuse(tmp_path):
    accuracy = _script("accuracy")
    table = accuracy.markdown_table([_row("tas", 0, 0.80), _row("tas", 1, 0.82),
                                     _row("uniform", 0, 0.75)])
    lines = table.splitlines()
    assert lines[2].startswith("| unpruned teacher | - | 90.00 | 10.00 | 1.000 | 80.0 |")
    assert lines[3].startswith("| tas | 2 | 81.00 ± 1.41 | 5.00 ± 0.00 |")
    assert lines[4].startswith("| uniform | 1 | 75.00 | 5.00 |")

    source = tmp_path / "tas-seed3"
    source.mkdir()
    (source / "shape.json").write_text("{}")
    records = [{"phase": "search", "epoch": 1}, {"phase": "train", "epoch": 1}]
    (source / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = tmp_path / "tas-nokd-seed3"
    assert not accuracy.reuse_search(tmp_path, 3, run)  # no derive line: search unfinished
    with open(source / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"phase": "derive", "epoch": 1}) + "\n")
    assert accuracy.reuse_search(tmp_path, 3, run)
    assert [r["phase"] for r in read_jsonl(run / "metrics.jsonl")] == ["search", "derive"]
    assert (run / "shape.json").is_file()
    assert not accuracy.reuse_search(tmp_path, 3, run)  # never over an existing run


def test_accuracy_verdict_and_health_table():
    accuracy = _script("accuracy")
    rows = [_row("tas", s, a) for s, a in ((0, 0.80), (1, 0.82), (2, 0.81))]
    rows += [_row("uniform", s, a) for s, a in ((0, 0.78), (1, 0.79), (2, 0.78))]
    rows += [_row("l1", s, a) for s, a in ((0, 0.70), (1, 0.71))]
    line = accuracy.verdict(rows)
    assert line.startswith("TAS beats the best baseline (uniform)")
    assert "+2.67 pts, larger std 1.00" in line
    close = rows[:3] + [_row("uniform", s, a) for s, a in ((0, 0.80), (1, 0.815), (2, 0.80))]
    assert accuracy.verdict(close).startswith("TAS does not beat")
    assert accuracy.verdict(rows[3:]) is None  # no TAS rows
    rows[0]["health"] = {"subnet_acc": 0.75, "teacher_acc": 0.8, "width_entropy": 0.9,
                         "width_entropy_start": 2.08, "depth_entropy": 0.2,
                         "expected_ratio": 0.49, "flops_ratio": 0.55}
    rows[0].update(adjusted=True, blocks=[3, 2, 2])
    table = accuracy.health_table(rows).splitlines()
    assert len(table) == 3
    assert table[2] == ("| tas-seed0 | 75.0% / 80.0% (0.94x) | 2.08 -> 0.90 | 0.20 | 0.490 | "
                        "0.550 | yes | [3, 2, 2] |")


def test_search_health_reads_a_demo_run(tmp_path):
    health = _script("search_health").health
    records = [{"phase": "search", "epoch": e, "target_ratio": 0.5, "expected_ratio": 0.3 + e / 10,
                "flops_ratio": 0.9 - e / 10, "width_entropy": 2.0 / e, "width_entropy_max": 2.08,
                "depth_entropy": 0.2, "subnet_acc": 0.7, "teacher_acc": 0.8, "seconds": 10.0}
               for e in (1, 2)]
    records.append({"phase": "derive", "tolerance": 0.05, "flops_ratio": 0.49,
                    "adjusted": True, "blocks": [3, 2, 2]})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "summary.json").write_text(json.dumps({"acc_full": 0.78, "acc_pruned": 0.75}))
    out = health(tmp_path, 123.4)
    assert out["expected_ratio"] == 0.5 and out["expected_in_band"]
    assert out["width_entropy"] == 1.0 and out["width_entropy_halved"]
    assert out["subnet_vs_teacher"] == 0.875 and out["search_seconds"] == 20.0
    assert (out["argmax_ratio"], out["derived_ratio"], out["adjusted"]) == (0.7, 0.49, True)


def test_shape_speed_measures_efficiency(one_thread):
    shape_speed = _script("shape_speed")
    pruned = uniform_shape(space_of("resnet8", 10, 3, 8).full, 0.5)
    record = shape_speed.measure(pruned, LatencyConfig(batch_sizes=(1,), warmup=0, repeats=1,
                                                       min_repeats=1, rounds=1, threads=1))
    assert record["ideal"] == pytest.approx(1 / record["flops_ratio"])
    assert record["efficiency"]["1"] == pytest.approx(record["speedup"]["1"] / record["ideal"])


def test_latency_budget_reads_the_budgets_of_a_run(tmp_path):
    latency_budget = _script("latency_budget")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({
        "phase": "derive", "budgets": {"flops": {"ratio": 0.3, "target": 0.5},
                                       "latency@1": {"ratio": 0.48, "target": 0.5},
                                       "latency@64": {"ratio": 0.49, "target": 0.5}}}) + "\n")
    assert latency_budget.budgets_of(tmp_path) == {1: 0.5, 64: 0.5}
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"phase": "derive"}) + "\n")
    with pytest.raises(SystemExit, match="no derive record with budgets"):
        latency_budget.budgets_of(tmp_path)
