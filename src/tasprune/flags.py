"""Command-line flags generated from the config dataclasses.

Every field of a config becomes one flag named after it (`batch_size` -> `--batch-size`;
a field of a section, e.g. `search.epochs` under `prune`, -> `--search-epochs`), with the
field's doc and default as its help. A flag's value is checked by the same conversion
as a recipe's or an override's (`tasprune.config`), so `--epochs ten` fails at once
with the flag named. `config_values(args)` gathers the flags given into the nested
mapping that `load_config(..., flags=...)` puts between the recipe and the `key=value`
overrides: recipe < flags < overrides, one path and one set of defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Collection, Mapping
from typing import Any

from tasprune.config import ConfigError, convert, doc

_DEST = "config:"  # dests of generated flags: "config:" + the dotted key


def flag_name(key: str) -> str:
    """The flag of a dotted config key: "search.flops_ratio" -> "--search-flops-ratio"."""
    return "--" + key.replace(".", "-").replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, cls: type[Any], title: str,
                     prefix: str = "", skip: Collection[str] = (),
                     aliases: Mapping[str, str] | None = None,
                     required: Collection[str] = (), defaults: Any = None) -> None:
    """One flag per field of `cls` in the --help group `title`, the fields of each section
    in a group of their own. `skip`: dotted keys the command declares itself; `aliases`:
    dotted key -> a shorter flag that also sets it (`search.flops_ratio` ->
    `--flops-ratio`); `required`: dotted keys the command insists on; `defaults`: an
    instance whose values are the defaults (a section's default)."""
    aliases = aliases or {}
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if key in skip:
            continue
        hint = hints[f.name]
        default = f.default if defaults is None else getattr(defaults, f.name)
        if dataclasses.is_dataclass(hint):
            add_config_flags(parser, hint, f"{key} settings: {doc(f)}", f"{key}.",  # type: ignore[arg-type]
                             skip, aliases, required, f.default_factory())  # type: ignore[misc]
            continue
        names = ([aliases[key]] if key in aliases else []) + [flag_name(key)]
        has_default = default is not dataclasses.MISSING
        help_text = doc(f).replace("%", "%%")
        if has_default:
            help_text += f" (default: {_show(default)})"
        kwargs: dict[str, Any] = {"dest": _DEST + key, "help": help_text,
                                  "default": argparse.SUPPRESS,  # absent unless given
                                  "required": key in required or not has_default}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _parser_of(hint, key)
            kwargs["metavar"] = _metavar(hint)
            choices = _choices(hint)
            if choices:
                kwargs["choices"] = choices
                kwargs.pop("metavar")
        group.add_argument(*names, **kwargs)


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The generated flags the user gave, as a nested mapping of config keys."""
    out: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if not dest.startswith(_DEST):
            continue
        *sections, name = dest.removeprefix(_DEST).split(".")
        node = out
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = list(value) if isinstance(value, tuple) else value
    return out


def given(args: argparse.Namespace, key: str) -> Any:
    """The value of the generated flag of `key`, None when not given."""
    return getattr(args, _DEST + key, None)


def _parser_of(hint: Any, key: str) -> Any:
    """argparse `type`: the text of a flag -> the field's value, checked as a recipe's is."""
    def parse(text: str) -> Any:
        try:
            return convert(hint, _raw(hint, text), key)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{key}: ")) from None

    parse.__name__ = _metavar(hint).lower()  # argparse names the type in some messages
    return parse


def _raw(hint: Any, text: str) -> Any:
    """A flag's text as the value a recipe would hold: lists comma-separated, null for
    None, numbers as numbers (the conversion parses them)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = _is_union(hint) and len(args) < len(typing.get_args(hint))
    if optional and text.strip().lower() in ("null", "none"):
        return None
    inner = args[0] if _is_union(hint) and len(args) == 1 else hint
    if typing.get_origin(inner) in (tuple, list):
        text = text.strip().removeprefix("[").removesuffix("]")
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _choices(hint: Any) -> list[Any] | None:
    return list(typing.get_args(hint)) if typing.get_origin(hint) is typing.Literal else None


def _metavar(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if _is_union(hint) and len(args) == 1:
        return _metavar(args[0])
    if typing.get_origin(hint) in (tuple, list):
        return "A,B,..."
    return {int: "N", float: "X", str: "TEXT"}.get(hint, "VALUE")


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)
