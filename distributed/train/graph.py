"""Builds the training graph identically on every worker and the coordinator.

Variable names must match across processes (the coordinator's chief Session
hands initial values to the workers by name, and rank 0 hands checkpoint values
back), so one function builds the model, the optimizer and its slots everywhere.
Only workers pass a ``reduce_fn``: the all-reduce that averages gradients.

Batch-norm statistics and other non-trainable *state* the step writes
(through ``UPDATE_OPS`` or ops the loss waits on) would drift apart on workers
that see different data, so each step exchanges their freshly written values
in the same all-reduce as the gradients and sets every replica to one value,
as each variable's ``aggregation`` declares (:mod:`distributed.train.state`).
Replicas therefore stay identical, and the moving averages equal those of the
global batch statistics' mean.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from distributed.config import OptimizerConfig, TrainConfig
from distributed.errors import ConfigError
from distributed.inputs.spec import InputSpec, step_of
from distributed.model import PREDICT, TRAIN, Initializers, initializers
from distributed.model.graphs import build_mode_graph, call_model_fn
from distributed.model.walk import placeholders_needed, walk_back
from distributed.train import optimizers, state

ReduceFn = Callable[[list], list]


def make_optimizer(cfg: OptimizerConfig, params: Mapping[str, Any] | None = None):
    """The optimizer the config names, on the default graph's global step (for
    callers that build their own graph; :mod:`distributed.train.optimizers`
    also returns the learning-rate tensor)."""
    step = tf.compat.v1.train.get_or_create_global_step()
    return optimizers.make_optimizer(cfg, step, params or {})[0]


@dataclasses.dataclass
class TrainGraph:
    """Handles into one process's training graph.

    With ``steps_per_run`` > 1 one ``Session.run`` of ``train_op`` runs
    ``steps`` (a fed scalar, at most ``steps_per_run``) training steps in an
    in-graph loop; ``loss`` then holds each step's loss and ``learning_rate``
    the last step's rate, and ``features``/``labels`` are the step's tensors
    inside the loop (feed through ``source.feed_steps``).
    """

    graph: tf.Graph
    features: dict[str, tf.Tensor]
    labels: tf.Tensor
    source: Any  # the input source (InputSpec: placeholders only)
    loss: tf.Tensor
    train_op: Any
    global_step: tf.Variable
    variables: list  # every global variable, graph order
    model_state: list  # non-trainable model variables the step writes (state.py)
    init_op: Any  # everything initializers runs but init_fn, as one op
    learning_rate: Any = None  # the schedule's value at the global step
    # optimizer.ema_decay: variable name -> its moving average's variable name
    averages: dict = dataclasses.field(default_factory=dict)
    steps_per_run: int = 1
    steps: Any = None  # steps_per_run > 1: the fed number of steps of a run
    # Estimator Scaffold semantics: global init, init_fn (chief), local init
    initializers: Initializers | None = None
    # parameter_servers: the variables on the servers (train/ps.py), graph
    # order, and their initializer; the rest is ``initializers.init_op``'s
    server_variables: list = dataclasses.field(default_factory=list)
    server_init_op: Any = None


@dataclasses.dataclass
class _Step:
    """One training step's ops (see :func:`_build_step`)."""

    loss: Any
    train_op: Any
    learning_rate: Any
    model_state: list
    averages: dict
    scaffold: Any = None  # the model_fn's scaffold (an EstimatorSpec's), if any


def build_train_graph(config: TrainConfig, inputs: InputSpec | Callable[[], Any],
                      reduce_fn: ReduceFn | None = None,
                      device: str | None = None, steps_per_run: int = 1,
                      placement: Any = None) -> TrainGraph:
    """Builds input, model, loss, (reduced) gradients and optimizer in a new graph.

    Args:
        config: The run's config.
        inputs: An :class:`InputSpec` (the model reads placeholders), or a
            function called inside the new graph that returns an input source
            (:func:`distributed.inputs.open_source`) whose tensors it reads.
        reduce_fn: Averages a list of ``(tensor, variable)`` pairs across
            workers; ``None`` on the coordinator (which never steps). Model
            state declared ``SUM`` or ``ONLY_FIRST_REPLICA`` also needs its
            group: a ``spec`` (:func:`state.group_of`).
        device: Device for the model's ops (e.g. ``/device:GPU:0``).
        steps_per_run: Steps per ``Session.run``: above 1 the step is the body
            of an in-graph loop (:func:`_build_loop`). The variables, their
            names and every step's arithmetic are the same either way.
        placement: With parameter servers, a :class:`~distributed.train.ps.
            Placement`: the variables it wants live on the servers, are
            updated by rank 0 only and initialized apart (``server_init_op``).
    """
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(config.seed)
        source = inputs if isinstance(inputs, InputSpec) else inputs()
    with graph.as_default(), tf.device(device):
        if steps_per_run > 1:
            return _on_servers(_build_loop(config, graph, source, reduce_fn,
                                           steps_per_run, placement), placement)
        if isinstance(source, InputSpec):
            features, labels = source.placeholders()
        else:
            features, labels = source.tensors()
        step = _build_step(config, features, labels,
                           _fed_placeholders(features, labels), reduce_fn, placement)
        init = initializers(step.scaffold)
        init_op = init.grouped()
        variables = list(tf.compat.v1.global_variables())
        global_step = tf.compat.v1.train.get_global_step()
    return _on_servers(TrainGraph(graph, features, labels, source, step.loss,
                                  step.train_op, global_step, variables,
                                  step.model_state, init_op, step.learning_rate,
                                  step.averages, initializers=init), placement)


def _on_servers(tg: TrainGraph, placement: Any) -> TrainGraph:
    """With parameter servers: which variables live there, and initializers
    that leave them alone (rank 0 runs ``server_init_op`` on a fresh start)."""
    if placement is None:
        return tg
    on_servers = placement.on_servers(tg.variables)
    if not on_servers:
        return tg
    init = tg.initializers
    names = {v.op.name for v in on_servers}
    with tg.graph.as_default():
        rest = [v for v in tg.variables if v.op.name not in names]
        tg.server_init_op = tf.compat.v1.variables_initializer(on_servers,
                                                               name="init_servers")
        replicated = tf.compat.v1.variables_initializer(rest, name="init_replicated")
        tg.initializers = Initializers(replicated, init.local_init_op, init.init_fn)
        tg.init_op = tg.initializers.grouped()
    tg.server_variables = on_servers
    return tg


def _build_step(config: TrainConfig, features, labels, fed: set[str],
                reduce_fn: ReduceFn | None, placement: Any = None) -> _Step:
    """Model, loss, (reduced) gradients, optimizer update, state averaging and
    moving averages of one step, in the current graph (and loop, if any)."""
    before = set(v.op.name for v in tf.compat.v1.global_variables())
    ops_before = len(tf.compat.v1.get_default_graph().get_operations())
    with placement.scope() if placement is not None else contextlib.nullcontext():
        spec = call_model_fn(config, features, labels, TRAIN)
    if placement is not None and getattr(spec.scaffold, "init_op", None) is not None:
        raise ConfigError(
            f"model: {config.model} gives a scaffold init_op, which would initialize "
            "the parameter servers' variables on every worker; drop the scaffold's "
            "init_op or set parameter_servers: 0")
    created = [v for v in tf.compat.v1.global_variables()
               if v.op.name not in before]
    if placement is not None:
        placement.check_patterns(config.model, [v.op.name for v in created])
    update_ops = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
    update_ops += _function_updates(ops_before, update_ops)
    # A functional Keras model's updates on its own Input can never run.
    in_graph = _fed_in_graph(fed)
    update_ops = [op for op, needs in zip(update_ops, placeholders_needed(update_ops))
                  if needs <= in_graph]
    loss = tf.convert_to_tensor(spec.loss)
    exchange = state.exchange_for(config.model, created, update_ops, loss, reduce_fn)
    model_state = exchange.variables
    global_step = tf.compat.v1.train.get_or_create_global_step()
    optimizer, learning_rate = optimizers.make_optimizer(
        config.optimizer, global_step, config.model_params)
    grads_and_vars = [(g, v) for g, v in optimizer.compute_gradients(loss)
                      if g is not None]
    if not grads_and_vars:
        raise ConfigError(f"model: {config.model} has no trainable variable "
                          "that the loss depends on")
    if placement is not None:
        placement.note_gradients(grads_and_vars)
    pairs = list(grads_and_vars) + list(zip(exchange.sent(), model_state))
    if reduce_fn is not None:
        pairs = reduce_fn(pairs)
    grads_and_vars, state_pairs = pairs[:len(grads_and_vars)], pairs[len(grads_and_vars):]
    # After the all-reduce: every replica clips the same gradients alike.
    grads_and_vars = optimizers.clip_gradients(grads_and_vars,
                                               config.optimizer.clip_global_norm)
    apply = _apply(config, optimizer, grads_and_vars, global_step, update_ops, placement)
    apply, averages = optimizers.apply_moving_average(config.optimizer, apply,
                                                      global_step)
    assigns = exchange.assigns([value for value, _ in state_pairs])
    train_op = tf.group(apply, *assigns, name="train_op")
    _check_fed(config, train_op, _fed_in_graph(fed))
    return _Step(loss, train_op, learning_rate, model_state, averages, spec.scaffold)


def _apply(config: TrainConfig, optimizer, grads_and_vars, global_step, update_ops,
           placement: Any):
    """The optimizer's update (after the step's update ops). With parameter
    servers the servers' variables get their own ``apply_gradients`` (no
    global step), which only rank 0 runs (:meth:`ps.Placement.apply`)."""
    on_servers = ({v.op.name for _, v in grads_and_vars
                   if placement.task_of(v) is not None}
                  if placement is not None else set())
    if not on_servers:
        with tf.control_dependencies(update_ops):
            return optimizer.apply_gradients(grads_and_vars, global_step=global_step)
    from distributed.train import ps
    replicated = [(g, v) for g, v in grads_and_vars if v.op.name not in on_servers]
    served = [(g, v) for g, v in grads_and_vars if v.op.name in on_servers]
    with tf.control_dependencies(update_ops):
        apply = (optimizer.apply_gradients(replicated, global_step=global_step)
                 if replicated else
                 tf.compat.v1.assign_add(global_step, 1).op)
    server_apply = optimizer.apply_gradients(served, name="apply_on_servers")
    ps.check_optimizer(optimizer, config.optimizer.name)
    return placement.apply(apply, server_apply, [g for g, _ in served])


def _build_loop(config: TrainConfig, graph: tf.Graph, source: Any,
                reduce_fn: ReduceFn | None, steps_per_run: int,
                placement: Any = None) -> TrainGraph:
    """Up to ``steps_per_run`` steps per ``Session.run``: the step of
    :func:`_build_step` as the body of a ``tf.while_loop`` over a fed count.

    Saves the per-run costs (the ``Session.run`` round trip to the worker's
    TF server, feeding, Python between steps) on all but one step of a run.
    Iterations run one after another (``parallel_iterations=1``): a step
    reads the variables the previous one wrote. Collectives inside the loop
    keep their instance keys; TF's collective runtime tells the iterations
    apart by the loop frame and iteration. The body is a function graph
    (control flow v2): resource variables made in it are created in the outer
    graph, under the names they get without a loop, and its collections
    (``UPDATE_OPS``, the variable store) are the outer graph's.
    """
    if isinstance(source, InputSpec):  # the coordinator's shape of a worker graph
        stacked = source.placeholders(stacked=True)
        read, fed = (lambda i: step_of(*stacked, i)), _fed_placeholders(*stacked)
    else:
        read, fed = source.step_reader(), source.fed_names()
    global_step = tf.compat.v1.train.get_or_create_global_step()
    steps = tf.compat.v1.placeholder(tf.int32, [], name="steps_per_run")
    built: list[tuple] = []  # the body's (step, features, labels), built once

    def body(i, losses, rate):
        features, labels = read(i)
        step = _build_step(config, features, labels, fed, reduce_fn, placement)
        built.append((step, features, labels))
        rate = (tf.cast(step.learning_rate, tf.float32)
                if step.learning_rate is not None else rate)
        with tf.control_dependencies([step.train_op]):
            return i + 1, losses.write(i, tf.cast(step.loss, tf.float32)), \
                tf.identity(rate)

    try:
        _, losses, rate = tf.compat.v1.while_loop(
            lambda i, *_: i < steps, body,
            [tf.constant(0), tf.TensorArray(tf.float32, size=steps), tf.constant(0.0)],
            parallel_iterations=1, name="steps")
    except (TypeError, ValueError):
        _check_loop_variables(config)  # the likely cause, said plainly
        raise
    _check_loop_variables(config)
    loss = losses.stack(name="losses")
    train_op = tf.group(loss, rate, name="train_op")
    step, features, labels = built[0]
    init = initializers(step.scaffold)
    variables = list(tf.compat.v1.global_variables())
    return TrainGraph(graph, features, labels, source, loss, train_op,
                      global_step, variables, step.model_state, init.grouped(),
                      rate if step.learning_rate is not None else None,
                      step.averages, steps_per_run, steps, initializers=init)


def _check_loop_variables(config: TrainConfig) -> None:
    """Reference variables (``use_resource=False``) cannot live in a loop's
    body; say so instead of TensorFlow's control-flow error."""
    refs = [v.op.name for v in tf.compat.v1.global_variables()
            if v.op.type in ("VariableV2", "Variable")]
    if refs:
        raise ConfigError(
            f"steps_per_run: {config.model} makes reference variables "
            f"({', '.join(refs[:3])}{' ...' if len(refs) > 3 else ''}), which an "
            "in-graph loop of steps cannot update; make resource variables (the "
            "default; drop use_resource=False) or set steps_per_run: 1")


def _fed_placeholders(features: Mapping[str, Any], labels: Any) -> set[str]:
    """Names of the placeholders the framework feeds each step: the input's."""
    tensors = list(features.values()) + ([labels] if labels is not None else [])
    return {t.op.name for t in tensors if t.op.type == "Placeholder"}


def _function_updates(ops_before: int, update_ops: Sequence[Any]) -> list:
    """In a function body (the loop of ``steps_per_run``): the variable writes
    the model function made that ``UPDATE_OPS`` lacks. A Keras layer called in
    a function makes its batch-norm updates there and relies on the function
    running every stateful op (as ``tf.function`` does), so ``model.updates``
    leaves them out; the step runs them as update ops."""
    graph = tf.compat.v1.get_default_graph()
    if not hasattr(graph, "captures"):
        return []
    known = set(update_ops)
    return [op for op in graph.get_operations()[ops_before:]
            if op not in known and state.written_handles(op)]


def _fed_in_graph(fed: set[str]) -> set[str]:
    """``fed`` plus, in a function body (the loop of ``steps_per_run``), the
    placeholders that stand for its arguments (the loop's variables) and for
    its captured outer tensors, where those need no placeholder but fed ones."""
    graph = tf.compat.v1.get_default_graph()
    if not hasattr(graph, "captures"):
        return fed
    captures = list(graph.captures)
    internal = {t.op.name for _, t in captures}
    needs = placeholders_needed([external.op for external, _ in captures])
    return fed | {t.op.name for t in graph.inputs if t.op.name not in internal} | {
        t.op.name for (_, t), need in zip(captures, needs) if need <= fed}


def _check_fed(config: TrainConfig, train_op: Any, fed: set[str]) -> None:
    """Raises :class:`ConfigError` naming the placeholders the train op needs
    that the framework does not feed (a step would fail with "You must feed a
    value for placeholder tensor")."""
    unfed = sorted((op for op in walk_back([train_op], lambda op: op.type == "Placeholder")
                    if op.name not in fed), key=lambda op: op.name)
    if not unfed:
        return
    names = ", ".join(f"'{op.name}' ({op.outputs[0].dtype.name} "
                      f"{op.outputs[0].shape})" for op in unfed)
    raise ConfigError(
        f"model: {config.model}: the train step needs placeholder(s) {names}, which "
        f"the framework never feeds (it feeds only the input's: "
        f"{', '.join(sorted(fed)) or 'none, a tf.data input'}); compute the loss from "
        "features and labels only: call a Keras model on them (model(features[...]), "
        "not model.output), add its updates with distributed.model.keras.add_model_updates("
        "model, inputs) and its losses with distributed.model.keras.model_losses(model, "
        "inputs), and make a value of your own a tf.constant or "
        "tf.compat.v1.placeholder_with_default")


# Names of moving statistics (batch norm, EMA) that a train step should update.
_MOVING_STATISTIC = re.compile(r"moving_(mean|variance|average)|ExponentialMovingAverage")


def never_updated_statistics(tg: TrainGraph, reads: set[str]) -> list[str]:
    """Moving statistics the predict outputs read that no train step updates.

    Non-trainable variables named like moving statistics (``moving_mean``,
    ``moving_variance``, ``ExponentialMovingAverage``) that nothing in
    ``UPDATE_OPS`` writes keep their initial values, and serving would use
    those: the usual cause is a Keras model whose ``model.updates`` were not
    added to ``UPDATE_OPS``.
    """
    trainable = {v.op.name for v in tg.variables if v.trainable}
    updated = {v.op.name for v in tg.model_state}
    return sorted(n for n in reads if n not in trainable and n not in updated
                  and _MOVING_STATISTIC.search(n))


def predict_reads(config: TrainConfig, input_spec: InputSpec) -> set[str]:
    """Names of the variables the predict-mode outputs read (own throwaway
    graph, built as the export builds it): what the selection needs."""
    return build_mode_graph(config, PREDICT, input_spec.placeholders).output_reads()


class VariableLoader:
    """Loads numpy values into a graph's variables by name, without growing it."""

    def __init__(self, variables: Sequence[tf.Variable]):
        self._by_name = {v.op.name: v for v in variables}
        graph = next(iter(self._by_name.values())).graph
        with graph.as_default(), tf.name_scope("loader"):
            self._feeds = {}
            ops = []
            for name, v in self._by_name.items():
                ph = tf.compat.v1.placeholder(v.dtype.base_dtype, v.shape)
                self._feeds[name] = ph
                ops.append(v.assign(ph, read_value=False))
            self._ops = dict(zip(self._by_name, ops))

    def load(self, sess, values: Mapping[str, np.ndarray]) -> None:
        # Parts of a partitioned variable must match the sender's, by name and
        # shape: a clear error naming the variable, not a feed traceback.
        from distributed.checkpoint.partition import check_values_fit
        check_values_fit(self._by_name, values)
        sess.run([self._ops[n] for n in values],
                 {self._feeds[n]: v for n, v in values.items()})
