"""Checkpoint policies as tables: when a tier is due, what a busy save step does.

Pure values: no Ray, no TF.
"""

import dataclasses

import pytest

from distributed.train.schedule import BusyPolicy, CheckpointSchedule

# (serving_every, full_every, last_step, step, expected tiers)
DUE_CASES = [
    # both tiers on their own cadence
    (100, 500, 1000, 1, ()),
    (100, 500, 1000, 99, ()),
    (100, 500, 1000, 100, ("serving",)),
    (100, 500, 1000, 250, ()),
    (100, 500, 1000, 500, ("full", "serving")),
    (100, 500, 1000, 700, ("serving",)),
    (100, 500, 1000, 1000, ("full", "serving")),
    # the last step always gets both, even off cadence
    (100, 500, 1234, 1234, ("full", "serving")),
    (100, 500, 1234, 1200, ("serving",)),
    (100, 500, 1234, 1000, ("full", "serving")),
    # 0 turns a tier off, except at the last step
    (0, 0, 10, 5, ()),
    (0, 0, 10, 9, ()),
    (0, 0, 10, 10, ("full", "serving")),
    (0, 5, 12, 5, ("full",)),
    (0, 5, 12, 10, ("full",)),
    (0, 5, 12, 11, ()),
    (0, 5, 12, 12, ("full", "serving")),
    (3, 0, 7, 3, ("serving",)),
    (3, 0, 7, 6, ("serving",)),
    (3, 0, 7, 4, ()),
    (3, 0, 7, 7, ("full", "serving")),
    # every step
    (1, 1, 3, 1, ("full", "serving")),
    (1, 1, 3, 2, ("full", "serving")),
    # full more often than serving
    (10, 4, 100, 8, ("full",)),
    (10, 4, 100, 20, ("full", "serving")),
    (10, 4, 100, 30, ("serving",)),
]


@pytest.mark.parametrize("serving_every,full_every,last_step,step,expected", DUE_CASES,
                         ids=[f"s{s}-f{f}-last{last}-step{step}"
                              for s, f, last, step, _ in DUE_CASES])
def test_schedule_due(serving_every, full_every, last_step, step, expected):
    schedule = CheckpointSchedule(serving_every, full_every, last_step)
    assert schedule.due(step) == expected


def test_schedule_is_a_frozen_value():
    schedule = CheckpointSchedule(100, 500, 1000)
    assert schedule == CheckpointSchedule(100, 500, 1000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.serving_every = 1  # type: ignore[misc]


# (mode, in_flight, final, decision)
DECIDE_CASES = [
    ("wait", False, False, "go"),
    ("wait", False, True, "go"),
    ("wait", True, False, "wait"),
    ("wait", True, True, "wait"),
    ("skip", False, False, "go"),
    ("skip", False, True, "go"),
    ("skip", True, False, "skip"),
    ("skip", True, True, "wait"),  # the last step never drops its checkpoint
]


@pytest.mark.parametrize("mode,in_flight,final,decision", DECIDE_CASES,
                         ids=[f"{m}-{'busy' if b else 'idle'}-{'final' if f else 'mid'}"
                              for m, b, f, _ in DECIDE_CASES])
def test_busy_policy_decide(mode, in_flight, final, decision):
    assert BusyPolicy(mode).decide(in_flight=in_flight, final=final) == decision


def test_busy_policy_defaults_to_wait():
    assert BusyPolicy() == BusyPolicy("wait")
    assert BusyPolicy().decide(in_flight=True, final=False) == "wait"
