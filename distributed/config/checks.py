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
