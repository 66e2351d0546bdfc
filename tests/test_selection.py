"""Selection: policies, include/exclude, the missing-variables warning, bad input."""

import warnings

import pytest

from distributed.checkpoint import (MissingInferenceVariablesWarning, SelectionSpec,
                                    VariableInfo, select, select_variables)
from distributed.errors import ConfigError, SelectionError
from distributed.model.walk import variables_read_by

TRAINABLE = {"tower/dense/kernel", "tower/dense/bias", "tower/bn/gamma", "head/kernel"}
READ_NON_TRAINABLE = {"tower/bn/moving_mean", "tower/bn/moving_variance",
                      "head/kernel/ExponentialMovingAverage"}


def names(vs):
    return {v.op.name for v in vs}


def test_outputs_read_bn_statistics_and_ema_shadow(tiny_model):
    reads = variables_read_by([tiny_model.outputs])
    assert READ_NON_TRAINABLE <= reads
    assert not any("Adam" in r or "global_step" in r or "power" in r for r in reads)


def test_trainable_policy_warns_naming_missing_variables(tiny_model):
    with pytest.warns(MissingInferenceVariablesWarning) as record:
        vs, sel = select_variables(tiny_model.graph, SelectionSpec("trainable"),
                                   [tiny_model.outputs])
    assert names(vs) == TRAINABLE
    assert set(sel.missing_reads) == READ_NON_TRAINABLE
    message = str(record[0].message)
    assert "tower/bn/moving_mean" in message and "policy: inference" in message


def test_inference_policy_adds_what_outputs_read_and_never_slots(tiny_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vs, sel = select_variables(tiny_model.graph, SelectionSpec("inference"),
                                   [tiny_model.outputs])
    assert names(vs) == TRAINABLE | READ_NON_TRAINABLE
    assert sel.missing_reads == ()


def test_all_policy_is_every_variable(tiny_model):
    vs, _ = select_variables(tiny_model.graph, SelectionSpec("all"))
    got = names(vs)
    assert {"global_step", "beta1_power", "tower/dense/kernel/Adam"} <= got
    assert got == names(tiny_model.variables)


@pytest.mark.parametrize("spec, expected", [
    (SelectionSpec("trainable", include=["^tower/"]),
     {"tower/dense/kernel", "tower/dense/bias", "tower/bn/gamma"}),
    (SelectionSpec("trainable", exclude=["bias$"]),
     TRAINABLE - {"tower/dense/bias"}),
    (SelectionSpec("inference", include=["^tower/"], exclude=["moving_variance"]),
     {"tower/dense/kernel", "tower/dense/bias", "tower/bn/gamma", "tower/bn/moving_mean"}),
    (SelectionSpec("all", include=["Adam"]),
     {f"{n}/Adam" for n in TRAINABLE} | {f"{n}/Adam_1" for n in TRAINABLE}),
    (SelectionSpec("trainable", include=["^head/", "gamma"]), {"head/kernel", "tower/bn/gamma"}),
])
def test_include_exclude(tiny_model, spec, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingInferenceVariablesWarning)
        vs, _ = select_variables(tiny_model.graph, spec, [tiny_model.outputs])
    assert names(vs) == expected


def test_exclude_dropping_read_variables_warns_about_regexes():
    variables = [VariableInfo("a/w", True), VariableInfo("a/moving_mean", False)]
    with pytest.warns(MissingInferenceVariablesWarning, match="regexes drop them"):
        sel = select(variables, SelectionSpec("inference", exclude=["moving"]),
                     {"a/moving_mean"})
    assert sel.names == ("a/w",)


def test_selection_is_pure_and_keeps_order():
    variables = [VariableInfo(n, True) for n in ["z", "a", "m"]]
    assert select(variables, SelectionSpec()).names == ("z", "a", "m")


@pytest.mark.parametrize("kwargs, fragment", [
    ({"policy": "weights"}, "selection.policy: 'weights' is not a policy"),
    ({"include": ["tower/("]}, "selection.include[0]: regex 'tower/(' does not compile"),
    ({"exclude": ["ok", "[z-a]"]}, "selection.exclude[1]"),
    ({"include": "^tower/"}, "selection.include: expected a list"),
    ({"include": [3]}, "selection.include[0]: expected a regex string"),
])
def test_bad_specs_name_the_field(kwargs, fragment):
    with pytest.raises(SelectionError) as info:
        SelectionSpec(**kwargs)
    assert fragment in str(info.value)
    assert isinstance(info.value, (ConfigError, ValueError))


def test_unknown_key_in_dict_is_named():
    with pytest.raises(SelectionError, match=r"unknown key\(s\) \['polcy'\]"):
        SelectionSpec.from_dict({"polcy": "all"})


def test_selection_matching_nothing_is_an_error_listing_names():
    variables = [VariableInfo("tower/w", True)]
    with pytest.raises(SelectionError, match="matches no variable.*tower/w"):
        select(variables, SelectionSpec(include=["^serving/"]))


def test_inference_needs_outputs():
    with pytest.raises(SelectionError, match="predict-mode outputs"):
        select([VariableInfo("w", True)], SelectionSpec("inference"))


def test_spec_round_trips_through_json():
    spec = SelectionSpec("inference", include=["^a/"], exclude=["b"])
    import json
    assert SelectionSpec.from_dict(json.loads(spec.to_json())) == spec
