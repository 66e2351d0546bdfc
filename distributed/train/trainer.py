"""The driver of a training job: check, start or join Ray, attempt, and on a
failure do what :class:`~distributed.train.failures.FailurePolicy` decides.

Local single-node dev mode: with no ``RAY_ADDRESS`` (and not under
``ray job submit``) a local Ray is started and shut down at the end. Otherwise
the run joins the cluster it is pointed at (:mod:`distributed.train.cluster`).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from distributed.config import TrainConfig
from distributed.errors import DistributedError, StepError, TrainingFailedError
from distributed.train.attempt import GroupRun
from distributed.train.cluster import (actor_env_vars, check_gpus, check_resources,
                                       connect_ray, ray_shutdown)
from distributed.train.failures import Decision, FailurePolicy, GroupFailure
from distributed.train.hooks import RunHooks
from distributed.train.preflight import check_functions, check_storage, load_ray_datasets
from distributed.train.report import (committed_entries, complete_at, complete_note,
                                      format_summary, resume_note)


def train(config: TrainConfig, echo: Callable[[str], None] = print,
          coordinator_cls: type | None = None,
          hooks: RunHooks | None = None) -> dict[str, Any]:
    """Runs one training job to ``config.steps``; returns a summary dict.

    When the worker group fails (a worker or the coordinator dies, a
    collective times out), every actor is stopped and a new group resumes from
    the latest full checkpoint, up to ``config.max_failures`` times.

    Args:
        config: The run.
        echo: Where progress lines go.
        coordinator_cls: The coordinator class (tests pass a subclass that
            fails on purpose; a Tune trial one that starts from another run).
        hooks: Actor options, checkpoint events and early stops for a caller
            such as a Ray Tune trial (:class:`~distributed.train.hooks.RunHooks`).
    """
    from distributed.train.coordinator import Coordinator

    t0 = time.perf_counter()
    # Every actor error is handled here; refs abandoned when a group is torn
    # down must not print "Unhandled error" tracebacks later.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    # Ray Data's per-epoch execution banners are not the run's news (set
    # before Ray starts, so a local Ray's split coordinators inherit it).
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    complete = complete_at(config)
    if complete is not None:
        return _already_complete(config, complete, echo, t0)
    check_functions(config)
    check_storage(config)
    started = connect_ray()
    try:
        check_resources(config)
        check_gpus(config, started)
        dataset, eval_dataset = load_ray_datasets(config)
        run = GroupRun(config, echo, coordinator_cls or Coordinator, t0,
                       actor_env=None if started else {"env_vars": actor_env_vars()},
                       dataset=dataset, eval_dataset=eval_dataset, hooks=hooks)
        return _attempt_until_done(run, FailurePolicy(config.max_failures))
    finally:
        if started:
            ray_shutdown()


def _attempt_until_done(run: GroupRun, policy: FailurePolicy) -> dict[str, Any]:
    """Attempts with new groups until one finishes or the policy says stop."""
    failures: list[str] = []
    while True:
        try:
            summary = run.attempt(restarting=bool(failures))
        except (StepError, GroupFailure) as failure:
            if policy.decide(failure, len(failures)) is Decision.RAISE:
                raise _stopped_by(failure, run.config, len(failures) + 1) from None
            failures.append(str(failure))
            run.echo(f"FAILURE after step {run.step}: {failure}; restarting the "
                     f"worker group ({len(failures)} of max_failures="
                     f"{run.config.max_failures})")
            continue
        summary["failures"] = failures
        return summary


def _stopped_by(failure: StepError | GroupFailure, config: TrainConfig,
                group_failures: int) -> DistributedError:
    """The job's error when ``failure`` ends the run: what happened, and that
    the committed checkpoints are there to resume from."""
    if isinstance(failure, StepError):  # the user's op failed
        return StepError(f"{failure}\n{resume_note(config)}", failure.op, failure.kind,
                         failure.tf_message)
    return TrainingFailedError(
        f"the worker group failed {group_failures} times, more than "
        f"max_failures={config.max_failures}; last failure: {failure}. "
        f"The committed checkpoints under "
        f"{os.path.join(config.storage_path, config.run)} are intact: "
        "fix the cause and re-run with the same --run to resume "
        "from the last full checkpoint")


def _already_complete(config: TrainConfig, step: int, echo: Callable[[str], None],
                      t0: float) -> dict[str, Any]:
    """A re-run of a finished run: says so and trains nothing."""
    entries = committed_entries(config)
    echo(complete_note(config, step))
    echo(format_summary(config, entries))
    return {"run": config.run, "steps": step, "entries": entries,
            "complete": True, "early_stop": None, "events": [], "rounds": [],
            "failures": [], "first_step_seconds": None,
            "seconds": time.perf_counter() - t0}
