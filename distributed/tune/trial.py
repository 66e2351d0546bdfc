"""One Tune trial runs one training job: ``trainable(config)`` is the Tune trainable.

The trial's process is the run's driver (what ``jobs.train`` is for a run):
it starts the run's coordinator and workers inside the trial's placement group
(:mod:`.placement`), so they are the trial's and end with it, and trains the
run ``<config run>_<trial id>`` under the config's storage. After each serving
checkpoint's evaluation it reports the catalog row's metrics (``loss``,
``eval/*``) with ``storage``, ``run`` and ``step``, and a Tune checkpoint that
only names the committed checkpoints (:mod:`.pointer`).

Stopping: Tune's reports are synchronous, so a scheduler decides while the
run waits between rounds. A stop (ASHA, HyperBand, PBT's pause, the end of
the search) ends the run as ``eval.stop_when`` does: no further steps, the
saves in flight commit, the evaluations finish, then the actors stop; Tune's
``stop`` waits for that, so a stopped trial leaves no actors and no
uncommitted files, and its committed checkpoints stay.

Restoring: a trial restored from its own Tune checkpoint (a resumed
experiment) resumes its run from its newest full checkpoint; one restored
from another trial's (PBT's exploit) starts a new run of its own from that
trial's full checkpoint (:mod:`.warmstart`).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import zlib
from typing import Any, Mapping

from ray import tune
from ray.train._internal.session import get_session
from ray.tune.result import RESULT_DUPLICATE
from ray.tune.trainable.function_trainable import FunctionTrainable

from distributed import config as config_lib
from distributed import logs
from distributed.config import TrainConfig
from distributed.errors import CheckpointNotFoundError, ConfigError
from distributed.storage import uris
from distributed.train.hooks import RunHooks
from distributed.train.protocol import COMMITTED, CheckpointEvent
from distributed.tune import placement, space
from distributed.tune.pointer import CheckpointPointer, read_pointer

# How long Tune's stop waits for a stopped run to commit and stop its actors
# (Tune itself kills a trial that takes longer than TUNE_FORCE_TRIAL_CLEANUP_S).
STOP_SECONDS = 300.0
TUNE_STOP = "stopped by Ray Tune (its scheduler, or the end of the search)"


def trainable(config: str | Mapping[str, Any] | TrainConfig) -> type:
    """The Tune trainable that trains ``config`` once per trial.

    Args:
        config: A YAML config path, a config mapping or a :class:`TrainConfig`.
            Relative local ``storage`` is taken from the current directory.

    Returns:
        A ``ray.tune.Trainable`` class for ``ray.tune.Tuner`` (its
        ``param_space`` keys are dotted config paths, see :mod:`.space`) that
        asks for :func:`~distributed.tune.placement.resources` per trial.

    Raises:
        ConfigError: The config is bad (one line naming the field).
    """
    if isinstance(config, str):
        config = config_lib.load(config)
    elif not isinstance(config, TrainConfig):
        config = config_lib.from_dict(config)
    # A trial's working directory is Tune's, not ours.
    config = dataclasses.replace(config, storage=uris.absolute(config.storage))
    return type(f"Trainable_{config.run}", (_Trial,),
                {"_name": config.run, "_base": config.to_dict(), "_cwd": os.getcwd()})


class _Trial(FunctionTrainable):
    """A function trainable whose function is one run of ``_base`` with the
    trial's params; its ``stop`` waits for the run to stop cleanly."""

    _base: dict = {}
    _cwd: str = ""
    _hooks: "_TrialHooks | None" = None

    @classmethod
    def default_resource_request(cls, config: dict):
        """Tune asks in its driver before it starts a trial: a bad key or value
        fails the search there, one line, before anything starts."""
        from distributed.train.preflight import check_functions
        trial_config = space.trial_config(cls._base, config)
        check_functions(trial_config)
        return placement.resources(trial_config)

    def _trainable_func(self, config: dict):
        if os.path.isdir(self._cwd):  # relative paths mean what they mean to jobs.train
            os.chdir(self._cwd)
        self._hooks = _TrialHooks()
        if self._hooks.run(space.trial_config(self._base, config)):
            get_session().report({RESULT_DUPLICATE: True})  # the function's end

    def cleanup(self):
        session = get_session()
        thread = session.training_thread if session and session.training_started else None
        if self._hooks is not None:
            self._hooks.stop(TUNE_STOP)
        try:
            super().cleanup()  # wakes a report waiting for Tune's decision
        finally:
            if thread is not None:
                thread.join(STOP_SECONDS)

    def reset_config(self, new_config):
        return False  # a new process per trial: a run's actors and env are its own


def _echo(line: str) -> None:
    print(line, flush=True)  # Ray forwards the trial's lines as they come


class _TrialHooks(RunHooks):
    """The trial's side of the run: places the actors, reports to Tune."""

    def __init__(self):
        self._stop_reason: str | None = None

    def run(self, config: TrainConfig) -> bool:
        """Trains the trial's run; returns False when Tune stopped it."""
        from distributed.train.trainer import train
        context = tune.get_context()
        self.trial_id = context.get_trial_id()
        own_run = f"{config.run}_{self.trial_id}"
        checkpoint = tune.get_checkpoint()
        pointer = None
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                pointer = read_pointer(directory)
        run, origin = self._plan(own_run, pointer, config)
        self.config = config = dataclasses.replace(config, run=run).validate()
        logs.setup_actor(run, "trial")
        coordinator_cls = None
        if origin is not None:
            from distributed.tune.warmstart import coordinator_from
            coordinator_cls = coordinator_from(*origin)
            _echo(f"trial {self.trial_id}: run {run!r} goes on from the full checkpoint "
                  f"at step {origin[1]} of run {origin[0]!r} (unless it has its own)")
        self.resume = self._newest_full(config) or origin
        summary = train(config, echo=_echo, coordinator_cls=coordinator_cls, hooks=self)
        if summary.get("complete") and self._stop_reason is None:
            self._report_newest(summary["entries"])
        return self._stop_reason is None

    def _plan(self, own_run: str, pointer: CheckpointPointer | None,
              config: TrainConfig) -> tuple[str, tuple[str, int] | None]:
        """The trial's run and the full checkpoint of another run it starts
        from (``None``: its own, or none)."""
        if pointer is None:
            return own_run, None
        if pointer.storage != config.storage:
            raise ConfigError(
                f"trial {self.trial_id}: its Tune checkpoint names storage "
                f"{pointer.storage!r} but the config's is {config.storage!r}; "
                "restore the search with the config it ran with")
        origin = (pointer.resume_run, pointer.resume_step) if pointer.resumable else None
        if pointer.trial_id == self.trial_id:  # a resumed search: its own run
            return pointer.run, origin if origin and origin[0] != pointer.run else None
        if origin is None:
            raise ConfigError(
                f"trial {self.trial_id}: PBT cloned trial {pointer.trial_id} at step "
                f"{pointer.step}, which had no full checkpoint to go on from; for PBT, "
                "set checkpoint.full_every to checkpoint.serving_every")
        # PBT: a new run per (trial, origin); the same again on a restart.
        tag = zlib.crc32(f"{pointer.resume_run}@{pointer.resume_step}".encode()) & 0xffff
        return (f"{own_run}-from-{pointer.trial_id}-{pointer.resume_step}-{tag:04x}",
                origin)

    @staticmethod
    def _newest_full(config: TrainConfig) -> tuple[str, int] | None:
        """The run's newest committed full checkpoint, from its storage of record."""
        from distributed.storage.runstore import open_reader
        try:
            keys = open_reader(config.storage, config.run,
                               config.storage_options).catalog.committed_keys()
        except (OSError, CheckpointNotFoundError):  # no such run yet
            return None
        steps = [step for step, tier in keys if tier == "full"]
        return (config.run, max(steps)) if steps else None

    # -- RunHooks ------------------------------------------------------------

    def actor_options(self, rank: int | None) -> dict[str, Any]:
        return placement.actor_options(self.config, rank)

    def server_options(self, task: int) -> dict[str, Any]:
        return placement.actor_options(self.config, None, server=task)

    def stop_reason(self) -> str | None:
        return self._stop_reason

    def stop(self, reason: str) -> None:
        """Ends the run after its current round (Tune's ``stop``, any thread)."""
        self._stop_reason = self._stop_reason or reason

    def on_event(self, event: CheckpointEvent) -> str | None:
        if event.kind != COMMITTED or event.evaluating or event.already_committed:
            return self._stop_reason
        if event.tier == "full":
            self.resume = (self.config.run, event.step)
        elif self.config.eval is None or any(k.startswith("eval/") for k in event.metrics):
            self._report(event.entry)
        return self._stop_reason

    def _report(self, entry: Mapping[str, Any]) -> None:
        """One Tune report of a committed serving checkpoint; Tune decides
        meanwhile (a stop raises SystemExit out of ``tune.report``)."""
        if self._stop_reason is not None:
            return
        metrics = {**entry["metrics"], "storage": self.config.storage,
                   "run": self.config.run, "step": entry["step"]}
        resume_run, resume_step = self.resume or (None, None)
        pointer = CheckpointPointer(self.config.storage, self.config.run, entry["step"],
                                    self.trial_id, resume_run, resume_step)
        with tempfile.TemporaryDirectory(prefix="dtr-tune-pointer-") as directory:
            pointer.write(directory)
            try:
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
            except SystemExit:
                self.stop(TUNE_STOP)

    def _report_newest(self, entries: list[dict]) -> None:
        """A run that was already complete reports its newest serving
        checkpoint, so the trial has a result."""
        serving = [e for e in entries if e["tier"] == "serving"]
        if serving:
            self._report(max(serving, key=lambda e: e["step"]))
