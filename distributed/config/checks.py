"""Value checks shared by the config's sections: ranges and references.

Coercion (:mod:`distributed.config.coerce`) settles a value's type; these
settle whether a well-typed value makes sense. Each raises a one-line
:class:`ConfigError` that starts with the field's path.
"""

from __future__ import annotations

from typing import Any, Mapping

from distributed.errors import ConfigError, did_you_mean

RAY_INPUT_KEYS = ("ray_dataset", "label")


def positive(value: Any, path: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{path}: expected a positive number, got {value!r}")


def positive_int(value: Any, path: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{path}: expected a positive integer, got {value!r}")


def non_negative_int(value: Any, path: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{path}: expected an integer >= 0, got {value!r}")


def check_ref(ref: Any, field: str) -> None:
    """A ``package.module:function`` reference (imported later, where it runs)."""
    if not isinstance(ref, str) or ref.count(":") != 1 or not all(ref.split(":")):
        raise ConfigError(
            f"{field}: expected 'package.module:function', got {ref!r}; "
            "write the module's dotted path, a colon, then the function's "
            "name (e.g. 'distributed.examples.digits:mlp_model_fn')")


def check_input(value: Any, field: str) -> None:
    """An input: ``package.module:function`` or ``{ray_dataset, label}``."""
    if not isinstance(value, Mapping):
        check_ref(value, field)
        return
    unknown = sorted(set(value) - set(RAY_INPUT_KEYS), key=str)
    if unknown:
        raise ConfigError(
            f"{field}.{unknown[0]}: unknown key; "
            f"{did_you_mean(unknown[0], RAY_INPUT_KEYS)}a Ray Data input "
            "is {ray_dataset: 'package.module:function', label: COLUMN}")
    if "ray_dataset" not in value:
        raise ConfigError(f"{field}.ray_dataset: missing; a Ray Data input is "
                          "{ray_dataset: 'package.module:function', label: COLUMN}")
    check_ref(value["ray_dataset"], f"{field}.ray_dataset")
    label = value.get("label")
    if not isinstance(label, str) or not label:
        raise ConfigError(f"{field}.label: expected the name of the dataset's label "
                          f"column, got {label!r}")


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Any, path: str) -> int | None:
    """A size: a byte count (``8589934592``) or a number and a unit
    (``"8GiB"``, ``"500 MB"``); ``null`` stays ``None``."""
    import re
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value) \
        if isinstance(value, str) else None
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _BYTE_UNITS or float(match.group(1)) <= 0:
        hint = did_you_mean(unit, _BYTE_UNITS) if match else ""
        raise ConfigError(f"{path}: expected a positive size in bytes or like '8GiB' "
                          f"or '500MB', got {value!r}; {hint}units are "
                          "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB")
    return int(float(match.group(1)) * _BYTE_UNITS[unit])


def regex_list(value: Any, path: str) -> list[str]:
    """A list of regexes (one string is a list of one); each must compile."""
    import re
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{path}: expected a list of regexes, got {value!r}")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ConfigError(f"{path}[{i}]: expected a regex string, got {item!r}")
        try:
            re.compile(item)
        except re.error as e:
            raise ConfigError(f"{path}[{i}]: {item!r} is not a valid regex ({e})") \
                from None
    return list(items)
