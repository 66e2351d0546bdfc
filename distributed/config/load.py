"""Config in: a YAML file with command-line overrides, or parsed data."""

from __future__ import annotations

from typing import Any, Mapping

import yaml

from distributed.config.coerce import build
from distributed.config.run import TrainConfig
from distributed.errors import ConfigError


def from_dict(data: Mapping[str, Any] | None) -> TrainConfig:
    """Builds and validates a :class:`TrainConfig` from parsed YAML (or from
    :meth:`TrainConfig.to_dict`, as the actors and ``run_config.json`` hold it)."""
    return build(TrainConfig, data or {}).validate()


def load(path: str, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Reads a YAML config file and applies command-line overrides (``None``
    values leave the file's).

    Raises:
        ConfigError: The file is missing, not YAML, or has bad fields.
    """
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path!r} is not valid YAML{where}: "
                          f"{problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of fields, "
                          f"got {type(data).__name__}")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(data)
