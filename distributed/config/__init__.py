"""The training config: YAML in, typed dataclasses inside, every field validated.

Errors name the field (``checkpoint.serving_every``), the bad value and what
would be valid. Unknown keys are errors, not silently ignored, so a typo
cannot quietly fall back to a default.

The modules, by job: :mod:`~distributed.config.coerce` builds dataclasses
from mappings by their type hints; :mod:`~distributed.config.checks` holds the
value checks; :mod:`~distributed.config.sections` the sections (optimizer,
checkpoint, eval); :mod:`~distributed.config.run` the whole
:class:`TrainConfig`; :mod:`~distributed.config.load` reads YAML.
"""

from distributed.config.load import from_dict, load
from distributed.config.run import TrainConfig
from distributed.config.sections import (CheckpointConfig, EvalConfig, OptimizerConfig,
                                         StopWhen)

__all__ = ["CheckpointConfig", "EvalConfig", "OptimizerConfig", "StopWhen", "TrainConfig",
           "from_dict", "load"]
