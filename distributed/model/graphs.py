"""Calls the user's ``model_fn``, and builds the graph of one mode of it.

A checkpoint is restored by variable name, so the graphs that read one
(training's look at what inference reads, the SavedModel export, the
evaluation of serving checkpoints) must name their variables exactly as the
training graph does: :func:`build_mode_graph` is the one way they are built,
and :func:`call_model_fn` the one way any graph, training's included, calls
the user's function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import re
import sys
from typing import TYPE_CHECKING, Any, Callable

import tensorflow as tf

from distributed.errors import ConfigError, user_code
from distributed.model.scaffold import missing_vocabulary
from distributed.model.spec import PREDICT, TRAIN, ModelSpec, load_function
from distributed.model.walk import variables_read_by

if TYPE_CHECKING:
    from distributed.config import TrainConfig


def call_model_fn(config: TrainConfig, features, labels, mode: str) -> ModelSpec:
    """Calls the user's ``model_fn`` and checks what it returns."""
    model_fn = load_function(config.model, "model", 4)
    with user_code("model", config.model), keras_seeded(config.seed):
        try:
            spec = model_fn(features, labels, mode, dict(config.model_params))
        except ValueError as e:  # a vocabulary column counting a missing file
            missing = re.match(r"vocabulary_file in (\S+) does not exist", str(e))
            if missing is None:
                raise
            raise missing_vocabulary(
                f"{config.model}: the vocabulary file of column "
                f"{missing.group(1)!r}") from None
    if not isinstance(spec, ModelSpec):
        raise ConfigError(
            f"model: {config.model} returned {type(spec).__name__}; it must return "
            "distributed.model.ModelSpec(loss=..., predictions={...})")
    if mode == TRAIN and spec.loss is None:
        raise ConfigError(f"model: {config.model} returned no loss in train mode")
    if mode == PREDICT and not spec.predictions:
        raise ConfigError(f"model: {config.model} returned no predictions in "
                          "predict mode")
    return spec


@contextlib.contextmanager
def keras_seeded(seed: int):
    """Seeds Keras 2's own seed generator from the run's ``seed`` while the
    ``model_fn`` builds.

    ``tf.compat.v1.set_random_seed`` fixes the seeds of TF's own unseeded ops,
    but a Keras initializer or dropout made without a seed draws its seed from
    Python's ``random`` (``tf_keras.backend._SEED_GENERATOR`` unless set), so
    two runs with the same ``seed`` would start from different weights. The
    generator is thread-local and is put back after, so the user's global
    ``random`` (and NumPy's) state is left as it was; a ``model_fn`` that
    seeds Keras itself (``tf.keras.utils.set_random_seed``) still wins.
    """
    backend = sys.modules.get("tf_keras.src.backend")
    holder = getattr(backend, "_SEED_GENERATOR", None)
    if holder is None:  # Keras 2 not loaded: nothing draws from it
        yield
        return
    missing = object()
    saved = getattr(holder, "generator", missing)
    holder.generator = random.Random(seed)
    try:
        yield
    finally:
        if saved is missing:
            with contextlib.suppress(AttributeError):
                del holder.generator
        else:
            holder.generator = saved


@dataclasses.dataclass
class ModeGraph:
    """A new graph holding the inputs and the ``model_fn`` of one mode.

    Callers add their own ops to it (restore ops, metrics) under
    ``graph.as_default()``.
    """

    graph: tf.Graph
    features: dict[str, Any]  # the serving signature's inputs, in predict mode
    spec: ModelSpec

    def output_reads(self) -> set[str]:
        """Names of the variables the predictions read: what serving restores
        and what the ``inference`` selection keeps."""
        return variables_read_by(list(self.spec.predictions.values()))


def build_mode_graph(config: TrainConfig, mode: str,
                     inputs: Callable[[], tuple[dict[str, Any], Any]],
                     seed: int | None = None) -> ModeGraph:
    """Builds ``inputs`` and the model in ``mode`` in a new graph.

    Args:
        config: The run's config (``model``, ``model_params``).
        mode: One of :data:`distributed.model.MODES`; in predict mode the
            model gets no labels.
        inputs: Called inside the new graph; returns ``(features, labels)``,
            e.g. an input spec's ``placeholders`` (the serving signature).
        seed: The graph-level random seed, set before anything is built
            (evaluation passes the run's, so its input shuffles alike every
            time; the predict graphs restore their values and set none).
    """
    graph = tf.Graph()
    with graph.as_default():
        if seed is not None:
            tf.compat.v1.set_random_seed(seed)
        features, labels = inputs()
        spec = call_model_fn(config, features, None if mode == PREDICT else labels,
                             mode)
    return ModeGraph(graph, features, spec)


__all__ = ["ModeGraph", "build_mode_graph", "call_model_fn"]
