"""Evaluation of serving checkpoints, on the coordinator's side (config ``eval``).

* :class:`Evaluator` builds an eval-mode graph of its own (``model_fn(...,
  mode=EVAL)`` on the eval input), with ``eval/loss`` (the mean loss) and
  ``eval/<name>`` for each of ``ModelSpec.eval_metrics`` (``{name: (value,
  update_op)}``, Estimator's ``eval_metric_ops`` shape). :meth:`evaluate` loads
  a checkpoint's values by name, resets the metric (local) variables, runs the
  update ops over ``eval.batches`` batches (or to the input's end) and returns
  the metric values.
* :class:`EvalPipeline` runs evaluations on a thread of the coordinator actor,
  so a worker never waits: ``Coordinator.save`` writes and renames the
  serving checkpoint's directory as today but does not write its catalog row;
  it hands ``(entry, values)`` to the pipeline. The pipeline evaluates, then
  commits the row *with the metrics* (the row is still the commit record: a
  crash during evaluation leaves an orphan directory that the next
  ``CheckpointStore.open`` removes, never a row without data). When a newer
  checkpoint arrives while one still waits, the waiting one is committed
  without eval metrics and the pipeline says it skipped it.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Mapping

import numpy as np

from distributed.checkpoint.metric_goal import MetricGoal
from distributed.errors import ConfigError, user_code
from distributed.model import EVAL, initializers
from distributed.train.protocol import EVAL_FAILED, EVAL_SKIPPED, CheckpointEvent
from distributed.train.devices import cpu_only


class Evaluator:
    """An eval-mode graph and Session for one run's model and eval input.

    Args:
        config: The run's config (with an ``eval`` block).
        value_names: The names serving checkpoints hold (what :meth:`evaluate`
            is given); the eval graph's other variables keep initial values.
        dataset: A Ray Data eval input's dataset, as the driver loaded it
            (``None``: loaded here, as the driver would).
    """

    def __init__(self, config, value_names, dataset=None):
        import tensorflow as tf

        from distributed.model.graphs import build_mode_graph
        from distributed.train.graph import VariableLoader
        ev = config.eval
        self.config, self.batches = config, ev.batches
        self.batch_size = ev.batch_size or config.batch_size
        self.params = ev.params_or(config.input_params)
        self.ref = ev.input_ref
        self._dataset = self._source = None
        built = build_mode_graph(config, EVAL, lambda: self._open_input(dataset),
                                 seed=config.seed)
        self.graph = built.graph
        with self.graph.as_default():
            self._updates = self._metrics(config, built.spec)
            variables = tf.compat.v1.global_variables()
            self._loader = VariableLoader(variables) if variables else None
            self._names = {v.op.name for v in variables}
            # Metrics reset (local variables) each evaluation; tables once.
            self._local_init = tf.compat.v1.local_variables_initializer()
            init = initializers(built.spec.scaffold).grouped()
        self.missing = sorted(self._names - set(value_names))
        self.sess = tf.compat.v1.Session(graph=self.graph, config=cpu_only())
        self.sess.run(init)

    def _open_input(self, dataset):
        """The eval input's ``(features, labels)`` in the graph being built:
        a tf.data dataset's tensors, or placeholders for Python batches."""
        from distributed.inputs.sources import (DatasetSource, PythonSource,
                                                call_input_fn, is_dataset)
        from distributed.model import load_function
        ev = self.config.eval
        if ev.ray_input:
            from distributed.inputs import raydata
            self._dataset = dataset if dataset is not None else raydata.load_dataset(
                self.ref, ev.input_label, self.params, field="eval.input")
            first = self._python_batches()
        else:
            self._input_fn = load_function(self.ref, "eval.input", 4)
            first = call_input_fn(self._input_fn, self.ref, 0, 1, self.batch_size,
                                  self.params)
        if is_dataset(first):
            self._source = DatasetSource(first, self.ref, 0)
            features, labels = self._source.tensors()
            self._check_finite(first)
        else:
            probe = PythonSource(first, self.ref, "eval.input", 0, prefetch=0)
            probe.close()
            self.spec = probe.spec
            features, labels = self.spec.placeholders()
            self._placeholders = (features, labels)
        return features, labels

    def _metrics(self, config, spec):
        """Sets ``self.values`` (``eval/loss`` and ``eval/<name>``); returns the
        op that updates them all with one batch."""
        import tensorflow as tf
        if spec.loss is None:
            raise ConfigError(f"model: {config.model} returned no loss in eval mode; "
                              "evaluation records eval/loss")
        loss_value, loss_update = tf.compat.v1.metrics.mean(spec.loss)
        self.values, updates = {"eval/loss": loss_value}, [loss_update]
        for name, pair in dict(spec.eval_metrics or {}).items():
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise ConfigError(
                    f"model: eval_metrics[{name!r}] of {config.model} is "
                    f"{type(pair).__name__}; give (value_tensor, update_op), "
                    "e.g. tf.compat.v1.metrics.accuracy(labels, predictions)")
            self.values[f"eval/{name}"] = pair[0]
            updates.append(pair[1])
        return tf.group(*updates)

    def _python_batches(self):
        """A fresh pass over the Python eval input: the ``input_fn``'s
        generator, or the Ray Data dataset from its first row to its last."""
        if self._dataset is not None:
            from distributed.inputs import raydata
            return raydata.epoch_batches(self._dataset, self.batch_size,
                                         self.config.eval.input_label, self.ref,
                                         drop_last=False)
        with user_code("eval.input", self.ref):
            return iter(self._input_fn(0, 1, self.batch_size, dict(self.params)))

    def _check_finite(self, dataset) -> None:
        import tensorflow as tf
        if self.batches is None:  # in the graph being built
            with tf.compat.v1.Session(graph=tf.compat.v1.get_default_graph(),
                                      config=cpu_only()) as sess:
                if int(sess.run(dataset.cardinality())) == tf.data.INFINITE_CARDINALITY:
                    raise ConfigError(
                        f"eval.input: the tf.data dataset of {self.ref} repeats "
                        "forever and eval.batches is null (read to the end); set "
                        "eval.batches or drop .repeat()")

    def metric_names(self) -> list[str]:
        return sorted(self.values)

    def evaluate(self, values: Mapping[str, np.ndarray]) -> tuple[dict[str, float], int]:
        """The metrics of the checkpoint holding ``values``, and the batches read.

        An error of the user's ops is a :class:`~distributed.errors.StepError`
        naming the op and the user's lines, as in training.
        """
        import tensorflow as tf

        from distributed.train.op_errors import user_op_error
        try:
            return self._evaluate(values)
        except tf.errors.OpError as e:
            raise (user_op_error(e, self.graph, "evaluation") or e) from None

    def _evaluate(self, values: Mapping[str, np.ndarray]) -> tuple[dict[str, float], int]:
        import tensorflow as tf
        if self._loader is not None:
            self._loader.load(self.sess, {n: v for n, v in values.items()
                                          if n in self._names})
        self.sess.run(self._local_init)
        n = 0
        if self._source is not None:
            self._source.start(self.sess)
            while self.batches is None or n < self.batches:
                try:
                    self.sess.run(self._updates)
                except tf.errors.OutOfRangeError:
                    break
                n += 1
        else:
            features, labels = self._placeholders
            for batch in _take(self._python_batches(), self.batches, self.ref):
                feed = {features[k]: v for k, v in batch[0].items()}
                feed[labels] = batch[1]
                self.sess.run(self._updates, feed)
                n += 1
        if n == 0:
            raise ConfigError(f"eval.input: {self.ref} gave no batch to evaluate")
        return {k: float(v) for k, v in self.sess.run(self.values).items()}, n


def _take(batches, limit: int | None, ref: str):
    n = 0
    while limit is None or n < limit:
        with user_code("eval.input", ref):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch
        n += 1


class EarlyStop:
    """``eval.stop_when``: a decision from each evaluation's metrics (pure).

    Args:
        metric: The metric watched (``eval/...``).
        mode: ``min`` or ``max``.
        patience: Evaluations in a row without a new best before it says stop.
    """

    def __init__(self, metric: str, mode: str, patience: int):
        self.goal, self.patience = MetricGoal(metric, mode), patience
        self.best: float | None = None
        self.best_step: int | None = None
        self.since_best = 0

    def observe(self, step: int, metrics: Mapping[str, float]) -> str | None:
        """Records one evaluation; returns why to stop, or ``None``."""
        value = metrics.get(self.goal.metric)
        if value is None:
            return None
        if self.best is None or self.goal.better(value, self.best):
            self.best, self.best_step, self.since_best = value, step, 0
            return None
        self.since_best += 1
        if self.since_best < self.patience:
            return None
        return (f"{self.goal.metric} has not improved for {self.since_best} evaluations "
                f"(best {self.best:.4f} at step {self.best_step}; eval.stop_when "
                f"patience {self.patience})")


class EvalPipeline:
    """Evaluates serving checkpoints on a background thread, newest first.

    Args:
        evaluate: ``values -> (metrics, batches)``.
        commit: ``(entry, metrics) -> None``: writes the catalog row.
    """

    def __init__(self, evaluate: Callable, commit: Callable):
        self._evaluate, self._commit = evaluate, commit
        self._lock = threading.Condition()
        self._waiting: tuple[Any, Mapping[str, Any], dict] | None = None
        self._busy = False
        self.events: list[CheckpointEvent] = []
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name="evaluator")
        self._thread.start()

    def submit(self, entry, values, metrics: dict) -> None:
        with self._lock:
            skipped = self._waiting
            self._waiting = (entry, values, metrics)
            self._lock.notify_all()
        if skipped is not None:  # evaluation fell behind: commit it unevaluated
            self._commit(skipped[0], skipped[2])
            self.events.append(CheckpointEvent(EVAL_SKIPPED, skipped[0].step))

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._waiting is None:
                    self._lock.wait()
                entry, values, metrics = self._waiting
                self._waiting, self._busy = None, True
            try:
                found, _ = self._evaluate(values)
                self._commit(entry, {**metrics, **found})
            except Exception as e:  # evaluation must never lose the checkpoint
                self._commit(entry, metrics)
                self.events.append(CheckpointEvent(EVAL_FAILED, entry.step,
                                                   error=str(e)))
            finally:
                with self._lock:
                    self._busy = False
                    self._lock.notify_all()

    def drain(self) -> None:
        """Waits until every submitted checkpoint is committed."""
        with self._lock:
            while self._waiting is not None or self._busy:
                self._lock.wait()
