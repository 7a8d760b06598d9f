import json

import pytest

from tasprune import create_model
from tasprune._io import read_jsonl
from tasprune.checkpoint import load_checkpoint
from tasprune.cli import main
from tasprune.export import read_shape, save_pruned

pytestmark = pytest.mark.usefixtures("one_thread")



def test_impossible_budget_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["search", "--model", "resnet20", "--data", "demo", "--epochs", "1", "--out", str(out)]
    for ratio, says in (("0.01", "smallest shape"), ("0", "in (0, 1]"), ("1.5", "in (0, 1]")):
        assert main([*args, "--flops-ratio", ratio]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_search_help_says_what_it_writes(capsys):
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    out = capsys.readouterr().out
    assert "shape.json" in out and "metrics.jsonl" in out and "search.pt" in out


@pytest.mark.slow
def test_search_command_on_the_demo_data_with_a_teacher_and_resume(tmp_path, capsys):
    teacher = create_model("resnet8", num_classes=10, in_channels=1, resolution=28)
    save_pruned(tmp_path / "teacher", teacher)
    out = tmp_path / "run"
    args = ["search", "--model", "resnet8", "--data", "demo", "--flops-ratio", "0.5",
            "--epochs", "1", "--out", str(out), "--batch-size", "256", "--quiet",
            "--teacher", str(tmp_path / "teacher" / "model.safetensors")]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    shape = read_shape(out / "shape.json")
    assert shape.in_channels == 1 and shape.num_classes == 10 and shape.resolution == 28
    assert load_checkpoint(out / "search.pt")["teacher"] is True
    lines = read_jsonl(out / "metrics.jsonl")
    assert [r["phase"] for r in lines] == ["search", "derive"]
    assert main(args) == 2  # search.pt exists: refuses to overwrite
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # already finished: derives again, same shape
    assert read_shape(out / "shape.json") == shape
    assert [r["phase"] for r in read_jsonl(out / "metrics.jsonl")] == ["search", "derive"]
    wrong = create_model("resnet14", num_classes=10, in_channels=1, resolution=28)
    save_pruned(tmp_path / "wrong", wrong)
    bad = [a if a != str(tmp_path / "teacher" / "model.safetensors") else
           str(tmp_path / "wrong") for a in args]
    bad[bad.index(str(out))] = str(tmp_path / "run2")
    assert main(bad) == 2
    assert "train one with" in capsys.readouterr().err
    assert json.loads((out / "shape.json").read_text())["format"] == "tasprune.plan-shape/2"
