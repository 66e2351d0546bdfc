"""The input spec: feature names, dtypes and per-example shapes.

Learned from a Python input's first batch or from a ``tf.data`` dataset's
``element_spec``; either way the same spec builds the placeholders of the
coordinator's graph, the predict graph and the serving signature, so every
kind of input serves the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from distributed.errors import ConfigError

Shape = tuple  # ints, or None for a dimension the input leaves unknown


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """Dtypes and per-example shapes of the input.

    Attributes:
        features: Feature name -> (dtype name, shape without the batch dim);
            a ``None`` dimension is unknown (e.g. variable-length text).
        labels: (dtype name, shape without the batch dim).
    """

    features: Mapping[str, tuple[str, Shape]]
    labels: tuple[str, Shape]

    @classmethod
    def from_batch(cls, features: Any, labels: Any, where: str) -> "InputSpec":
        """The spec of one ``(features dict, labels)`` numpy batch."""
        if not isinstance(features, Mapping) or not features:
            raise ConfigError(
                f"{where}: features must be a non-empty dict of name -> numpy array, "
                f"got {type(features).__name__}")
        spec = {}
        for name, value in features.items():
            arr = np.asarray(value)
            if arr.ndim < 1:
                raise ConfigError(f"{where}: feature {name!r} has no batch dimension")
            spec[str(name)] = (dtype_name(arr), tuple(int(d) for d in arr.shape[1:]))
        lab = np.asarray(labels)
        if lab.ndim < 1:
            raise ConfigError(f"{where}: labels have no batch dimension")
        return cls(spec, (dtype_name(lab), tuple(int(d) for d in lab.shape[1:])))

    @classmethod
    def from_element_spec(cls, element_spec: Any, where: str) -> "InputSpec":
        """The spec of a ``tf.data`` dataset whose elements are batches of
        ``(features dict, labels)``."""
        import tensorflow as tf
        if not (isinstance(element_spec, tuple) and len(element_spec) == 2):
            raise ConfigError(
                f"{where}: the dataset's elements must be (features dict, labels) "
                f"pairs, got {_describe(element_spec)}; map them into that shape, "
                "e.g. ds.map(lambda x, y: ({'image': x}, y))")
        features, labels = element_spec
        if not isinstance(features, Mapping) or not features:
            raise ConfigError(
                f"{where}: the first part of each dataset element must be a "
                f"non-empty dict of name -> tensor, got {_describe(features)}; "
                "e.g. ds.map(lambda x, y: ({'image': x}, y))")
        spec = {}
        for name, ts in sorted(features.items()):
            spec[str(name)] = _tensor_spec(ts, f"feature {name!r}", where, tf)
        return cls(spec, _tensor_spec(labels, "the labels", where, tf))

    def placeholders(self, stacked: bool = False) -> tuple[dict[str, Any], Any]:
        """One placeholder per feature (``input/<name>``) and for the labels,
        ``[batch, ...]``; ``stacked``: ``[steps, batch, ...]``, the batches of
        several steps fed at once."""
        import tensorflow as tf
        lead = (None, None) if stacked else (None,)
        features = {
            name: tf.compat.v1.placeholder(tf.as_dtype(dtype), lead + tuple(shape),
                                           name=f"input/{name}")
            for name, (dtype, shape) in sorted(self.features.items())}
        ldtype, lshape = self.labels
        labels = tf.compat.v1.placeholder(tf.as_dtype(ldtype), lead + tuple(lshape),
                                          name="input/labels")
        return features, labels

    def to_json(self) -> dict[str, Any]:
        return {"features": {k: [d, list(s)] for k, (d, s) in self.features.items()},
                "labels": [self.labels[0], list(self.labels[1])]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "InputSpec":
        return cls({k: (d, tuple(s)) for k, (d, s) in data["features"].items()},
                   (data["labels"][0], tuple(data["labels"][1])))

    def __str__(self) -> str:
        def one(dtype, shape):
            return f"{dtype}[batch{''.join(f', {d}' for d in shape)}]"
        feats = ", ".join(f"{k}: {one(*v)}" for k, v in sorted(self.features.items()))
        return f"features {{{feats}}}, labels {one(*self.labels)}"


def dtype_name(arr: np.ndarray) -> str:
    """The TF dtype name of a numpy batch (text arrays are ``string``)."""
    if arr.dtype.kind in "OSU":
        return "string"
    return arr.dtype.name


def _tensor_spec(ts: Any, what: str, where: str, tf) -> tuple[str, Shape]:
    if not isinstance(ts, tf.TensorSpec):
        raise ConfigError(
            f"{where}: {what} is {_describe(ts)}, not a dense tensor; convert it in "
            "the dataset (tf.sparse.to_dense, RaggedTensor.to_tensor) or give a "
            "dict of dense tensors")
    if ts.shape.rank is None:
        raise ConfigError(
            f"{where}: {what} has unknown rank; give it a static rank in the "
            "dataset (e.g. ds.map(lambda f, y: ...) with tf.ensure_shape or "
            "tf.reshape) so the model and the serving signature know its shape")
    if ts.shape.rank == 0:
        raise ConfigError(f"{where}: {what} has no batch dimension; batch the "
                          "dataset (.batch(batch_size)) inside input_fn")
    return ts.dtype.name, tuple(ts.shape.as_list()[1:])


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def step_of(features: Mapping[str, Any], labels: Any, i: Any) -> tuple[dict[str, Any], Any]:
    """Step ``i``'s batch of stacked (``[steps, batch, ...]``) input tensors:
    what one iteration of an in-graph loop of steps reads."""
    return {k: v[i] for k, v in features.items()}, labels[i]

