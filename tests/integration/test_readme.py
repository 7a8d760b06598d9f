"""Every `tasprune ...` command in the README's code blocks is one the command line accepts:
its flags exist, its values have the right types, its overrides name real settings."""

import re
import shlex
from pathlib import Path

import pytest

from tasprune.cli import build_parser
from tasprune.pipeline import load_prune_config

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        text = re.sub(r"\\\n\s*", " ", block)  # join continued lines
        for line in text.splitlines():
            for part in line.split(" #")[0].split("&&"):
                part = part.strip()
                if part.startswith("tasprune "):
                    commands.append(part)
    return commands


def readme_python() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_python_names_what_tasprune_exports():
    import ast

    import tasprune

    blocks = readme_python()
    assert len(blocks) >= 5
    used = set()
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "tasprune"):
                used.add(node.attr)
    assert {"prune", "search", "train", "load_model", "SearchConfig"} <= used
    missing = sorted(name for name in used if not hasattr(tasprune, name))
    assert not missing, missing


def test_the_readme_has_commands():
    names = {c.split()[1] for c in readme_commands()}
    assert {"prune", "search", "train", "eval", "export", "demo"} <= names


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command):
    argv = [a for a in shlex.split(command)[1:] if "$" not in a]
    args, extra = build_parser().parse_known_args(argv)
    overrides = list(getattr(args, "overrides", [])) + extra
    assert all("=" in item for item in extra), extra
    if args.command in ("prune", "baseline", "demo"):
        recipe = "demo" if args.command == "demo" else getattr(args, "config", None)
        if recipe is None or Path(recipe).suffix not in (".yaml", ".yml"):
            load_prune_config(recipe, tuple(overrides))  # every override names a setting


# the commands that need data this machine does not have (CIFAR) or a network are checked
# above; every other one runs below, as written, on a stand-in for Fashion-MNIST
NOT_RUN = ("cifar10", "data download")
TINY = ["teacher_train.epochs=2", "search.epochs=1", "train.epochs=2", "latency.repeats=1",
        "latency.min_repeats=1", "latency.batch_sizes=[1]", "search.health_images=100"]


def _ordered(commands: list[str]) -> list[str]:
    """README order, each command once, except that the runs others read (the teacher,
    then the search) go first."""
    def rank(c: str) -> int:
        return 0 if "--out runs/teacher" in c else 1 if "--out runs/search" in c else 2
    return sorted(dict.fromkeys(" ".join(c.split()) for c in commands), key=rank)  # once each


@pytest.mark.slow
def test_readme_commands_run(tmp_path, monkeypatch, capsys):
    import numpy as np

    import tasprune.commands._common
    import tasprune.pipeline
    from tasprune.cli import main
    from tasprune.data import load_data
    from tasprune.data.idx import write_idx

    # Fashion-MNIST stand-in: 600 training and 100 test images of the bundled subset
    root = tmp_path / "fmnist"
    root.mkdir()
    demo = load_data("demo")
    for split, src, n in (("train", demo.train, 600), ("t10k", demo.test, 100)):
        write_idx(root / f"{split}-images-idx3-ubyte", src.images[:n, 0].numpy())
        write_idx(root / f"{split}-labels-idx1-ubyte", src.labels[:n].numpy().astype(np.uint8))
    stand_in = load_data(f"fashion-mnist:{root}")

    def data(spec, *args, **kwargs):
        return stand_in if spec == "fashion-mnist" else load_data(spec, *args, **kwargs)

    monkeypatch.setattr(tasprune.commands._common, "load_data", data)
    monkeypatch.setattr(tasprune.pipeline, "load_data", data)
    monkeypatch.chdir(tmp_path)
    # the user's file the "Your own network" commands name
    (tmp_path / "my_models.py").write_text(
        "from tasprune.models import zoo\n\n\n"
        "def mobilenet_v2(num_classes=10, in_channels=3):\n"
        "    return zoo.mobilenet_v2(num_classes=num_classes, in_channels=in_channels,\n"
        "                            width_mult=0.35, small_input=False)\n")
    monkeypatch.setenv("TASPRUNE_CACHE", str(tmp_path / "cache"))  # latency tables
    ran = 0
    for command in _ordered(readme_commands()):
        if any(skip in command for skip in NOT_RUN):
            continue
        argv = shlex.split(command)[1:]
        if argv[0] in ("prune", "baseline", "demo"):
            argv += TINY
        assert main(argv) == 0, (command, capsys.readouterr().err[-2000:])
        ran += 1
    assert ran >= 11
    assert (tmp_path / "runs" / "student" / "model.onnx").is_file()
    assert (tmp_path / "runs" / "demo" / "logs" / "train.csv").is_file()

    # the Python examples, as written, in order, on the runs the commands made; only
    # the epochs of a whole `prune` job are cut to TINY's
    import tasprune

    def tiny_recipe(recipe=None, overrides=(), flags=None):
        return load_prune_config(recipe, [*overrides, *TINY], flags)

    monkeypatch.setattr(tasprune, "load_data", data)
    monkeypatch.setattr(tasprune, "load_prune_config", tiny_recipe)
    for block in readme_python():
        exec(compile(block, "README.md", "exec"), {})  # noqa: S102
    assert (tmp_path / "runs" / "search-py" / "shape.json").is_file()
    assert (tmp_path / "runs" / "demo-py" / "summary.json").is_file()
    assert (tmp_path / "runs" / "mnv2-50" / "model.pt2").is_file()
    assert (tmp_path / "runs" / "mnv2-p" / "shape.json").is_file()
    assert (tmp_path / "runs" / "mine" / "model.safetensors").is_file()
