"""Loads google-research/bert's ``modeling.py`` and ``optimization.py``
(vendored unmodified in ``google_bert/``) on TensorFlow 2.

The two files are TF1 code: ``import tensorflow as tf`` and then
``tf.get_variable``, ``tf.variable_scope``, ``tf.layers.dense``,
``tf.train.Optimizer``, ``tf.gfile`` ... and ``tf.contrib.layers.layer_norm``.
On TensorFlow 2 every name but the ``contrib`` one lives in
``tf.compat.v1``. So each file is executed with a stand-in for its
``tensorflow`` import: a module that answers every name from
``tf.compat.v1`` and adds :func:`layer_norm` as ``contrib.layers.layer_norm``.

The stand-in is given to the vendored module alone, through its own
``__builtins__`` (an ``__import__`` that maps ``tensorflow`` to the stand-in):
``sys.modules['tensorflow']`` is never rebound, so no other thread of the
process (a Ray actor's input reader, TensorFlow's own lazy imports) can see it.

``tf.layers.dense`` is ``tf.compat.v1.layers.dense``, which on TensorFlow
2.16+ exists only with ``TF_USE_LEGACY_KERAS=1`` set before TensorFlow is
imported (Keras 2, from ``tf_keras``).
"""

from __future__ import annotations

import builtins
import functools
import importlib.util
import os
import sys
import types

import tensorflow as tf

HERE = os.path.dirname(os.path.abspath(__file__))
VENDORED = os.path.join(HERE, "google_bert")
PACKAGE = "tests.thirdparty.google_bert"


def layer_norm(inputs, center=True, scale=True, activation_fn=None, reuse=None,
               variables_collections=None, outputs_collections=None,
               trainable=True, begin_norm_axis=1, begin_params_axis=-1,
               scope=None):
    """``tf.contrib.layers.layer_norm`` (TF 1.15) in ``tf.compat.v1`` ops.

    Same variables (``<scope or LayerNorm>/beta`` and ``/gamma``, model
    variables, shaped like the inputs from ``begin_params_axis`` on), same
    arithmetic (moments over the axes from ``begin_norm_axis`` on, epsilon
    1e-12), so a checkpoint of TF1 BERT loads and computes alike.
    ``variables_collections`` and ``outputs_collections`` are not supported.
    """
    if variables_collections or outputs_collections:
        raise NotImplementedError("layer_norm stand-in: collections arguments")
    v1 = tf.compat.v1
    with v1.variable_scope(scope, "LayerNorm", [inputs], reuse=reuse):
        inputs = tf.convert_to_tensor(inputs)
        shape = inputs.shape
        rank = shape.rank
        if rank is None:
            raise ValueError(f"Inputs {inputs.name} have undefined rank.")
        if begin_norm_axis < 0:
            begin_norm_axis += rank
        if begin_params_axis < 0:
            begin_params_axis += rank
        if begin_params_axis >= rank or begin_norm_axis >= rank:
            raise ValueError(f"begin_params_axis ({begin_params_axis}) and "
                             f"begin_norm_axis ({begin_norm_axis}) must be < rank "
                             f"({rank})")
        params_shape = shape[begin_params_axis:]
        if not params_shape.is_fully_defined():
            raise ValueError(f"Inputs {inputs.name}: shape[{begin_params_axis}:] "
                             f"is not fully defined: {shape}")
        dtype = inputs.dtype.base_dtype
        collections = [v1.GraphKeys.GLOBAL_VARIABLES, v1.GraphKeys.MODEL_VARIABLES]
        beta = gamma = None
        if center:
            beta = v1.get_variable("beta", params_shape, dtype,
                                   initializer=v1.zeros_initializer(),
                                   collections=collections, trainable=trainable)
        if scale:
            gamma = v1.get_variable("gamma", params_shape, dtype,
                                    initializer=v1.ones_initializer(),
                                    collections=collections, trainable=trainable)
        mean, variance = tf.nn.moments(inputs, list(range(begin_norm_axis, rank)),
                                       keepdims=True)
        outputs = tf.nn.batch_normalization(inputs, mean, variance, offset=beta,
                                            scale=gamma, variance_epsilon=1e-12)
        outputs.set_shape(shape)
        if activation_fn is not None:
            outputs = activation_fn(outputs)
        return outputs


class _TensorFlowV1(types.ModuleType):
    """``tensorflow`` as TF1 code saw it: ``tf.compat.v1`` plus ``contrib``."""

    def __getattr__(self, name):
        return getattr(tf.compat.v1, name)


def tensorflow_v1() -> types.ModuleType:
    """The stand-in module the vendored files get for ``import tensorflow``."""
    module = _TensorFlowV1("tensorflow")
    module.contrib = types.SimpleNamespace(
        layers=types.SimpleNamespace(layer_norm=layer_norm))
    return module


def _builtins_with(stand_in: types.ModuleType) -> dict:
    """The builtins, but ``import tensorflow`` gives ``stand_in``."""
    def import_(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "tensorflow" and level == 0:
            return stand_in
        return builtins.__import__(name, globals, locals, fromlist, level)
    table = dict(vars(builtins))
    table["__import__"] = import_
    return table


@functools.lru_cache(maxsize=None)
def load(name: str) -> types.ModuleType:
    """The vendored ``google_bert/<name>.py`` (``modeling`` or
    ``optimization``) executed against the stand-in, once per process.

    The module is registered as ``tests.thirdparty.google_bert.<name>``, so
    its classes pickle and ``import`` finds the loaded copy.
    """
    qualified = f"{PACKAGE}.{name}"
    spec = importlib.util.spec_from_file_location(
        qualified, os.path.join(VENDORED, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    module.__builtins__ = _builtins_with(tensorflow_v1())
    spec.loader.exec_module(module)
    sys.modules[qualified] = module
    return module


def modeling() -> types.ModuleType:
    """BERT's ``modeling`` module (``BertConfig``, ``BertModel``, ...)."""
    return load("modeling")


def optimization() -> types.ModuleType:
    """BERT's ``optimization`` module (``AdamWeightDecayOptimizer``, ...)."""
    return load("optimization")


__all__ = ["layer_norm", "tensorflow_v1", "load", "modeling", "optimization"]
