"""Parameter servers: embedding tables that live outside the workers.

With ``parameter_servers: N`` the run starts N :class:`ParameterServer`
actors. Each runs a TF server as job ``ps``, task i, of the workers' own TF
cluster (:func:`distributed.train.collective.start_server`); the servers hold
no graph of their own and never join the collectives. The workers' graphs
place every partitioned variable (and every ``ps_variables`` match) on
``/job:ps/task:i`` (:class:`Placement`, greedy by bytes), so TF's own remote
reads serve ``tf.nn.embedding_lookup`` and the optimizer's slots follow their
variable (TF colocates them). Everything else stays replicated and
all-reduced as without servers.

A step (:meth:`Placement.apply`): the sparse gradients are all-gathered as
always, so every worker holds the same rows; only rank 0 applies them to the
server-resident variables, then every worker meets in a scalar collective (the
barrier), so the next step's lookups read the updated rows.

The variables on the servers are initialized, restored and saved where they
live: rank 0 runs their initializers, or a sharded ``Saver``'s restore ops
placed on the servers that read the checkpoint files themselves; a checkpoint's
snapshot of them is taken on the servers (:mod:`~distributed.train.snapshot`)
and :class:`ServerSaver` (the coordinator's, a TF client of the servers) has
each server write its own shard files with ``SaveV2``, which the coordinator's
writer merges into the one index of a stock checkpoint
(:meth:`distributed.checkpoint.writer.CheckpointWriter.write`).
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, Iterable, Mapping, Sequence

from distributed import logs
from distributed.config import TrainConfig, from_dict

log = logging.getLogger(__name__)

JOB_NAME = "ps"
# The barrier's collective: a group of its own (the workers' CPUs, the ring,
# whatever the gradients use), so it never joins an NCCL launch order.
BARRIER_GROUP_OFFSET = 1
BARRIER_INSTANCE_KEY = 1
_PART = re.compile(r"/part_\d+$")
_SNAPSHOT_CONTAINER = "dtr_snapshot"  # snapshot.py's shadows


def server_device(task: int) -> str:
    """The device of server ``task``'s variables."""
    return f"/job:{JOB_NAME}/replica:0/task:{task}/device:CPU:0"


class ParameterServer:
    """One parameter server: a TF server (job ``ps``) that holds variables.
    Wrapped with ``ray.remote`` by the trainer.

    Args:
        config_dict: The run config as a dict.
        task: This server's index (its TF task index in job ``ps``).
    """

    def __init__(self, config_dict: Mapping[str, Any], task: int):
        self.config: TrainConfig = from_dict(config_dict)
        self.task = task
        logs.setup_actor(self.config.run, f"parameter server {task}")
        from distributed.train import devices
        devices.hide_gpus()  # variables on the CPU; GPUs are the workers'
        import ray

        from distributed.train.collective import pick_free_port
        self._address = f"{ray.util.get_node_ip_address()}:{pick_free_port()}"
        self.server = None

    def address(self) -> str:
        return self._address

    def start(self, workers: Sequence[str], servers: Sequence[str]) -> int:
        """Starts the TF server in the cluster of ``workers`` and ``servers``
        (``host:port``, by task); returns this process's id."""
        import os

        import tensorflow as tf

        from distributed.train.devices import cpu_only, thread_config
        cluster = tf.train.ClusterSpec({"worker": list(workers),
                                        JOB_NAME: list(servers)})
        threads = max(2, int(self.config.ps_cpus + 0.999))
        config = cpu_only(thread_config(threads, threads, self.config.ps_cpus))
        self.server = tf.distribute.Server(cluster, job_name=JOB_NAME,
                                           task_index=self.task, protocol="grpc",
                                           config=config, start=True)
        return os.getpid()

    def ping(self) -> int:
        return self.task


def actor_options(config: TrainConfig) -> dict[str, Any]:
    """Ray options of a server: its CPUs, memory and custom resources."""
    options: dict[str, Any] = {"num_cpus": config.ps_cpus}
    if config.ps_memory:
        options["memory"] = config.ps_memory
    if config.ps_resources:
        options["resources"] = dict(config.ps_resources)
    return options


class Placement:
    """Which variables live on which server, decided as they are created.

    Every partitioned variable's parts (``.../part_<i>``) and every variable a
    ``ps_variables`` regex matches go to the server with the fewest bytes so
    far (greedy, in creation order, so every process that builds the graph
    decides alike). A variable made while colocated with another (an
    optimizer's slot, a moving average) is left to follow it.

    Args:
        servers: Number of parameter servers.
        patterns: ``ps_variables`` regexes.
        place: Put the variables on the servers' devices (the workers); the
            coordinator, which never connects its chief graph to the servers,
            only records the decisions.
        rank: This worker's rank (``None`` on the coordinator).
        spec: This worker's collective group (the barrier), or ``None``.
    """

    def __init__(self, servers: int, patterns: Iterable[str] = (), place: bool = True,
                 rank: int | None = None, spec: Any = None):
        self.servers = servers
        self.patterns = [re.compile(p) for p in patterns]
        self.place = place
        self.rank = rank
        self.spec = spec
        self.loads = [0] * servers
        self.tasks: dict[str, int] = {}  # variable name -> server task
        self.matched: set[str] = set()  # the patterns that matched a variable
        self.dense_tables: list[str] = []  # see note_gradients

    @classmethod
    def of(cls, config: TrainConfig, **kwargs) -> "Placement | None":
        """The run's placement, ``None`` without servers."""
        if config.parameter_servers == 0:
            return None
        return cls(config.parameter_servers, config.ps_variables, **kwargs)

    def wants(self, name: str) -> bool:
        matched = [p for p in self.patterns if p.search(name)]
        self.matched.update(p.pattern for p in matched)
        return bool(_PART.search(name)) or bool(matched)

    def check_patterns(self, model: str, names: Sequence[str]) -> None:
        """Refuses a ``ps_variables`` regex that placed no variable of the
        model (``names``: its variables), which would otherwise leave the
        tables the user meant for the servers replicated, silently."""
        from distributed.errors import ConfigError
        names = sorted({_PART.sub("", n) for n in names})  # a partitioned one once
        for pattern in self.patterns:
            if pattern.pattern not in self.matched:
                shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                raise ConfigError(
                    f"ps_variables: {pattern.pattern!r} matches no variable of model "
                    f"{model} (re.search in each variable's full name; optimizer slots "
                    f"follow their variable); its variables: {shown}")

    def note_gradients(self, grads_and_vars) -> None:
        """Records the server-resident tables (rank >= 2) whose gradient is
        dense, not an ``IndexedSlices`` of the rows looked up: see
        :meth:`dense_gradient_warning`."""
        import tensorflow as tf
        self.dense_tables = [
            v.op.name for g, v in grads_and_vars
            if self.task_of(v) is not None and not isinstance(g, tf.IndexedSlices)
            and v.shape.rank is not None and v.shape.rank >= 2]

    def dense_gradient_warning(self) -> str | None:
        """The coordinator's warning for :attr:`dense_tables`, if any."""
        if not self.dense_tables:
            return None
        return (
            f"parameter servers: the gradient of {', '.join(self.dense_tables)} is "
            "dense (the whole table), not the rows a step looked up: every step each "
            "worker reads the whole table from the servers, makes and exchanges a "
            "gradient of its size, and rank 0 sends all of it to the servers, so a "
            "table bigger than a worker does not fit. Something in the loss reads "
            "the whole table, most often a regularizer on the embedding (a Keras "
            "Embedding's embeddings_regularizer, even l2(0): DeepCTR's "
            "l2_reg_embedding=0 still adds one, so leave model.losses out of the "
            "loss too); for a table that fits, ignore this.")

    def _creator(self, next_creator, **kwargs):
        import tensorflow as tf
        graph = tf.compat.v1.get_default_graph()
        name = kwargs.get("name")
        # A slot or a moving average is made colocated with its variable.
        colocated = bool(graph._colocation_stack)  # pylint: disable=protected-access
        if colocated or not isinstance(name or "Variable", str):
            return next_creator(**kwargs)
        # The name the variable will have: ``get_variable`` passes its full
        # name (under no name scope), while ``tf.Variable`` (Keras layers'
        # weights: ``embeddings`` under ``sparse_emb_user/``) passes one
        # relative to the current name scope, made unique as its op's name.
        if not self.wants(graph.unique_name(name or "Variable", mark_as_used=False)):
            return next_creator(**kwargs)
        shape, dtype = kwargs.get("shape"), kwargs.get("dtype")
        initial = kwargs.get("initial_value")
        if shape is None and initial is not None and not callable(initial):
            # tf.Variable(value): sized by its value (no shape given).
            shape = getattr(initial, "shape", None)
            dtype = dtype or getattr(initial, "dtype", None)
        shape = tf.TensorShape(shape)
        dtype = tf.as_dtype(dtype or tf.float32)
        nbytes = (shape.num_elements() or 0) * dtype.size if shape.rank is not None else 0
        task = min(range(self.servers), key=lambda t: (self.loads[t], t))
        self.loads[task] += nbytes
        context = tf.device(server_device(task)) if self.place else \
            contextlib.nullcontext()
        with context:
            variable = next_creator(**kwargs)
        self.tasks[variable.op.name] = task
        return variable

    @contextlib.contextmanager
    def scope(self):
        """Variables created inside go to the servers as :meth:`wants` says."""
        import tensorflow as tf
        with tf.variable_creator_scope(self._creator):
            yield

    def task_of(self, variable) -> int | None:
        """The server of ``variable`` (colocated ones: their primary's)."""
        for group in variable.op.colocation_groups():
            name = group.decode()[len("loc:@"):]
            if name in self.tasks:
                return self.tasks[name]
        return self.tasks.get(variable.op.name)

    def on_servers(self, variables: Sequence[Any]) -> list:
        """The variables (of ``variables``) that live on the servers."""
        return [v for v in variables if self.task_of(v) is not None]

    def apply(self, replicated_apply, server_apply, gradients=()) -> Any:
        """The step's update: the replicated variables' on every rank, the
        servers' on rank 0 only (every rank holds the same gathered
        gradients), then a barrier every rank enters after it so no rank's
        next lookup reads rows before rank 0 wrote them."""
        import tensorflow as tf
        if self.rank is None:  # the coordinator: never run
            return tf.group(replicated_apply, server_apply)
        # The other ranks run the gradients' exchange too (rank 0's gathers
        # wait for theirs), but not the update.
        applied = [server_apply] if self.rank == 0 else _exchanged(gradients)
        if self.spec is None or self.spec.group_size == 1:
            return tf.group(replicated_apply, *applied)
        with tf.control_dependencies(applied), \
                tf.device(f"{self.spec.task_device}/device:CPU:0"):
            barrier = tf.raw_ops.CollectiveReduceV2(
                input=tf.constant(0.0), group_size=self.spec.group_size,
                group_key=self.spec.group_key + BARRIER_GROUP_OFFSET,
                instance_key=BARRIER_INSTANCE_KEY, ordering_token=[],
                merge_op="Add", final_op="Id", communication_hint="ring",
                timeout_seconds=0.0, name="ps_barrier")
        return tf.group(replicated_apply, barrier, *applied)


def _exchanged(gradients) -> list:
    """The tensors of ``gradients`` (``IndexedSlices`` or dense)."""
    import tensorflow as tf
    out = []
    for g in gradients:
        if isinstance(g, tf.IndexedSlices):
            out += [g.values, g.indices]
        elif g is not None:
            out.append(g)
    return [tf.group(*out)] if out else []


def check_optimizer(optimizer: Any, name: str) -> None:
    """Refuses an optimizer whose update has step-wide state (Adam's beta
    powers): applied once for the servers' variables and once for the rest,
    it would advance that state twice a step."""
    from distributed.errors import ConfigError
    if getattr(optimizer, "_non_slot_dict", None):
        raise ConfigError(
            f"optimizer: {name} keeps state shared by all its variables "
            f"({', '.join(sorted(k[0] for k in optimizer._non_slot_dict))}), which "
            "parameter servers cannot update once per step; use adagrad, sgd, "
            "momentum, ftrl or rmsprop with parameter_servers, or parameter_servers: 0")


class ServerSaver:
    """Has each server write its variables' snapshot as its own shard files.

    NOTE: only the coordinator makes one. Its Session is a TF client of the
    servers (their cluster, not a member), and its ops read the shadow
    variables rank 0's snapshot made on each server
    (:class:`~distributed.train.snapshot.VariableSnapshot`) by their shared
    names: no value passes through the coordinator.

    Args:
        entries: Per tier, ``(checkpoint name, slice spec, variable name,
            task, dtype)`` of each server-resident tensor it saves.
    """

    def __init__(self, entries: Mapping[str, Sequence[tuple]]):
        self.entries = {tier: list(items) for tier, items in entries.items()}
        self.sess = None

    def connect(self, servers: Sequence[str]) -> None:
        """Builds the save ops and a Session on the servers ``host:port``."""
        import tensorflow as tf
        graph = tf.Graph()
        tasks = sorted({e[3] for items in self.entries.values() for e in items})
        self._save: dict[str, dict[int, Any]] = {}
        with graph.as_default():
            self._prefix = {t: tf.compat.v1.placeholder(tf.string, [], name=f"prefix_{t}")
                            for t in tasks}
            handles = {}
            for items in self.entries.values():
                for _, _, var, task, dtype in items:
                    if var not in handles:
                        with tf.device(server_device(task)):
                            handles[var] = tf.raw_ops.VarHandleOp(
                                dtype=dtype, shape=None, container=_SNAPSHOT_CONTAINER,
                                shared_name=var, name="shadow")
            for tier, items in self.entries.items():
                self._save[tier] = {}
                for task in tasks:
                    mine = [e for e in items if e[3] == task]
                    if not mine:
                        continue
                    with tf.device(server_device(task)):
                        tensors = [tf.raw_ops.ReadVariableOp(resource=handles[e[2]],
                                                             dtype=e[4]) for e in mine]
                        self._save[tier][task] = tf.raw_ops.SaveV2(
                            prefix=self._prefix[task],
                            tensor_names=[e[0] for e in mine],
                            shape_and_slices=[e[1] for e in mine], tensors=tensors)
            self._release = tf.group(*(tf.raw_ops.DestroyResourceOp(
                resource=h, ignore_lookup_error=True) for h in handles.values()))
        config = tf.compat.v1.ConfigProto(device_filters=[f"/job:{JOB_NAME}"])
        self.sess = tf.compat.v1.Session(f"grpc://{servers[0]}", graph=graph,
                                         config=config)

    def write(self, tier: str, directory: str) -> list[str]:
        """Every server writes its part of ``tier``'s snapshot into
        ``directory`` at once; returns the checkpoint prefixes written."""
        import os
        ops = self._save.get(tier, {})
        prefixes = {t: os.path.join(directory, f"server-{t:05d}") for t in ops}
        if ops:
            self.sess.run(list(ops.values()),
                          {self._prefix[t]: p for t, p in prefixes.items()})
        return [prefixes[t] for t in sorted(prefixes)]

    def release(self) -> None:
        """Frees the snapshot's shadows on the servers (after the last tier
        of a step is written)."""
        if self.sess is not None:
            self.sess.run(self._release)


def restorer(variables: Sequence[Any]):
    """A ``Saver`` whose restore ops run on the servers of ``variables``
    (sharded: one ``RestoreV2`` per device, reading the files there)."""
    import tensorflow as tf
    return tf.compat.v1.train.Saver(var_list=list(variables), sharded=True,
                                    max_to_keep=None)
