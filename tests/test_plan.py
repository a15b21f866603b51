"""Rollout plans (fleet/plan.py): the syntax operators write (stages, durations, abort criteria, gates,
deadlines) in `edgeops push` options and TOML files, the validation that keeps bad plans from the
engine, and the JSON round trip the registry relies on. Every error is one line naming what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeops.fleet.plan import (DEFAULT_DEADLINES, IN_FLIGHT, PLAN_KEYS, Gates, Plan, Stage, load_plan, make_plan,
                                parse_abort, parse_duration)
from edgeops.protocol.errors import EdgeopsError


def error(call, *args, **kwargs) -> str:
    """The message of the EdgeopsError `call(*args, **kwargs)` raises, checked to be one line."""
    with pytest.raises(EdgeopsError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert message and "\n" not in message, repr(message)
    assert type(caught.value) is EdgeopsError or isinstance(caught.value, EdgeopsError)
    return message


def labels(plan: Plan) -> list[str]:
    return [s.label for s in plan.stages]


# --- durations ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("90", 90.0), ("90s", 90.0), ("10m", 600.0), ("1.5h", 5400.0), ("2d", 172800.0), ("250ms", 0.25),
    (" 10 m ", 600.0), ("0", 0.0), ("0.5s", 0.5), (5, 5.0), (0.5, 0.5), (0, 0.0),
])
def test_durations(text, seconds):
    assert parse_duration(text, "bake") == seconds


@pytest.mark.parametrize("text", ["soon", "-1s", "10x", "", "1 0s", "s", "1e3s", -1, -0.5, True, None, [1]])
def test_bad_durations_name_the_value_and_the_setting(text):
    message = error(parse_duration, text, "bake")
    assert message.startswith(f"bake {text!r} is not a duration"), message


# --- stages ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, label, count, percent", [
    ("3dev", "3dev", 3, None), ("3 devices", "3dev", 3, None), ("3devs", "3dev", 3, None), ("1dev", "1dev", 1, None),
    ("10%", "10%", None, 10.0), ("10", "10%", None, 10.0), (" 10 % ", "10%", None, 10.0), ("12.5%", "12.5%", None, 12.5),
    ("100", "100%", None, 100.0), ("100.0%", "100%", None, 100.0), (25, "25%", None, 25.0), (0.5, "0.5%", None, 0.5),
])
def test_stage_syntax(text, label, count, percent):
    assert Stage.parse(text) == Stage(label, count=count, percent=percent)


@pytest.mark.parametrize("text, why", [
    ("0%", "above 0 and at most 100"), ("0", "above 0 and at most 100"), ("101%", "above 0 and at most 100"),
    ("0dev", "whole number, at least 1"), ("1.5dev", "whole number, at least 1"),
    ("abc", "must be a percentage"), ("-5%", "must be a percentage"), ("", "must be a percentage"),
    ("10%%", "must be a percentage"), ("3 boxes", "must be a percentage"), (True, "must be a percentage"),
])
def test_bad_stages_name_the_value(text, why):
    message = error(Stage.parse, text)
    assert message.startswith(f"stage {text!r}"), message
    assert why in message


@pytest.mark.parametrize("stage, targeted, quota", [
    ("1dev", 5, 1), ("1dev", 0, 0), ("3dev", 2, 2), ("3dev", 10, 3),
    ("10%", 5, 1), ("10%", 10, 1), ("10%", 11, 2), ("10%", 0, 0), ("50%", 5, 3), ("50%", 4, 2), ("50%", 1, 1),
    ("100%", 7, 7), ("33.3%", 3, 1), ("1%", 1000, 10), ("1%", 1001, 11), ("0.1%", 3, 1),
])
def test_stage_quota_rounds_up_and_never_exceeds_the_targeted_devices(stage, targeted, quota):
    assert Stage.parse(stage).quota(targeted) == quota


def test_percent_quotas_do_not_round_up_float_noise():
    # 64.4% of 250 is 161.00000000000003 in floating point: still 161 devices, not 162
    assert 64.4 * 250 / 100 > 161
    assert Stage.parse("64.4%").quota(250) == 161
    assert Stage.parse("70%").quota(10) == 7


# --- plans -------------------------------------------------------------------------------------------


def test_the_default_plan_is_the_safe_one():
    plan = Plan()
    assert labels(plan) == ["1dev", "10%", "50%", "100%"]
    assert plan.bake_s == 600 and plan.min_calls == 100
    assert (plan.failed_pct, plan.min_devices, plan.abort) == (5.0, 5, "failed>5%,min=5")
    assert plan.on_failure == "rollback"
    assert plan.gates == Gates() and plan.gates.drift is True
    assert plan.deadlines_s == DEFAULT_DEADLINES and set(plan.deadlines_s) == set(IN_FLIGHT)
    assert make_plan() == plan


@pytest.mark.parametrize("stages, why", [
    ("", "at least one stage"),
    (",", "at least one stage"),
    ("1dev,50%", "the last stage must be 100% (every targeted device), not 50%"),
    ("1dev,5dev", "the last stage must be 100% (every targeted device), not 5dev"),
    ("50%,10%", "the last stage must be 100% (every targeted device), not 10%"),
    ("50%,10%,100%", "stages must grow: 10% after 50%"),
    ("1dev,50%,50%,100%", "stages must grow: 50% after 50%"),
    ("100%,100%", "stages must grow: 100% after 100%"),
    ("3dev,1dev,100%", "stages must grow: 1dev after 3dev"),
    ("2dev,2dev,100%", "stages must grow: 2dev after 2dev"),
])
def test_stages_must_grow_to_100_percent(stages, why):
    assert why in error(make_plan, stages=stages)


@pytest.mark.parametrize("stages, expected", [
    ("1dev,10%,100%", ["1dev", "10%", "100%"]),
    ("1dev, 10% ,100%,", ["1dev", "10%", "100%"]),  # spaces and a trailing comma are forgiven
    ("5dev,1%,100%", ["5dev", "1%", "100%"]),  # a count then a percentage: which is bigger depends on the fleet
    ("100", ["100%"]),
    (["2dev", 50, "100%"], ["2dev", "50%", "100%"]),
])
def test_stage_lists(stages, expected):
    assert labels(make_plan(stages=stages)) == expected


def test_make_plan_replaces_only_what_it_is_given():
    base = make_plan(stages="1dev,100%", bake="30s", min_calls=7, abort="failed>2%,min=3", on_failure="pause",
                     deadline="5m", gates={"drift": False})
    assert (labels(base), base.bake_s, base.min_calls, base.failed_pct, base.min_devices, base.on_failure) == \
        (["1dev", "100%"], 30.0, 7, 2.0, 3, "pause")
    assert base.deadlines_s == dict.fromkeys(IN_FLIGHT, 300.0)
    assert base.gates == Gates(drift=False)
    changed = make_plan(base, bake=0, gates={"max_error_increase": 0.05})
    assert changed.bake_s == 0 and changed.gates == Gates(max_error_increase=0.05, drift=False)
    assert (labels(changed), changed.min_calls, changed.abort, changed.on_failure, changed.deadlines_s) == \
        (labels(base), base.min_calls, base.abort, base.on_failure, base.deadlines_s)
    assert make_plan(base) == base


def test_deadlines_one_for_all_then_per_state():
    assert make_plan(deadline="2s").deadlines_s == dict.fromkeys(IN_FLIGHT, 2.0)
    plan = make_plan(deadlines={"downloading": "1h", "queued": 90})
    assert plan.deadlines_s == {**DEFAULT_DEADLINES, "downloading": 3600.0, "queued": 90.0}
    both = make_plan(deadline="2m", deadlines={"downloading": "1h"})  # the per-state one wins over the general one
    assert both.deadlines_s == {**dict.fromkeys(IN_FLIGHT, 120.0), "downloading": 3600.0}
    assert make_plan(Plan(deadlines_s={"queued": 5.0})).deadlines_s == {**DEFAULT_DEADLINES, "queued": 5.0}


@pytest.mark.parametrize("kwargs, expected", [
    ({"deadline": 0}, "deadlines must be above zero"),
    ({"deadlines": {"queued": "0s"}}, "deadlines must be above zero"),
    ({"deadlines": {"bogus": "1s"}}, "deadlines name unknown state(s) bogus; states: queued, downloading"),
    ({"deadlines": {"active": "1s"}}, "unknown state(s) active"),
    ({"deadlines": {"queued": "later"}}, "deadline of queued 'later' is not a duration"),
    ({"deadline": "later"}, "deadline 'later' is not a duration"),
    ({"bake": "forever"}, "bake 'forever' is not a duration"),
    ({"bake": -1}, "bake -1 is not a duration"),
    ({"on_failure": "retry"}, "on_failure must be rollback or pause, not 'retry'"),
])
def test_bad_settings_are_named(kwargs, expected):
    assert expected in error(make_plan, **kwargs)


@pytest.mark.parametrize("kwargs, named", [
    ({"min_calls": -1}, "min_calls -1"),
    ({"min_calls": 1.5}, "min_calls 1.5"),
    ({"min_calls": True}, "min_calls True"),
    ({"min_calls": "many"}, "min_calls 'many'"),
    ({"abort": "failed>5%,min=0"}, "abort min 0"),
    ({"abort": "failed>100.5%"}, "abort failed% 100.5"),
    ({"abort": 5}, "abort criteria 5"),
    ({"stages": 5}, "stages 5"),
    ({"deadlines": 5}, "deadlines 5"),
    ({"gates": 5}, "gates 5"),
])
def test_bad_values_are_named_with_the_setting(kwargs, named):
    assert named in error(make_plan, **kwargs)


def test_bad_values_given_to_plan_directly_are_named():
    assert "bake -1" in error(Plan, bake_s=-1)
    assert "min_calls -2" in error(Plan, min_calls=-2)
    assert "abort min 0" in error(Plan, min_devices=0)
    assert "abort failed% -1" in error(Plan, failed_pct=-1)
    assert "abort failed% 101" in error(Plan, failed_pct=101)


def test_failed_100_percent_means_failures_never_abort():
    assert make_plan(abort="failed>100%").failed_pct == 100.0


# --- abort criteria ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, parsed", [
    ("failed>5%,min=5", (5.0, 5)), ("failed>5%", (5.0, 1)), ("failed > 2.5 % , min = 10", (2.5, 10)),
    ("failed>0%,min=1", (0.0, 1)), ("  failed>99.9%  ", (99.9, 1)),
])
def test_abort_syntax(text, parsed):
    assert parse_abort(text) == parsed
    plan = make_plan(abort=text)
    assert (plan.failed_pct, plan.min_devices) == parsed
    assert parse_abort(plan.abort) == parsed  # the canonical form reads back


@pytest.mark.parametrize("text", ["nonsense", "failed<5%", "failed>5", "failed>5%,min=x", "failed>5%,max=3",
                                  "failed>5%,min=", "failures>5%", "failed>-1%", "",
                                  "failed>5%,min=" + "9" * 5000, "failed>" + "1" * 5000 + "%"])
def test_bad_abort_criteria_name_the_value(text):
    message = error(parse_abort, text)
    assert message == f"abort criteria {text!r} must look like failed>5%,min=5"
    assert error(make_plan, abort=text) == message


# --- gates -------------------------------------------------------------------------------------------


def test_gates_are_replaced_one_by_one():
    plan = make_plan(gates={"max_latency_ratio": 2, "latency_slack_ms": 0.5})
    assert plan.gates == Gates(max_latency_ratio=2, latency_slack_ms=0.5)
    assert make_plan(gates={"drift": False}).gates == Gates(drift=False)
    assert make_plan(gates={}).gates == Gates()


@pytest.mark.parametrize("gates, expected", [
    ({"p99": 3}, "unknown gate setting(s) p99; known: drift, latency_slack_ms, max_error_increase, max_latency_ratio"),
    ({"drift": "yes"}, "gate drift must be true or false"),
    ({"drift": 1}, "gate drift must be true or false"),
    ({"max_latency_ratio": -1}, "gate max_latency_ratio must be a number >= 0"),
    ({"max_error_increase": True}, "gate max_error_increase must be a number >= 0"),
    ({"latency_slack_ms": "1ms"}, "gate latency_slack_ms must be a number >= 0"),
])
def test_bad_gates_are_named(gates, expected):
    assert error(make_plan, gates=gates) == expected


# --- the registry's JSON -------------------------------------------------------------------------------


@pytest.mark.parametrize("plan", [
    Plan(),
    make_plan(stages="1dev,12.5%,100%", bake="1.5h", min_calls=0, abort="failed>2.5%,min=3", on_failure="pause",
              deadline="90s", deadlines={"downloading": "1h"}, gates={"drift": False, "max_latency_ratio": 1.25}),
    make_plan(stages="100%", bake=0, min_calls=0),
    make_plan(stages=["3dev", "10", "100"], bake="250ms"),
], ids=["default", "everything", "at-once", "numbers"])
def test_plans_round_trip_through_json_exactly(plan):
    data = plan.to_dict()
    assert Plan.from_dict(data) == plan
    assert Plan.from_dict(json.loads(json.dumps(data))) == plan
    assert Plan.from_dict(data).to_dict() == data


def test_to_dict_is_what_operators_read():
    plan = make_plan(stages="1dev,50%,100%", bake="10m", min_calls=20, abort="failed>5%,min=2", deadline="1m")
    assert plan.to_dict() == {
        "stages": ["1dev", "50%", "100%"], "bake_s": 600.0, "min_calls": 20,
        "abort": {"failed_pct": 5.0, "min_devices": 2}, "on_failure": "rollback",
        "gates": {"max_error_increase": 0.01, "max_latency_ratio": 1.5, "latency_slack_ms": 1.0, "drift": True},
        "deadlines_s": dict.fromkeys(IN_FLIGHT, 60.0),
    }


def test_a_tampered_stored_plan_is_refused_not_trusted():
    data = make_plan(stages="1dev,100%").to_dict()
    with pytest.raises(EdgeopsError, match="the last stage must be 100%"):
        Plan.from_dict({**data, "stages": ["1dev", "50%"]})


# --- TOML files ----------------------------------------------------------------------------------------


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rollout.toml"
    path.write_text(text)
    return path


def test_a_plan_file_with_a_rollout_table(tmp_path):
    plan = load_plan(toml(tmp_path, """
        # kept in git next to the model
        [rollout]
        stages = "1dev,10%,100%"
        bake = "30m"
        min_calls = 50
        abort = "failed>2%,min=10"
        on_failure = "pause"
        deadline = "15m"

        [rollout.deadlines]
        downloading = "1h"

        [rollout.gates]
        max_error_increase = 0.02
        drift = false
    """))
    assert plan == make_plan(stages="1dev,10%,100%", bake="30m", min_calls=50, abort="failed>2%,min=10",
                             on_failure="pause", deadline="15m", deadlines={"downloading": "1h"},
                             gates={"max_error_increase": 0.02, "drift": False})
    assert plan.deadlines_s == {**dict.fromkeys(IN_FLIGHT, 900.0), "downloading": 3600.0}


def test_a_plan_file_at_the_top_level_with_toml_types(tmp_path):
    plan = load_plan(toml(tmp_path, 'stages = ["2dev", 50, "100%"]\nbake = 90\nmin_calls = 0\n'))
    assert labels(plan) == ["2dev", "50%", "100%"] and plan.bake_s == 90.0 and plan.min_calls == 0
    assert load_plan(toml(tmp_path, "")) == Plan()
    assert load_plan(toml(tmp_path, "[rollout]\n")) == Plan()


@pytest.mark.parametrize("text, expected", [
    ("[rollout]\nstage = '1dev,100%'\n", "unknown key(s) stage; known: " + ", ".join(PLAN_KEYS)),
    ("[rollout]\nbake = '10m'\nretries = 3\nwindow = 1\n", "unknown key(s) retries, window; known:"),
    ("[rollout]\nstages = '50%,10%,100%'\n", "stages must grow: 10% after 50%"),
    ("[rollout]\nabort = 'nonsense'\n", "abort criteria 'nonsense' must look like failed>5%,min=5"),
    ("[rollout]\nbake = 'soon'\n", "bake 'soon' is not a duration"),
    ("[rollout]\nbake = true\n", "bake True is not a duration"),
    ("[rollout]\non_failure = 'retry'\n", "on_failure must be rollback or pause, not 'retry'"),
    ("[rollout.gates]\np99 = 3\n", "unknown gate setting(s) p99"),
    ("[rollout.deadlines]\nbogus = '1s'\n", "unknown state(s) bogus"),
    ("[rollout]\nmin_calls = 'many'\n", "min_calls 'many'"),
    ("[rollout]\nmin_calls = -1\n", "min_calls -1"),
    ("[rollout]\nmin_calls = 2.5\n", "min_calls 2.5"),
    ("[rollout]\nstages = 5\n", "stages 5"),
    ("[rollout]\nabort = 5\n", "abort criteria 5"),
    ("[rollout]\ndeadlines = 5\n", "deadlines 5"),
    ("[rollout]\ngates = 5\n", "gates 5"),
    ("rollout = 5\n", "rollout"),
    ("[rollout\n", "is not valid TOML"),
    ("stages = \n", "is not valid TOML"),
])
def test_bad_plan_files_say_which_file_and_what(tmp_path, text, expected):
    path = toml(tmp_path, text)
    message = error(load_plan, path)
    assert message.startswith(f"plan {path}"), message
    assert expected in message, message


def test_unreadable_plan_files(tmp_path):
    assert error(load_plan, tmp_path / "missing.toml") == \
        f"cannot read plan {tmp_path / 'missing.toml'}: No such file or directory"
    assert error(load_plan, tmp_path).startswith(f"cannot read plan {tmp_path}: ")  # a directory
    binary = tmp_path / "plan.toml"
    binary.write_bytes(b"\xff\xfe stages = 1")
    assert error(load_plan, binary).startswith(f"plan {binary} is not valid TOML")
