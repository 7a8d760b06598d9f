import argparse
import json

import pytest

from tasprune.cli import build_parser, main
from tasprune.models.shape import PAPER_SHAPES_DIR, Shape


def test_flops_json_for_name(capsys):
    assert main(["flops", "resnet56", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["flops"] == 125_747_850 and isinstance(out["params"], int)


def test_flops_table(capsys):
    assert main(["flops", "resnet20", "--classes", "100"]) == 0
    out = capsys.readouterr().out
    assert "layer3.2.conv2" in out and "fc" in out and "FLOPs (MACs): 40," in out


def test_flops_of_files(tmp_path, capsys):
    cfg = PAPER_SHAPES_DIR / "C010-ResNet110.config"
    assert main(["flops", str(cfg), "--json"]) == 0
    by_path = json.loads(capsys.readouterr().out)
    assert main(["flops", "C010-ResNet110", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["flops"] == by_path["flops"]
    Shape.full("resnet8", in_channels=1, resolution=28).save(tmp_path / "shape.json")
    assert main(["flops", str(tmp_path / "shape.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["in_channels"] == 1


@pytest.mark.parametrize("target, message", [
    ("resnet999", "unknown model"),
    ("missing/shape.json", "no such file"),
])
def test_flops_errors_exit_2(target, message, capsys):
    assert main(["flops", target]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_flops_unreadable_file(tmp_path, capsys):
    (tmp_path / "x.json").write_text("[1, 2")
    assert main(["flops", str(tmp_path / "x.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def _leaf_parsers(parser):
    """Every (sub)command parser that runs something: name -> parser."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if sub is None:
        return {parser.prog: parser}
    return {k: v for p in sub.choices.values() for k, v in _leaf_parsers(p).items()}


# what every command's --help must name: the files it writes, or that it writes none
_WRITES = {
    "prune": ["model.safetensors", "shape.json", "search.pt", "summary.json", "report.md"],
    "baseline": ["model.safetensors", "shape.json", "summary.json"],
    "demo": ["runs/demo", "model.safetensors"],
    "search": ["shape.json", "metrics.jsonl", "search.pt"],
    "train": ["model.safetensors", "train.pt", "best.pt", "metrics.jsonl"],
    "eval": ["writes no files"], "flops": ["writes no files"], "models": ["writes no files"],
    "recipes": ["writes no files"], "info": ["writes no files"],
    "export": ["model.onnx", "model.pt2", "hub"], "report": ["report.md", "widths.png"],
    "download": ["root/cifar-10-batches-py/"],
}


def test_every_command_says_in_its_help_what_it_writes():
    leaves = _leaf_parsers(build_parser())
    assert len(leaves) == 13, sorted(leaves)
    for name, p in leaves.items():
        text = (p.description or "").lower()
        words = _WRITES[name.split()[-1]]
        assert all(w.lower() in text for w in words), (name, words)


