"""Every worker's input position, kept in the full checkpoints.

A resume or a restart after a failure goes on from the variables of a full
checkpoint; unless the input goes on from the same step too, the batches read
after that step are trained on twice and the end of the data loses out. So a
full checkpoint also holds, per worker, where its input stood at the
checkpoint's step: a ``tf.data`` iterator's serialized state (position in the
epoch, shuffle and prefetch buffers), or a Python input's count of consumed
batches (:mod:`distributed.inputs.sources`), or for a Ray Data input the
group's plan of the rows left (rank 0's; :mod:`distributed.inputs.raystream`),
which a resume deals over any worker count.

Each position is a ``uint8`` tensor ``input_position/worker_<rank>`` (its
bytes; a string tensor's CRC in TF's index is not that of its bytes on disk,
so it would need a verifier of its own) of the full checkpoint, written by the
same ``Saver`` as the variables: the manifest gives
it a row with its bytes and CRC-32C like any tensor, ``ckpt show`` lists its
size, and a checkpoint either holds every worker's position or is not
committed. Serving checkpoints never hold one. The variables live only in the
coordinator's chief graph (in no collection), so the workers' graphs and the
values handed to them are those of a run without positions.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

PREFIX = "input_position/worker_"


class InputPositions:
    """The chief graph's position variables and the positions in transit.

    Args:
        graph: The chief graph.
        workers: The run's worker count.
    """

    def __init__(self, graph, workers: int):
        import tensorflow as tf
        self.workers = workers
        self._pending: dict[int, dict[int, bytes]] = {}  # step -> rank -> position
        self._arrived = threading.Condition()  # put runs on a thread of its own
        self.resumed: list[bytes] | None = None
        with graph.as_default(), tf.compat.v1.name_scope(None):
            self.variables = [
                tf.Variable(np.zeros([0], np.uint8), trainable=False, collections=[],
                            name=f"{PREFIX}{rank}", shape=tf.TensorShape([None]))
                for rank in range(workers)]
            self._fed = [tf.compat.v1.placeholder(tf.uint8, [None])
                         for _ in range(workers)]
            self._assign = tf.group(*(v.assign(fed, read_value=False)
                                      for v, fed in zip(self.variables, self._fed)))

    def put(self, step: int, rank: int, position: bytes) -> None:
        with self._arrived:
            self._pending.setdefault(step, {})[rank] = position
            self._arrived.notify_all()

    def missing(self, step: int) -> list[int]:
        """The ranks (but 0) whose position at ``step`` is not here."""
        with self._arrived:
            have = self._pending.get(step, {})
            return [rank for rank in range(1, self.workers) if rank not in have]

    def wait(self, step: int, timeout: float) -> None:
        """Waits until every other worker's position at ``step`` is here.

        Raises:
            TimeoutError: Some did not come within ``timeout`` seconds (the
                full checkpoint is not saved).
        """
        with self._arrived:
            if self._arrived.wait_for(lambda: not self.missing(step), timeout):
                return
        raise TimeoutError(
            f"the input position of worker(s) {self.missing(step)} at step {step} "
            f"did not reach the coordinator within {timeout:.0f}s; the full "
            "checkpoint is not saved")

    def load(self, sess: Any, step: int, rank0_position: bytes | None) -> None:
        """Sets the variables to every worker's position at ``step``; without
        any (a save handed over by no worker, as in tests of the coordinator
        alone) to empty ones, which a resume reads as none.

        Raises:
            RuntimeError: Some positions are missing (the save waits for them
                all before it hands over a full checkpoint, so this is a bug).
        """
        with self._arrived:
            have = dict(self._pending.get(step, {}))
        if rank0_position is not None:
            have[0] = rank0_position
        elif not have:
            have = {rank: b"" for rank in range(self.workers)}
        missing = [rank for rank in range(self.workers) if rank not in have]
        if missing:
            raise RuntimeError(f"the input position of worker(s) {missing} at step "
                               f"{step} is missing; the full checkpoint is not saved")
        sess.run(self._assign, {fed: np.frombuffer(have[rank], np.uint8)
                                for rank, fed in enumerate(self._fed)})
        self.drop_through(step)

    def drop_through(self, step: int) -> None:
        """Forgets the positions of ``step`` and before (saved or skipped)."""
        with self._arrived:
            for old in [s for s in self._pending if s <= step]:
                del self._pending[old]

    def read(self, prefix: str) -> str | None:
        """Reads the positions of the checkpoint at ``prefix`` into
        :attr:`resumed`; returns a note when the input restarts instead."""
        import tensorflow as tf
        reader = tf.train.load_checkpoint(prefix)
        saved = sorted(int(name[len(PREFIX):]) for name in
                       reader.get_variable_to_shape_map() if name.startswith(PREFIX))
        self.resumed = None
        if not saved:
            return ("the full checkpoint holds no input position (it was saved with "
                    "input_position: restart), so every worker reads its input from "
                    "the beginning")
        if saved != list(range(self.workers)) and 0 in saved:
            from distributed.inputs.raystream import is_plan
            plan = reader.get_tensor(f"{PREFIX}0").tobytes()
            if is_plan(plan):  # the group's plan: dealt over any worker count
                self.resumed = [plan] + [b"{}"] * (self.workers - 1)
                return None
        if saved != list(range(self.workers)):
            return (f"the full checkpoint holds the input positions of {len(saved)} "
                    f"worker(s), the run has {self.workers}, so every worker reads its "
                    "input from the beginning of the epoch: an input_fn that shards "
                    "by worker index reads other examples now; to keep each example "
                    "once, resume with the same workers or use a Ray Data input")
        resumed = [reader.get_tensor(f"{PREFIX}{rank}").tobytes()
                   for rank in range(self.workers)]
        if not all(resumed):
            return ("the full checkpoint was saved without the workers' input "
                    "positions, so every worker reads its input from the beginning")
        self.resumed = resumed
        return None
