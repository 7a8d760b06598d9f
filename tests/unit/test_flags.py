"""The command line's flags are generated from the configs: every field has one, its value
is checked as a recipe's is, and recipe < flags < key=value overrides."""

import argparse
import dataclasses
import typing

import pytest

from tasprune.cli import build_parser, main
from tasprune.commands.run import _prune_flags
from tasprune.flags import config_values, flag_name
from tasprune.pipeline import load_prune_config
from tasprune.settings import PruneConfig, SearchConfig, TrainConfig


def _keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def _command(name):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command, cls", [("search", SearchConfig), ("train", TrainConfig),
                                          ("prune", PruneConfig), ("baseline", PruneConfig)])
def test_every_config_field_has_a_flag_in_the_help(command, cls):
    parser = _command(command)
    dests = {a.dest for a in parser._actions}
    text = parser.format_help()
    keys = list(_keys(cls))
    assert len(keys) > {"search": 40, "train": 19, "prune": 90, "baseline": 90}[command]
    for key in keys:
        assert f"config:{key}" in dests, key
        assert flag_name(key) in text or key == "method", key


def test_flags_reach_the_config_between_recipe_and_overrides():
    args = build_parser().parse_args([
        "prune", "--out", "x", "--config", "demo", "--search-arch-lr", "0.2",
        "--search-width-ratios", "0.5,1", "--no-search-reorder", "--train-epochs", "3",
        "--teacher-train-warmup-epochs", "null", "--search-tau-per", "epoch",
        "--latency-rounds", "2", "--method", "l1", "--seed", "4", "--train-seed", "9",
        "search.epochs=5", "train.epochs=6"])
    config = load_prune_config(args.config, args.overrides, flags=_prune_flags(args))
    assert config.search.arch_lr == 0.2 and config.search.width_ratios == (0.5, 1.0)
    assert config.search.reorder is False and config.search.tau_per == "epoch"
    assert config.teacher_train.warmup_epochs is None and config.latency.rounds == 2
    assert config.method == "l1" and config.train.inherit  # l1 always inherits
    assert config.search.epochs == 5 and config.train.epochs == 6  # overrides win
    assert (config.teacher_train.seed, config.search.seed, config.train.seed) == (4, 4, 9)
    demo = load_prune_config("demo")
    assert config.teacher_train.epochs == demo.teacher_train.epochs  # the recipe's, untouched


def test_a_flag_given_is_the_only_value_taken():
    args = build_parser().parse_args(["search", "--model", "resnet8", "--data", "demo",
                                      "--out", "x", "--epochs", "2", "--no-fill"])
    assert config_values(args) == {"epochs": 2, "fill": False}


@pytest.mark.parametrize("argv, says", [
    (["prune", "--out", "x", "--search-epochs", "ten"],
     "argument --search-epochs: expected an integer, got 'ten'"),
    (["search", "--model", "resnet8", "--data", "demo", "--out", "x", "--epochs", "1",
      "--width-ratios", "0.5,big"],
     "argument --width-ratios: width_ratios[1]: expected a number, got 'big'"),
    (["train", "--model", "resnet8", "--data", "demo", "--out", "x", "--epochs", "1",
      "--amp", "fp8"],
     "argument --amp: expected one of 'auto', 'off', 'bf16', 'fp16', got 'fp8'"),
])
def test_a_bad_flag_value_is_one_line_naming_the_flag(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and says in err and len(err.strip().splitlines()) == 1
