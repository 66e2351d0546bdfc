"""Retention decisions as tables of cases (pure), and carrying them out."""

import os

import pytest

from distributed.checkpoint import (Catalog, CheckpointStore, CheckpointWriter, KeepBestN,
                                    KeepEveryKSteps, KeepLastN, Retention, SelectionSpec,
                                    select_variables)
from distributed.checkpoint.metric_goal import MetricGoal
from distributed.errors import ConfigError
from tests.helpers.catalog_entries import entry

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


@pytest.mark.parametrize("config", [
    {}, {"keep_last": 2}, {"keep_every": 1000},
    {"keep_last": 1, "keep_every": 10, "keep_best": {"n": 3, "metric": "acc", "mode": "max"}},
])
def test_to_dict_reads_back_as_the_same_policy(config):
    retention = Retention.from_dict(config)
    assert Retention.from_dict(retention.to_dict()) == retention
    assert retention.to_dict() == config


# ------------------------------------------------------------- MetricGoal -----

@pytest.mark.parametrize("text, goal", [
    ("loss", MetricGoal("loss", "min")),
    ("loss:min", MetricGoal("loss", "min")),
    ("eval/accuracy:max", MetricGoal("eval/accuracy", "max")),
])
def test_metric_goal_parses_the_command_line_form(text, goal):
    assert MetricGoal.parse(text) == goal


@pytest.mark.parametrize("text", ["", ":max", "loss:lowest", "loss:max:min"])
def test_metric_goal_refuses_other_forms(text):
    with pytest.raises(ConfigError, match=r"is not METRIC\[:min\|max\]; use e\.g\."):
        MetricGoal.parse(text)


def test_metric_goal_mode_must_be_min_or_max():
    with pytest.raises(ConfigError, match="use 'min' or 'max'"):
        MetricGoal("loss", "lowest")


def test_metric_goal_ranks_best_first_ties_newest_and_skips_unrecorded():
    entries = [entry(1, loss=0.2), entry(2, loss=0.1), entry(3), entry(4, loss=0.2)]
    assert [e.step for e in MetricGoal("loss").ranked(entries)] == [2, 4, 1]
    assert [e.step for e in MetricGoal("loss", "max").ranked(entries)] == [4, 1, 2]
    assert MetricGoal("auc").ranked(entries) == []


def test_metric_goal_better_is_strict():
    low, high = MetricGoal("loss", "min"), MetricGoal("acc", "max")
    assert low.better(0.1, 0.2) and not low.better(0.2, 0.2) and not low.better(0.3, 0.2)
    assert high.better(0.3, 0.2) and not high.better(0.2, 0.2) and not high.better(0.1, 0.2)


def _store_with_steps(tiny_model, storage, steps=(1, 2, 3)):
    vs, _ = select_variables(tiny_model.graph, SelectionSpec("all"))
    writer = CheckpointWriter(vs)
    store = CheckpointStore(storage, "run")
    store.open()
    for step in steps:
        store.save(writer, tiny_model.sess, step, "serving", "{}")
    return store


def _observe_deletions(monkeypatch, store, crash_at_step=None):
    """Records, at the moment each deletion happens, what a fresh reader of
    the run would see: ``("row", step, dir_exists)`` when a catalog row is
    removed, ``("data", step, row_listed)`` when a checkpoint directory is.
    The real operations run (the store module's ``shutil.rmtree`` and the
    catalog's ``remove`` are wrapped, not replaced); ``crash_at_step`` makes
    the data deletion of that step die instead, like a crashed writer."""
    import types

    from distributed.checkpoint import store as store_module

    events = []
    real_rmtree, real_remove = store_module.shutil.rmtree, store.catalog.remove
    dirs = {store.layout.checkpoint_dir("serving", s): s for s in range(1, 10)}

    def rmtree(path, *args, **kwargs):
        step = dirs.get(path)
        if step is not None:
            listed = (step, "serving") in Catalog(store.layout).committed_keys()
            events.append(("data", step, listed))
            if step == crash_at_step:
                raise SystemExit("writer crashed between the row and the data")
        return real_rmtree(path, *args, **kwargs)

    def remove(step, tier):
        events.append(("row", step, os.path.isdir(store.layout.checkpoint_dir(tier, step))))
        return real_remove(step, tier)

    monkeypatch.setattr(store_module, "shutil", types.SimpleNamespace(rmtree=rmtree))
    monkeypatch.setattr(store.catalog, "remove", remove)
    return events


def test_apply_deletes_row_then_data(tiny_model, storage, monkeypatch):
    store = _store_with_steps(tiny_model, storage)
    events = _observe_deletions(monkeypatch, store)
    deleted = store.apply_retention(Retention((KeepLastN(1),)))
    assert [e.step for e in deleted] == [1, 2]
    # Each row went while its data was still there, and each directory went
    # only once a reader could no longer list its row.
    assert events == [("row", 1, True), ("data", 1, False),
                      ("row", 2, True), ("data", 2, False)]
    assert [e.step for e in store.catalog.entries()] == [3]
    assert os.listdir(store.layout.tier_dir("serving")) == ["step-000000003"]


def test_a_crash_between_row_and_data_leaves_an_orphan_never_a_dangling_row(
        tiny_model, storage, monkeypatch):
    store = _store_with_steps(tiny_model, storage)
    _observe_deletions(monkeypatch, store, crash_at_step=1)
    with pytest.raises(SystemExit):
        store.apply_retention(Retention((KeepLastN(1),)))
    monkeypatch.undo()
    step1 = store.layout.checkpoint_dir("serving", 1)
    assert os.path.isdir(step1)  # the data outlived the crash ...
    fresh = CheckpointStore(storage, "run")
    assert [e.step for e in fresh.catalog.entries()] == [2, 3]  # ... but not its row
    assert step1 in fresh.open()  # the next start removes the orphan
    assert not os.path.exists(step1)
