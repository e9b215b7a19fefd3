"""A config block → its dataclass, with OmegaConf doing the type checking.

The dataclass is given to OmegaConf as the schema (`OmegaConf.structured`), the composed block is
merged into it, and OmegaConf's own errors (unknown key, value of the wrong type) become one line.
Two things OmegaConf 2.3 cannot express are handled here, each in a few lines:

- `Literal[...]` choices (train.precision, ...): OmegaConf 2.3 rejects the annotation ("Unexpected
  type annotation"), so its schema twin sees `str` and `check_choices` compares the value with the
  Literal's arguments (the same arguments the reference page shows);
- unions of two value types (`micro_batch_size: int | str` for `auto`): OmegaConf 2.3 has no such
  node, so the twin holds `Any` and the field's declared range (ranges.py) checks it.

Two conveniences users rely on are kept: a single value where a list is expected becomes a
one-item list (`data.path=a.jsonl`), and a whole float for an int key is that int (Hydra reads
`1e3` as 1000.0).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from distft.errors import ConfigError

NoneType = type(None)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _omega_type(hint: Any) -> Any:
    """The annotation OmegaConf 2.3 can hold for `hint` (see the module docstring)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return str | None if None in args else str
    if _is_union(hint):
        rest = [a for a in args if a is not NoneType]
        if len(rest) > 1:
            return Any
        return _omega_type(rest[0]) | None
    if origin is list:
        return list[_omega_type(args[0])] if args else list
    if origin is dict:
        return dict[args[0], _omega_type(args[1])] if args else dict
    if dataclasses.is_dataclass(hint):  # a nested block (rlaif's model): its twin, Literals and all
        return schema_of(hint)
    return hint


@functools.cache
def schema_of(cls: type) -> type:
    """A twin of dataclass `cls` that OmegaConf accepts as a structured config."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        factory = f.default_factory
        if dataclasses.is_dataclass(factory) and factory is hints[f.name]:
            factory = schema_of(factory)  # the nested block's default, built from its twin
        fields.append(
            (
                f.name,
                _omega_type(hints[f.name]),
                dataclasses.field(default=f.default, default_factory=factory),
            )
        )
    return dataclasses.make_dataclass(cls.__name__, fields)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _lists_and_ints(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for key, value in data.items():
        hint = hints.get(key)
        plain = [a for a in typing.get_args(hint) if a is not NoneType] if _is_union(hint) else [hint]
        if typing.get_origin(plain[0]) is list and isinstance(value, (str, int, float)):
            out[key] = [value]  # a single value is accepted where a list is expected
        elif int in plain and float not in plain and isinstance(value, float) and value.is_integer():
            out[key] = int(value)  # OmegaConf refuses 2.0 for an int; Hydra reads 2e3 as a float
    return out


def build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass `cls` from a composed block; one line naming the key when it is wrong."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{where}' got {data!r}; expected a block of keys ({cls.__name__})")
    names = sorted(f.name for f in dataclasses.fields(cls))
    for key, value in data.items():  # `???` (mandatory): merging it would silently keep the default
        if value == "???":
            from distft.config.docstrings import attr_docs as _attr_docs

            doc = _attr_docs(cls).get(key, "").split(". ")[0]
            option = f"{where}={data['name']}" if "name" in data else where
            raise ConfigError(f"{option} needs {where}.{key}=<value>" + (f": {doc}" if doc else ""))
    try:
        node = OmegaConf.merge(OmegaConf.structured(schema_of(cls)), _lists_and_ints(cls, data))
    except ConfigKeyError as e:
        raise ConfigError(
            f"unknown config key '{where}.{e.key}'. Valid keys under '{where}': {', '.join(names)}"
        ) from None
    except ValidationError as e:
        top = str(e.full_key).split(".")[0].split("[")[0]
        hint = typing.get_type_hints(cls).get(top)
        value = data.get(top, e.value)
        raise ConfigError(f"config key '{where}.{top}' got {value!r}; expected {_type_name(hint)}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"config block '{where}': {str(e).splitlines()[0]}") from None
    values = OmegaConf.to_container(node)
    _check_map_values(cls, values, where)
    obj = cls(**values)
    check_choices(obj, where)
    return obj


def _check_map_values(cls: type, values: dict[str, Any], where: str) -> None:
    """OmegaConf 2.3 lets a list or map stand where a Dict[str, str] expects a str: refuse it."""
    for key, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        if typing.get_origin(hint) is dict and len(args) == 2 and args[1] in (str, int, float, bool):
            for k, v in (values.get(key) or {}).items():
                if isinstance(v, (list, dict)):
                    expected = args[1].__name__
                    raise ConfigError(f"config key '{where}.{key}.{k}' got {v!r}; expected {expected}")


def check_choices(obj: Any, where: str) -> None:
    """Fields typed Literal[...] hold one of its arguments (OmegaConf 2.3 cannot check Literal)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        choices = choices_of(hints[f.name])
        value = getattr(obj, f.name)
        if choices and value not in choices:
            raise ConfigError(f"{where}.{f.name}={value!r}; valid: {', '.join(map(str, choices))}")


def choices_of(hint: Any) -> tuple:
    """The values a Literal[...] (or Optional Literal) annotation allows; () for other types."""
    if _is_union(hint):
        return next((choices_of(a) for a in typing.get_args(hint) if choices_of(a)), ())
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
