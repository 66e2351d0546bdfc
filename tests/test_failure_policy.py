"""The failure policy, and the driver carrying out its decisions, without Ray.

:class:`FailurePolicy` is a value: given what stopped an attempt and how many
group failures came before, it says restart or raise. The driver's loop
(``trainer._attempt_until_done``) is driven here by a scripted stand-in for
the worker group that fails the way the real one reports failures, so the
lines and errors a user sees are checked in milliseconds.
"""

from __future__ import annotations

import pytest

from distributed import config as config_lib
from distributed.errors import StepError, TrainingFailedError
from distributed.train import trainer
from distributed.train.failures import Decision, FailurePolicy, GroupFailure

DIED = GroupFailure("worker 1 died (The actor died unexpectedly)")
USER_OP = StepError("step 7: op 'loss/log' failed: NaN in input", "loss/log",
                    "InvalidArgumentError", "NaN in input")


@pytest.mark.parametrize("max_failures,failed_before,expected", [
    (0, 0, Decision.RAISE),
    (1, 0, Decision.RESTART),
    (1, 1, Decision.RAISE),
    (3, 2, Decision.RESTART),
    (3, 3, Decision.RAISE),
    (3, 7, Decision.RAISE),
])
def test_group_failures_restart_up_to_max_failures(max_failures, failed_before, expected):
    assert FailurePolicy(max_failures).decide(DIED, failed_before) is expected


@pytest.mark.parametrize("failed_before", [0, 1])
def test_the_users_failed_op_is_never_retried(failed_before):
    """A restart would run the same op on the same values and fail again."""
    assert FailurePolicy(max_failures=5).decide(USER_OP, failed_before) is Decision.RAISE


def test_a_run_survives_exactly_max_failures():
    policy = FailurePolicy(max_failures=2)
    decisions = [policy.decide(DIED, before) for before in range(4)]
    assert decisions == [Decision.RESTART, Decision.RESTART, Decision.RAISE,
                         Decision.RAISE]


class ScriptedGroup:
    """Stands in for :class:`distributed.train.attempt.GroupRun`: each
    attempt raises the next scripted error, or finishes once none is left."""

    def __init__(self, config, errors):
        self.config = config
        self.errors = list(errors)
        self.step = 0
        self.lines: list[str] = []
        self.restarting: list[bool] = []

    def echo(self, line: str) -> None:
        self.lines.append(line)

    def attempt(self, restarting: bool) -> dict:
        self.restarting.append(restarting)
        self.step += 20
        if self.errors:
            raise self.errors.pop(0)
        return {"steps": self.step}


def _config(tmp_path, max_failures: int):
    return config_lib.from_dict({"storage": str(tmp_path), "run": "policy",
                                 "max_failures": max_failures})


def test_driver_restarts_after_each_group_failure_and_reports_them(tmp_path):
    config = _config(tmp_path, max_failures=2)
    group = ScriptedGroup(config, [DIED, GroupFailure("worker 0 was lost (node died)")])

    summary = trainer._attempt_until_done(group, FailurePolicy(config.max_failures))

    assert summary == {"steps": 60, "failures": [str(DIED), "worker 0 was lost (node died)"]}
    assert group.restarting == [False, True, True]
    assert group.lines == [
        f"FAILURE after step 20: {DIED}; restarting the worker group "
        "(1 of max_failures=2)",
        "FAILURE after step 40: worker 0 was lost (node died); restarting the worker "
        "group (2 of max_failures=2)"]


def test_driver_stops_after_max_failures_saying_the_checkpoints_are_intact(tmp_path):
    config = _config(tmp_path, max_failures=1)
    group = ScriptedGroup(config, [DIED, DIED, DIED])

    with pytest.raises(TrainingFailedError) as info:
        trainer._attempt_until_done(group, FailurePolicy(config.max_failures))

    assert str(info.value) == (
        f"the worker group failed 2 times, more than max_failures=1; last failure: "
        f"{DIED}. The committed checkpoints under {tmp_path / 'policy'} are intact: "
        "fix the cause and re-run with the same --run to resume from the last full "
        "checkpoint")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert len(group.restarting) == 2 and len(group.lines) == 1


def test_driver_raises_the_users_op_error_at_once_with_where_to_resume(tmp_path):
    config = _config(tmp_path, max_failures=3)
    group = ScriptedGroup(config, [USER_OP])

    with pytest.raises(StepError) as info:
        trainer._attempt_until_done(group, FailurePolicy(config.max_failures))

    error = info.value
    assert str(error) == (
        f"{USER_OP}\nThe checkpoints committed before it are intact (no full "
        "checkpoint yet: a re-run starts from the beginning, under "
        f"{tmp_path / 'policy'}); fix the cause and re-run with the same --run to "
        "resume.")
    assert (error.op, error.kind, error.tf_message) == (
        "loss/log", "InvalidArgumentError", "NaN in input")
    assert group.restarting == [False] and group.lines == []
