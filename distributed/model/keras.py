"""The update ops and losses of one call of a Keras 2 (``tf_keras``) model.

In a ``tf.compat.v1`` graph a Keras model keeps its batch-norm updates in
``model.updates`` and its regularization terms in ``model.losses``, not in the
graph's collections. A *functional* model (built from ``Input`` layers, as
everything in ``tf_keras.applications`` is) also holds there the updates and
losses its layers built on its own ``Input`` placeholders when the model was
constructed; running those needs a value for that placeholder, which nothing
feeds (``You must feed a value for placeholder tensor 'input_1'``). The
functions here keep only what belongs to the call on ``inputs``, so one recipe
serves Sequential, functional and subclassed models alike::

    logits = model(x, training=mode == TRAIN)
    add_model_updates(model, x)                 # into UPDATE_OPS, run each step
    loss = cross_entropy + tf.add_n(model_losses(model, x) or [0.0])
"""

from __future__ import annotations

import warnings
from typing import Any

import tensorflow as tf

from distributed.model.walk import placeholders_needed, walk_back


def model_updates(model: Any, inputs: Any) -> list:
    """The ops in ``model.updates`` that the call on ``inputs`` needs run.

    Keeps the updates whose placeholders are all among those ``inputs`` come
    from (an update built on the model's own ``Input`` needs that placeholder,
    so it is left out) and unconditional ones (which need no placeholder).

    Args:
        model: A ``tf_keras`` model (or layer) already called on ``inputs``.
        inputs: The tensor (or nest of tensors) it was called on.
    """
    return _for_inputs(_quietly(lambda: model.updates), inputs)


def model_losses(model: Any, inputs: Any) -> list:
    """The tensors in ``model.losses`` (regularization terms) of the call on
    ``inputs``; add their sum to the loss yourself."""
    return _for_inputs(_quietly(lambda: model.losses), inputs)


def add_model_updates(model: Any, inputs: Any) -> list:
    """Adds :func:`model_updates` to ``tf.compat.v1.GraphKeys.UPDATE_OPS``
    (each op once), where the framework runs them with every train step and
    averages the statistics they write across workers; returns them."""
    updates = model_updates(model, inputs)
    collected = tf.compat.v1.get_collection_ref(tf.compat.v1.GraphKeys.UPDATE_OPS)
    known = set(collected)
    collected.extend(op for op in updates if op not in known)
    return updates


def _for_inputs(items: list, inputs: Any) -> list:
    """``items`` whose placeholders are all placeholders that ``inputs`` read."""
    allowed = {op.name for op in walk_back(
        tf.nest.flatten(inputs), lambda op: op.type == "Placeholder")}
    needs = placeholders_needed(items)
    return [item for item, names in zip(items, needs) if names <= allowed]


def _quietly(read):
    """Reads a Keras property without its TF2 deprecation warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(read())


__all__ = ["add_model_updates", "model_losses", "model_updates"]
