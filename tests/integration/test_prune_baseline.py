"""Baselines as a method of the prune pipeline: config, shape phase, CLI end to end (slow)."""

import json

import pytest
import yaml

from helpers import TINY, network
from tasprune import count_flops, load_pruned
from tasprune._io import read_jsonl
from tasprune.cli import main
from tasprune.config import ConfigError
from tasprune.pipeline import baseline_shape, load_prune_config
from tasprune.tas.space import SearchSpace


def test_method_is_validated_and_l1_implies_inheritance():
    assert load_prune_config(None).method == "tas"
    config = load_prune_config("demo", ("method=l1",))
    assert config.train.inherit is True
    assert load_prune_config("demo", ("method=uniform",)).train.inherit is False
    with pytest.raises(ConfigError, match="method: expected one of"):
        load_prune_config(None, ("method=magnitude",))
    with pytest.raises(ConfigError, match="random_samples"):
        load_prune_config(None, ("method=random", "random_samples=0"))


def test_baseline_shapes_meet_the_budget():
    teacher, plan = network("resnet20", 10, 1, 28)
    space = SearchSpace.from_plan(plan)
    full = space.full
    for method in ("uniform", "l1", "random"):
        config = load_prune_config(None, (f"method={method}", "search.flops_ratio=0.4"))
        shape = baseline_shape(method, config.search, space, teacher, samples=100)
        assert 0.3 * count_flops(full) < count_flops(shape) <= 0.4 * count_flops(full), method
    other, _ = network("resnet8", 10, 1, 28)
    with pytest.raises(ValueError, match="not the unpruned network of this shape"):
        baseline_shape("l1", config.search, space, other)


@pytest.mark.slow
def test_baseline_l1_end_to_end_then_rerun_skips(tmp_path, capsys, one_thread):
    out = tmp_path / "l1"
    args = ["baseline", "--method", "l1", "--model", "resnet8", "--data", "demo", "--out",
            str(out), "--quiet", "--seed", "2", *TINY]
    assert main(args) == 0
    assert "FLOPs (MACs)" in capsys.readouterr().out
    for name in ("config.yaml", "teacher/model.safetensors", "shape.json", "train.pt",
                 "model.safetensors", "summary.json", "report.md", "widths.png"):
        assert (out / name).is_file(), name
    assert not (out / "search.pt").exists()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method"] == "l1" and saved["train"]["inherit"] is True
    derive = [r for r in read_jsonl(out / "metrics.jsonl") if r["phase"] == "derive"]
    assert len(derive) == 1 and derive[0]["method"] == "l1"
    assert derive[0]["flops_ratio"] <= 0.5 and derive[0]["target_ratio"] == 0.5
    summary = json.loads((out / "summary.json").read_text())
    model = load_pruned(out)
    assert summary["method"] == "l1" and summary["kd"] is True
    assert summary["flops_pruned"] == count_flops(model) == derive[0]["flops"]
    assert "l1 baseline (no search)" in (out / "report.md").read_text()

    stamps = {p: p.stat().st_mtime_ns for p in (out / "shape.json", out / "train.pt")}
    assert main([a for a in args if a != "--quiet"]) == 0
    assert capsys.readouterr().err.count("skipping") == 4  # teacher, shape, train, eval
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    # the same directory with another method is another experiment: refused
    assert main([*args[:2], "uniform", *args[3:]]) == 2
    assert "method: 'l1' -> 'uniform'" in capsys.readouterr().err
