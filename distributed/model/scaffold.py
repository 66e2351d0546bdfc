"""How every graph the framework runs is initialized: Estimator's Scaffold rules.

Training (every worker and the coordinator), evaluation and the exported
SavedModel's main op all initialize through here, so a ``model_fn`` written
for Estimator finds what it expects to have run (global variables, the
chief's ``init_fn``, local variables and lookup tables) wherever it runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from distributed.errors import ConfigError


@dataclasses.dataclass
class Initializers:
    """How a graph the framework runs is initialized (Estimator's Scaffold).

    Attributes:
        init_op: Initializes the global variables (the scaffold's ``init_op``,
            else ``global_variables_initializer()``).
        local_init_op: Runs after ``init_op`` and after a restore: local
            variables, lookup tables (``TABLE_INITIALIZERS``) and local
            resources; the scaffold's ``local_init_op``, else the
            ``LOCAL_INIT_OP`` collection's op, else Scaffold's default.
        init_fn: The scaffold's ``init_fn`` (``init_fn(session)``, bound to its
            scaffold), or ``None``. NOTE: only the chief runs it, on a fresh
            start (never on a resume), as Estimator does; the workers then get
            the values it set.
    """

    init_op: Any
    local_init_op: Any
    init_fn: Callable[[Any], None] | None = None

    def grouped(self) -> Any:
        """``init_op`` and ``local_init_op`` as one op (no ``init_fn``)."""
        import tensorflow as tf
        return tf.group(self.init_op, self.local_init_op)

    def run(self, session, chief: bool = False) -> None:
        """``init_op``, then (chief) ``init_fn``, then ``local_init_op``."""
        session.run(self.init_op)
        if chief and self.init_fn is not None:
            self.init_fn(session)
        session.run(self.local_init_op)


def initializers(scaffold: Any = None) -> Initializers:
    """The :class:`Initializers` of the current default graph, given the
    model's ``scaffold`` (or ``None``), with ``tf.compat.v1.train.Scaffold``'s
    rules: what a model_fn built for Estimator expects to have run, lookup
    tables of ``tf.compat.v1.feature_column`` vocabulary columns included."""
    import tensorflow as tf
    init_op = getattr(scaffold, "init_op", None)
    if init_op is None:
        init_op = tf.compat.v1.global_variables_initializer()
    return Initializers(init_op, local_initializer(scaffold),
                        getattr(scaffold, "init_fn", None))


def local_initializer(scaffold: Any = None) -> Any:
    """:attr:`Initializers.local_init_op` alone (what a SavedModel's main op
    runs): the scaffold's ``local_init_op``, else the ``LOCAL_INIT_OP``
    collection's op, else Scaffold's default (local variables, tables, local
    resources). Checks the tables' vocabulary files first."""
    import tensorflow as tf
    _check_vocabulary_files()
    local = getattr(scaffold, "local_init_op", None)
    if local is None:
        collected = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.LOCAL_INIT_OP)
        local = (tf.group(*collected) if collected else
                 tf.compat.v1.train.Scaffold.default_local_init_op())
    return local


def _check_vocabulary_files() -> None:
    """Raises :class:`ConfigError` naming a vocabulary file that a lookup table
    of the current default graph reads (``categorical_column_with_vocabulary_file``,
    ``tf.lookup.TextFileInitializer``) and that this node does not have, before
    initializing the table fails with TensorFlow's ``NotFoundError``."""
    import tensorflow as tf
    from tensorflow.python.framework import tensor_util
    for op in tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.TABLE_INITIALIZERS):
        if not op.type.startswith("InitializeTableFromTextFile"):
            continue
        path = tensor_util.constant_value(op.inputs[1])
        if path is None:
            continue
        path = path.item() if hasattr(path, "item") else path  # a 0-d array
        path = path.decode() if isinstance(path, bytes) else str(path)
        if not tf.io.gfile.exists(path):
            raise missing_vocabulary(f"vocabulary file {path!r} (table "
                                     f"{op.inputs[0].op.name!r})")


def missing_vocabulary(what: str) -> ConfigError:
    """The one-line error for a vocabulary file this node does not have."""
    import socket
    return ConfigError(
        f"model: {what} does not exist on node {socket.gethostname()}; put it at the "
        "same path on every node (a shared mount, or an object store path such as "
        "gs://...)")


__all__ = ["Initializers", "initializers", "local_initializer", "missing_vocabulary"]
