"""One TF world: the environment of every process that builds a user's graph.

Workers, the coordinator, the evaluator, the restore job, the checkpoint CLI,
the benchmarks and the tests all build the user's ``tf.compat.v1`` graph, and
they must build the *same* one. TensorFlow 2.16 and later route ``tf.keras``,
``tensorflow.keras`` and ``tf.compat.v1.layers`` to Keras 3 unless
``TF_USE_LEGACY_KERAS=1``; Keras 3 cannot build into a v1 graph (``dense`` is
not available with Keras 3, ``add_weight`` takes its name by keyword only), so
a model that trains in the actors would fail to export in a process that forgot
the switch. This module is the one place that sets it: importing
:mod:`distributed` applies :data:`ENV`, and the trainer hands the same values to
every actor (:func:`actor_env`). Import :mod:`distributed` before TensorFlow:
``tf.keras`` and ``tf.compat.v1.layers`` read the switch lazily, on first use,
but ``from tensorflow.keras import ...`` (what libraries such as DeepCTR do) is
bound when TensorFlow is imported. Every entry point of the project (the jobs,
the checkpoint CLI, the actors, the tests' conftest) does.

A value the user set in the environment wins (``TF_CPP_MIN_LOG_LEVEL=0`` to see
TensorFlow's info lines); ``TF_USE_LEGACY_KERAS=0`` is honoured too, though
graph-mode models then cannot use Keras layers.
"""

from __future__ import annotations

import os

ENV = {
    # TensorFlow's C++ log level: warnings and errors only.
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # tf.keras / tensorflow.keras / tf.compat.v1.layers are Keras 2 (tf_keras).
    "TF_USE_LEGACY_KERAS": "1",
}


def enter() -> None:
    """Applies :data:`ENV` to this process (values already set are kept)."""
    for key, value in ENV.items():
        os.environ.setdefault(key, value)


def actor_env() -> dict[str, str]:
    """:data:`ENV` with this process's own values, for processes it starts."""
    return {key: os.environ.get(key, value) for key, value in ENV.items()}
