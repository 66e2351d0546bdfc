"""What the driver checks before the actors start, so that a mistake in the
config, the user's code or the storage fails in seconds with one clear error
and nothing written."""

from __future__ import annotations

from typing import Any

from distributed.config import TrainConfig
from distributed.model import load_function
from distributed.train.cluster import free_cpus


def check_storage(config: TrainConfig) -> None:
    """Fails fast, before Ray starts, when the run's storage cannot be written:
    an object store that cannot be reached or has no such bucket, or a local
    directory (an object store's staging mirror) where no file can be made."""
    from distributed.storage.runstore import open_writer
    open_writer(config.storage, config.run, config.storage_options,
                config.staging or None).check_writable()


def check_functions(config: TrainConfig) -> None:
    """Imports the model and input functions in the driver, before any actor,
    and builds the optimizer and its schedule in a throwaway graph."""
    load_function(config.model, "model", 4)
    from distributed.train import optimizers
    optimizers.check(config.optimizer, config.model_params)
    for field, named, _ in _inputs(config):
        if named.ray_input:
            load_function(named.input_ref, f"{field}.ray_dataset", 1)
        else:
            load_function(named.input_ref, field, 4)


def load_ray_datasets(config: TrainConfig) -> tuple[Any, Any]:
    """The Ray Data datasets of the input and the eval input (``None`` where
    that input is not Ray Data), loaded and checked in the driver before the
    actors take their CPUs."""
    loaded = {}
    for field, named, params in _inputs(config):
        if named.ray_input:
            from distributed.inputs import raydata
            dataset = raydata.load_dataset(named.input_ref, named.input_label, params,
                                           field=field)
            raydata.check_cpus(dataset, free_cpus(config), named.input_ref)
            if field == "input" and config.saves_input_position:
                from distributed.inputs.raystream import check_order
                check_order(dataset, named.input_ref)
            loaded[field] = dataset
    return loaded.get("input"), loaded.get("eval.input")


def _inputs(config: TrainConfig) -> list[tuple[str, Any, dict]]:
    """``(field, config part, params)`` of the input and the eval input."""
    inputs = [("input", config, config.input_params)]
    if config.eval is not None:
        inputs.append(("eval.input", config.eval,
                       config.eval.params_or(config.input_params)))
    return inputs
