"""Starting a run from another run's full checkpoint (PBT's exploit).

Population-based training clones a good trial into a bad one: the bad trial
goes on from the good one's latest full checkpoint (every variable, the
optimizer's slots and the global step) with its own, perturbed
hyperparameters. It does so in a new run of its own (the old one keeps its
checkpoints as they were), whose coordinator restores the other run's
checkpoint where a fresh run would initialize. The checkpoint is read in
place, under a reader's lease, so the other trial's retention cannot delete
it mid-read (with parameter servers the lease lasts until rank 0 has restored
their tables from it too), and every tensor is checked against its manifest
first.
"""

from __future__ import annotations

import contextlib
import os

from distributed.checkpoint import layout
from distributed.errors import CheckpointNotFoundError, ConfigError, last_line
from distributed.train.coordinator import Coordinator


def coordinator_from(run: str, step: int) -> type:
    """A coordinator class whose run, while it has no full checkpoint of its
    own, starts from the full checkpoint at ``step`` of ``run`` (in the same
    storage); once it has one, it resumes from it as any run does."""
    return type("WarmStartCoordinator", (_WarmStartCoordinator,),
                {"origin_run": run, "origin_step": step})


class _WarmStartCoordinator(Coordinator):
    origin_run: str = ""
    origin_step: int = 0

    def _start_fresh(self, init) -> int:
        """Restores every variable from the origin's full checkpoint (read in
        place under a reader's lease, verified first), and with
        ``input_position: exact`` the input positions it holds (the trial's
        input goes on where the origin's stood); returns its step."""
        import tensorflow as tf

        from distributed.storage.runstore import open_reader
        run, step = self.origin_run, self.origin_step
        what = f"the full checkpoint at step {step} of run {run!r}"
        origin = open_reader(self.config.storage, run, self.config.storage_options)
        with contextlib.ExitStack() as lease:
            lease.enter_context(origin.reading("full", step))
            if (step, "full") not in origin.catalog.committed_keys():
                raise CheckpointNotFoundError(
                    f"{what} is gone (that run's retention deleted it) before this "
                    "trial could start from it; keep more full checkpoints "
                    "(retention.full.keep_last) in a PBT search")
            origin.fetch("full", step)
            origin.verify(step, "full")
            prefix = os.path.join(origin.layout.checkpoint_dir("full", step),
                                  layout.CKPT_PREFIX)
            try:
                self._restore_full(prefix)
            except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
                raise ConfigError(
                    f"{what} does not fit this trial's graph ({last_line(e)}); PBT "
                    "can change only what keeps every variable's name and shape "
                    "(optimizer settings, batch_size), not model_params that "
                    "resize the model") from None
            if self.server_tasks:
                # Rank 0 reads the servers' tables from these files after this
                # returns: the lease lasts until every worker has loaded.
                self._load_leases.enter_context(lease.pop_all())
        self.sess.run(init.local_init_op)
        return int(self.sess.run(self.tg.global_step))
