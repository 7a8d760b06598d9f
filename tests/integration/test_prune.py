"""The one-command pipeline, end to end on the bundled data (slow), and its config handling."""

import json

import pytest
import torch

from helpers import TINY
from tasprune import count_flops, load_pruned
from tasprune._io import read_jsonl
from tasprune.cli import main
from tasprune.config import ConfigError
from tasprune.models.shape import Shape
from tasprune.pipeline import RECIPES_DIR, load_prune_config, recipe_names


def test_every_paper_recipe_budgets_the_flops_of_the_published_shape():
    """A paper recipe's FLOP ratio is that of the shape the authors published for its
    setting (named in its comment), on the model and class count of that
    shape; every shipped recipe loads."""
    import re

    from tasprune import paper_shape

    names = recipe_names()
    assert {"demo", "cifar10-resnet56", "cifar100-resnet110", "imagenet-resnet50",
            "fashion-mnist-resnet20"} <= set(names)
    checked = 0
    for name in names:
        config = load_prune_config(name)
        published = re.search(r"published (?:for this setting \(([\w-]+)\)|([\w-]+) shape)",
                              (RECIPES_DIR / f"{name}.yaml").read_text())
        if published is None:
            continue
        shape = paper_shape(published.group(1) or published.group(2))
        full = shape.replace(widths=shape.full_widths, blocks=shape.depths)
        assert config.search.flops_ratio == pytest.approx(
            count_flops(shape) / count_flops(full), abs=5e-4), name
        model = Shape.full(config.model, num_classes=shape.num_classes,
                           resolution=shape.resolution)
        assert model == full, name  # the published shape's network, at its class count
        assert config.search.relaxation == "gumbel" and config.search.kd_alpha == 0, name
        checked += 1
    assert checked == 12


def test_recipe_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key search.epoch"):
        load_prune_config("demo", ("search.epoch=3",))
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_prune_config("demo", ("train.epochs=many",))
    with pytest.raises(ConfigError, match="no recipe 'nope'"):
        load_prune_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: resnet20\nsearch: {flops_ratio: 0.5, epoch: 3}\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown config key search.epoch"):
        load_prune_config(str(bad))


@pytest.mark.slow
def test_prune_end_to_end_then_rerun_skips(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["prune", "--model", "resnet8", "--data", "demo", "--out", str(out), "--quiet",
            "--seed", "1", *TINY]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "FLOPs (MACs)" in first.out
    for name in ("config.yaml", "teacher/model.safetensors", "search.pt", "shape.json",
                 "train.pt", "best.pt", "model.safetensors", "metrics.jsonl", "summary.json",
                 "report.md", "widths.png", "flops.png", "accuracy.png"):
        assert (out / name).is_file(), name
    model = load_pruned(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flops_pruned"] == count_flops(model)
    assert summary["flops_full"] > summary["flops_pruned"]
    assert 0 <= summary["acc_pruned"] <= 1 and set(summary["latency_ms"]["pruned"]) == {"1", "64"}
    lat = summary["latency"]  # one paired measurement: teacher, pruned, folded (PyTorch, ORT)
    assert lat["baseline"] == "dense" and summary["latency_threads"] == lat["threads"]
    assert {"pruned", "folded"} <= set(lat["speedup"]) and lat["rounds"] == 5
    assert ("onnxruntime" in lat["ms"]) == (lat["onnxruntime_skipped"] is None)
    assert "folded BN, PyTorch, batch 64" in (out / "report.md").read_text()
    phases = [r["phase"] for r in read_jsonl(out / "metrics.jsonl")]
    assert phases.count("search") == 2 and phases.count("derive") == 1
    assert phases.count("train") == 1
    assert [r["phase"] for r in read_jsonl(out / "teacher" / "metrics.jsonl")] == ["train"]

    stamps = {p: p.stat().st_mtime_ns for p in (out / "search.pt", out / "train.pt",
                                                  out / "teacher" / "model.safetensors")}
    assert main([a for a in args if a != "--quiet"]) == 0
    again = capsys.readouterr()
    assert again.err.count("skipping") == 4  # teacher, search, train, eval
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())

    # other settings in the same directory are refused, nothing is touched
    assert main([*args, "search.flops_ratio=0.3"]) == 2
    assert "holds a run with other settings" in capsys.readouterr().err
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())

    # a finished run rewrites nothing when run again (it may sit on a read-only share)
    files = {p: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == files

    # metrics.jsonl lost: the shape under the trained model is never searched again
    shape = (out / "shape.json").read_text()
    (out / "metrics.jsonl").unlink()
    assert main(args) == 0
    assert "metrics.jsonl is missing" in capsys.readouterr().err
    assert (out / "shape.json").read_text() == shape


def test_a_run_saved_before_the_paired_latency_settings_still_resumes():
    from tasprune.config import to_dict
    from tasprune.pipeline import _differences, _with_added_keys

    config = load_prune_config("demo")
    saved = to_dict(config)
    for key in ("rounds", "threads", "deploy"):
        del saved["latency"][key]  # a config.yaml written by an earlier tasprune
    assert _differences(_with_added_keys(saved), config) == []
    saved["latency"]["rounds"] = 3
    assert _differences(_with_added_keys(saved), config) == [
        "latency.rounds: 3 -> 5"]


@pytest.mark.slow
def test_prune_in_python_takes_a_teacher_as_a_model_and_keeps_it(tmp_path):
    from tasprune import create_model, load_model, prune

    config = load_prune_config(None, ("model=resnet8", "method=uniform", *TINY))
    teacher = create_model("resnet8", num_classes=10, in_channels=1, resolution=28)
    out = tmp_path / "run"
    summary = prune(config, out, quiet=True, teacher=teacher.state_dict())
    kept = load_model(out / "teacher")
    assert all(torch.equal(kept.state_dict()[k], v) for k, v in teacher.state_dict().items())
    assert not (out / "teacher" / "train.pt").exists()  # given, not trained
    assert prune(config, out, quiet=True) == summary  # a rerun finds the kept teacher
    other = create_model("resnet8", num_classes=10, in_channels=1, resolution=28)
    with pytest.raises(ValueError, match="holds another teacher"):
        prune(config, out, quiet=True, teacher=other)
