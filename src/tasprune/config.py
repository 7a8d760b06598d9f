"""Typed configs: dataclasses <-> YAML, with dotted `key=value` overrides.

Configs are plain (possibly nested) dataclasses that validate themselves in
`__post_init__`. This module converts them from and to dicts, checks every key
and type against the dataclass fields, and reports errors by dotted key
("train.epochs: expected an integer, got 'ten'") so the user knows what to fix.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tasprune._io import atomic_write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value that does not fit the config's dataclass."""


def setting(default: Any, doc: str, *, factory: Any = None, runtime: bool = False) -> Any:
    """A config field: its default (or a factory for a section), its one-line doc, and
    whether it is a runtime setting (where and how a run goes, not what it computes on
    the CPU: it may change when the run is resumed)."""
    meta = {"doc": doc, "runtime": runtime}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def doc(f: dataclasses.Field[Any]) -> str:
    """The one-line doc of a config field ("" when it has none)."""
    return str(f.metadata.get("doc", ""))


def runtime_fields(cls: type[Any]) -> frozenset[str]:
    """The fields of config class `cls` a resumed run may change (device, amp, compile,
    logging, checkpoint frequency, progress display): none of them changes the result."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("runtime"))


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass `cls` from a dict; unknown keys and wrong types are errors."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]}; valid keys"
            f"{' under ' + prefix if prefix else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {name: convert(hints[name], _over_default(fields[name], value, _join(prefix, name)),
                             _join(prefix, name))
              for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix + ': ' if prefix else ''}{exc}") from None


def _over_default(f: dataclasses.Field[Any], value: Any, key: str) -> Any:
    """A section (a dataclass-valued field) given as a mapping: its keys over the section's
    default, so `teacher_train.seed=0` keeps the default epochs. A section given as null
    or as a non-mapping is an error naming it."""
    if f.default_factory is dataclasses.MISSING and f.default is dataclasses.MISSING:
        return value
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if not (dataclasses.is_dataclass(default) and not isinstance(default, type)):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of {key} settings (e.g. {key}.epochs=3), "
                          f"got {value!r}")
    return _merge(to_dict(default), value)


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass as plain YAML-friendly values (tuples become lists)."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                    if f.init}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(config)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML scalars/lists) to a nested dict."""
    data = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value "
                              f"(e.g. search.epochs=10)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps
    the last one silently)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _unique_mapping)


def load_config(cls: type[T], path: str | os.PathLike[str] | None = None,
                overrides: Sequence[str] = (), base: dict[str, Any] | None = None,
                flags: dict[str, Any] | None = None) -> T:
    """`base` values, then the YAML file at `path`, then the command line's `flags` (a
    nested mapping, `tasprune.flags.config_values`), then dotted overrides -> `cls`."""
    data = _deep_copy(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            loaded = yaml.load(path.read_bytes().decode("utf-8"), Loader=_UniqueKeyLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text; save the recipe as UTF-8") from None
        if loaded is None or loaded == {}:
            raise ConfigError(f"{path}: the recipe holds no settings; give at least one key "
                              "(e.g. model: resnet20), or leave out --config for the defaults")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config must be a mapping of keys")
        data = _merge(data, loaded)
    combined = apply_overrides(_merge(data, flags or {}), overrides)
    try:
        return from_dict(cls, combined)
    except ConfigError as exc:
        if path is None:
            raise
        try:  # the recipe alone is fine: an override is to blame, and the error names it
            from_dict(cls, data)
        except ConfigError:
            raise ConfigError(f"{path}: {exc}") from None
        raise ConfigError(f"override: {exc}") from None


def save_config(config: Any, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{key}: {value!r} fits none of {_name(hint)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, args))}, "
                              f"got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str) and "," in value:  # key=0.5,1 as the flags take it
            value = [_number(v) for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            items = [convert(a, v, f"{key}[{i}]") for i, (a, v) in
                     enumerate(zip(args, value, strict=True))]
        else:
            items = [convert(args[0], v, f"{key}[{i}]") if args else v
                     for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint in (int, float) and isinstance(value, str):
        value = _number(value)  # YAML 1.1 reads 1e-3 (no dot) as text
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if hint is Any:
        return value
    raise ConfigError(f"{key}: unsupported config type {_name(hint)}")


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _number(text: str) -> Any:
    """`text` as an int or float when it is a plain decimal number (1e-3, 5E4, -2.5),
    else unchanged."""
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        return text
    number = float(text)
    return int(number) if number.is_integer() and not re.search(r"[.eE]", text) else number


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where (PyYAML's own text spans lines)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}
