"""Every `tasprune ...` command in the README's code blocks is one the command line accepts:
its flags exist, its values have the right types, its overrides name real settings."""

import re
import shlex
from pathlib import Path

import pytest

from tasprune.cli import build_parser
from tasprune.prune import load_prune_config

README = Path(__file__).resolve().parents[1] / "README.md"


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
