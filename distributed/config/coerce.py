"""Building the config's dataclasses from parsed YAML, led by their type hints.

A field's type is its first check: ``int`` refuses ``"100"`` and ``1e3``,
``Literal["wait", "skip"]`` refuses ``drop``, a nested dataclass refuses
unknown keys, and ``Annotated[T, parse]`` hands the value to
``parse(value, path)`` for a type with a grammar of its own (the optimizer,
the selection, retention). Every error is one line that starts with the
field's path (``checkpoint.on_busy``), so the user finds it in the YAML.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, Sequence

from distributed.errors import ConfigError, did_you_mean


def build(cls: type, data: Any, prefix: str = ""):
    """``cls(**data)``, each value coerced to its field's type hint.

    ``prefix`` is the path of ``cls`` in the config (``"checkpoint."``);
    unknown keys are errors, so a typo cannot fall back to a default.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, "
                          f"got {data!r}")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key"
            f"{'s ' + str(unknown) if len(unknown) > 1 else ''}; "
            f"{did_you_mean(unknown[0], fields)}valid keys are "
            f"{', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls, include_extras=True)
    return cls(**{name: coerce(value, hints[name], f"{prefix}{name}")
                  for name, value in data.items()})


def coerce(value: Any, hint: Any, path: str) -> Any:
    """``value`` as the type ``hint`` names; :class:`ConfigError` if it is not one."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return args[1](value, path)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, f"{path}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return coerce(value, next(a for a in args if a is not type(None)), path)
    if origin is typing.Literal:
        return choice(value, args, path)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}"
                              f"{unquote_hint(value)}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}"
                              f"{unquote_hint(value)}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is dict or origin is dict:
        return mapping(value, path)
    return value


def mapping(value: Any, path: str) -> dict:
    """A mapping field's value as a dict (``null``: empty)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {value!r}")
    return dict(value)


def choice(value: Any, choices: Sequence[str], path: str) -> str:
    """``value`` if it is one of ``choices``; else an error naming the closest."""
    if isinstance(value, str) and value in choices:
        return value
    raise ConfigError(
        f"{path}: {value!r} is not valid; {did_you_mean(value, choices)}use one of "
        f"{', '.join(choices)}")


def unquote_hint(value: Any) -> str:
    """A fix hint for a number written as a YAML string (``steps: "100"``)."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (a string); write the number without quotes"
    return ""
