"""Retention decisions as tables of cases (pure), and carrying them out."""

import pytest

from distributed.checkpoint import (CheckpointStore, CheckpointWriter, KeepBestN,
                                    KeepEveryKSteps, KeepLastN, Retention, SelectionSpec,
                                    select_variables)
from distributed.errors import ConfigError
from tests.test_catalog import entry

STEPS = [100, 200, 300, 400, 500]
LOSSES = {100: 0.5, 200: 0.1, 300: 0.4, 400: 0.2, 500: 0.9}


@pytest.mark.parametrize("rules, deleted", [
    ((), []),
    ((KeepLastN(2),), [100, 200, 300]),
    ((KeepLastN(1),), [100, 200, 300, 400]),
    ((KeepEveryKSteps(200),), [100, 300]),          # 500 survives: newest
    ((KeepBestN(2, "loss"),), [100, 300]),           # best 200, 400; newest 500
    ((KeepBestN(1, "loss", "max"),), [100, 200, 300, 400]),
    ((KeepLastN(1), KeepEveryKSteps(300)), [100, 200, 400]),
    ((KeepLastN(2), KeepBestN(1, "loss")), [100, 300]),
    ((KeepLastN(100),), []),
])
def test_plan(rules, deleted):
    entries = [entry(s, loss=LOSSES[s]) for s in STEPS]
    assert [e.step for e in Retention(rules).plan(entries)] == deleted


def test_newest_of_each_tier_is_never_deleted():
    entries = [entry(s) for s in STEPS] + [entry(250, tier="full")]
    plan = Retention((KeepEveryKSteps(10**6),)).plan(entries)
    assert [(e.step, e.tier) for e in plan] == [(100, "serving"), (200, "serving"),
                                                 (300, "serving"), (400, "serving")]


def test_best_ignores_entries_without_the_metric():
    entries = [entry(1, loss=0.1), entry(2), entry(3)]
    assert [e.step for e in Retention((KeepBestN(1, "loss"),)).plan(entries)] == [2]


@pytest.mark.parametrize("config, fragment", [
    ({"keep_lst": 3}, "unknown key(s) ['keep_lst']"),
    ({"keep_last": 0}, "retention.keep_last: expected a positive integer, got 0"),
    ({"keep_every": "10"}, "retention.keep_every: expected a positive integer"),
    ({"keep_best": {"n": 2}}, "retention.keep_best: expected {n, metric, mode}"),
    ({"keep_best": {"metric": "loss", "mode": "low"}}, "keep_best.mode: 'low' is not valid"),
    ({"keep_best": {"metric": "loss", "n": 1, "x": 1}}, "unknown key(s) ['x']"),
])
def test_bad_config(config, fragment):
    with pytest.raises(ConfigError) as info:
        Retention.from_dict(config)
    assert fragment in str(info.value)


def test_from_dict():
    r = Retention.from_dict({"keep_last": 3, "keep_best": {"metric": "loss", "n": 2}})
    assert r.rules == (KeepLastN(3), KeepBestN(2, "loss", "min"))


def test_apply_deletes_row_then_data(tiny_model, storage):
    vs, _ = select_variables(tiny_model.graph, SelectionSpec("all"))
    writer = CheckpointWriter(vs)
    store = CheckpointStore(storage, "run")
    store.open()
    for step in (1, 2, 3):
        store.save(writer, tiny_model.sess, step, "serving", "{}")
    deleted = store.apply_retention(Retention((KeepLastN(1),)))
    assert [e.step for e in deleted] == [1, 2]
    assert [e.step for e in store.catalog.entries()] == [3]
    import os
    assert os.listdir(store.layout.tier_dir("serving")) == ["step-000000003"]
