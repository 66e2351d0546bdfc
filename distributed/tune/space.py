"""Tune's ``param_space`` for a training config: keys are dotted config paths.

``{"optimizer.learning_rate": tune.loguniform(1e-4, 1e-2), "batch_size": 32,
"model_params.hidden": tune.choice([64, 128])}``: each key names one field of
the config (the YAML's nesting, joined by dots) and its value replaces that
field's; a mapping value replaces the whole block. Keys are checked like the
config's own keys before any trial starts, so a typo is one line naming it;
a key into a free-form mapping (``model_params``, ``input_params``) must name
a key the config already has, since nothing else would catch its typo.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from typing import Any, Mapping

from distributed import config as config_lib
from distributed.config import OptimizerConfig, TrainConfig
from distributed.errors import ConfigError

# Fields a trial sets itself, or that every trial of a search must share.
TRIAL_OWNED = {
    "run": "each trial trains its own run, named after the trial",
    "storage": "the trials of a search share one storage (PBT restores one "
               "trial's checkpoint in another)",
    "staging": "the trials of a search share one storage",
    "storage_options": "the trials of a search share one storage",
}


def check_keys(base: TrainConfig, keys: typing.Iterable[Any]) -> None:
    """Checks that every key names a field of ``base`` a trial may change.

    Raises:
        ConfigError: One line naming the first bad key and what would be valid.
    """
    tree = base.to_dict()
    for key in keys:
        _check_key(key, tree)


def trial_config(base: Mapping[str, Any], params: Mapping[str, Any]) -> TrainConfig:
    """The config of one trial: ``base`` (a config's ``to_dict()``) with the
    trial's resolved ``params`` applied, validated.

    Raises:
        ConfigError: A bad key, or a value the config refuses (named by its path).
    """
    base_config = config_lib.from_dict(base)
    check_keys(base_config, params)
    tree = copy.deepcopy(dict(base))
    for key, value in params.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})  # optimizer.<kwarg> may be new
        node[leaf] = value
    try:
        return config_lib.from_dict(tree)
    except ConfigError as e:
        raise ConfigError(f"param_space: {e}") from None


def _check_key(key: Any, tree: Mapping[str, Any]) -> None:
    if not isinstance(key, str) or not key or "" in key.split("."):
        raise ConfigError(f"param_space: {key!r} is not a dotted config path such as "
                          "optimizer.learning_rate")
    hint: Any = TrainConfig
    value: Any = tree
    parts = key.split(".")
    for depth, part in enumerate(parts):
        here, parent = ".".join(parts[:depth + 1]), ".".join(parts[:depth])
        if depth == 0 and part in TRIAL_OWNED:
            raise ConfigError(f"param_space: {part}: {TRIAL_OWNED[part]}; set it in "
                              "the config passed to trainable(), not in param_space")
        if hint is OptimizerConfig:  # its other keys: checked against TensorFlow's
            hint, value = Any, value.get(part) if isinstance(value, Mapping) else None
            continue
        if dataclasses.is_dataclass(hint):
            names = [f.name for f in dataclasses.fields(hint)]
            if part not in names:
                close = difflib.get_close_matches(part, names, n=1)
                raise ConfigError(
                    f"param_space: {here}: unknown key; "
                    f"{f'did you mean {close[0]!r}? ' if close else ''}valid keys "
                    f"{'under ' + parent + ' ' if parent else ''}are {', '.join(names)}")
            hint, value = _field_hint(hint, part), value.get(part)
            if value is None and dataclasses.is_dataclass(hint) and depth < len(parts) - 1:
                raise ConfigError(
                    f"param_space: {key}: the config has no {here} block; add one to "
                    f"the config to search over its fields")
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"param_space: {here}: {parent} is {value!r} in the "
                              "config, not a mapping with keys")
        if part not in value:
            close = difflib.get_close_matches(part, [str(k) for k in value], n=1)
            raise ConfigError(
                f"param_space: {here}: not a key of the config's {parent} "
                f"({', '.join(map(str, value)) or 'empty'}); "
                f"{f'did you mean {close[0]!r}? ' if close else ''}add it to the "
                "config (with its default) to search over it")
        hint, value = Any, value[part]


def _field_hint(cls: type, name: str) -> Any:
    """A dataclass field's type, ``X | None`` unwrapped to ``X``."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 and type(None) in typing.get_args(hint) else hint
