from dataclasses import dataclass, field
from typing import Literal

import pytest

from tasprune.config import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    save_config,
    to_dict,
)


@dataclass(frozen=True)
class Inner:
    epochs: int = 3
    lr: float = 0.1
    ratios: tuple[float, ...] = (0.5, 1.0)
    schedule: Literal["cosine", "linear"] = "cosine"
    teacher: str | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")


@dataclass(frozen=True)
class Outer:
    name: str = "run"
    quiet: bool = False
    inner: Inner = field(default_factory=Inner)


def test_roundtrip_through_yaml(tmp_path):
    cfg = Outer(name="x", inner=Inner(epochs=7, ratios=(0.3, 0.4)))
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(Outer, tmp_path / "c.yaml") == cfg
    assert to_dict(cfg)["inner"]["ratios"] == [0.3, 0.4]


def test_overrides_are_typed_and_dotted(tmp_path):
    (tmp_path / "c.yaml").write_text("inner:\n  epochs: 2\n")
    cfg = load_config(Outer, tmp_path / "c.yaml",
                      ["inner.lr=0.05", "inner.ratios=[0.25, 1]", "quiet=true",
                       "inner.teacher=null"])
    assert cfg.inner == Inner(epochs=2, lr=0.05, ratios=(0.25, 1.0))
    assert cfg.quiet is True
    assert from_dict(Outer, {"inner": {"lr": 1}}).inner.lr == 1.0  # int widens to float


@pytest.mark.parametrize("overrides, message", [
    (["inner.epoch=3"], "unknown config key inner.epoch; valid keys under inner: epochs"),
    (["bogus=1"], "unknown config key bogus"),
    (["inner.epochs=ten"], "inner.epochs: expected an integer, got 'ten'"),
    (["quiet=maybe"], "quiet: expected true or false"),
    (["inner.schedule=step"], "inner.schedule: expected one of 'cosine', 'linear'"),
    (["inner.epochs=0"], "inner: epochs must be >= 1"),
    (["inner.ratios=0.5"], "inner.ratios: expected a list"),
    (["epochs"], "not of the form key=value"),
    (["name.sub=1"], "name is not a section"),
])
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(Outer, None, overrides, base={"name": "n"})


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(Outer, tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("inner: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(Outer, tmp_path / "list.yaml")


def test_apply_overrides_does_not_mutate():
    base = {"inner": {"epochs": 1}}
    out = apply_overrides(base, ["inner.epochs=2"])
    assert base["inner"]["epochs"] == 1 and out["inner"]["epochs"] == 2
