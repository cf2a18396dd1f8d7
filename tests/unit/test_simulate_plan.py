"""The pure parts of ``vecaf simulate`` and of the growing pool: drops, objectives, no-op rule, pool tags."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from infra.simulate import (
    day_events,
    day_objective,
    day_weights,
    noop_reason,
    objective_metric,
    plan_drops,
    read_pool_version,
    simulation_config,
)
from tasks.tracking import nothing_new, pool_version_tags

NAMES = ["a", "b", "c", "d"]


def test_drops_are_disjoint_balanced_and_hold_late_classes_back():
    labels = np.repeat(np.arange(4), 50)
    drops = plan_drops(labels, NAMES, days=3, per_day=22, late_classes=["d"], late_day=2, seed=1)
    assert [d.size for d in drops] == [22, 22, 22]
    everything = np.concatenate(drops)
    assert len(set(everything.tolist())) == everything.size
    day1 = np.bincount(labels[drops[0]], minlength=4)
    assert day1[3] == 0 and sorted(day1[:3].tolist()) == [7, 7, 8]  # 22 = 3 * 7 + 1 over classes a, b, c
    day2 = np.bincount(labels[drops[1]], minlength=4)
    assert sorted(day2.tolist()) == [5, 5, 6, 6]  # 22 = 4 * 5 + 2 over all four classes
    again = plan_drops(labels, NAMES, days=3, per_day=22, late_classes=["d"], late_day=2, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(drops, again))


def test_drops_refuse_unknown_late_classes_and_exhausted_classes():
    labels = np.repeat(np.arange(4), 5)
    with pytest.raises(ValueError, match="late classes"):
        plan_drops(labels, NAMES, days=1, per_day=4, late_classes=["z"], late_day=2)
    with pytest.raises(ValueError, match="no 3 images left"):
        plan_drops(labels, NAMES, days=2, per_day=12)


def test_objective_of_a_day_and_its_metric_by_hand():
    config = simulation_config(4, quick=True)
    assert (config.late_day, config.snow_day, config.objective_day) == (2, 3, 4)
    assert day_objective(config, 3, ["Bag", "Shirt"]) == {"kind": "ce"}
    assert day_objective(config, 4, ["Bag", "Shirt", "Trouser"]) == {
        "kind": "class-weighted", "class_weights": [1.0, 3.0, 1.0]
    }
    weights = day_weights(config, 4)
    # weighted accuracy: (1 * 0.5 + 3 * 0.25 + 1 * 1.0) / (1 + 3 + 1) = 2.25 / 5; class "x" not evaluated
    assert objective_metric([0.5, 0.25, 1.0, None], ["Bag", "Shirt", "Trouser", "x"], weights, top1=0.9) == (
        pytest.approx(0.45)
    )
    assert objective_metric([0.5], ["Bag"], None, top1=0.9) == 0.9


def test_default_events_by_number_of_days():
    one, two, five = simulation_config(1), simulation_config(2), simulation_config(5)
    assert (one.late_day, one.snow_day, one.objective_day) == (None, None, None)
    assert (two.late_day, two.snow_day, two.objective_day) == (2, None, None)
    assert (five.late_day, five.snow_day, five.objective_day) == (2, 4, 5)
    events = day_events(five, 4, {"classes_new": []})
    assert events == ["snowy drop; captions end with \"It's a snowy day!\""]
    assert day_events(five, 2, {"classes_new": ["Bag"]}) == ["new classes arrive: Bag"]


@pytest.mark.parametrize("days", [0, -1, 31, True, 2.5])
def test_simulation_config_refuses_bad_days(days):
    with pytest.raises(ValueError, match="--days must be an integer in 1..30"):
        simulation_config(days)


def test_simulation_config_refuses_drops_beyond_the_dataset():
    with pytest.raises(ValueError, match="exceed Fashion-MNIST"):
        simulation_config(30, per_day=2500)


def test_nothing_new_only_for_the_same_pool_and_parameters():
    params = {"data": {"root": "/p", "image_size": 32}, "training": {"method": "vecaf", "lr": 0.01},
              "objective": {"kind": "ce", "class_weights": None}, "ood_prompt": None}  # fmt: skip
    logged = {"data.root": "/p", "data.image_size": "32", "data.pool_size_used": "60", "training.method": "vecaf",
              "training.lr": "0.01", "objective.kind": "ce", "objective.class_weights": "None", "ood_prompt": "None",
              "registry.model_name": "m"}  # fmt: skip
    latest = {"version": "3", "dataset_digest": "d" * 64, "params": logged}
    assert nothing_new(None, "d" * 64, params) is None
    assert nothing_new(latest, "e" * 64, params) is None
    reason = nothing_new(latest, "d" * 64, params)
    assert reason.startswith("no new images since version 3") and "nothing registered" in reason
    changed = {**params, "objective": {"kind": "class-weighted", "class_weights": [1.0, 3.0]}}
    assert nothing_new(latest, "d" * 64, changed) is None


def test_pool_version_tags_and_the_artifact_round_trip():
    version = {"size": 7, "digest": "f" * 64, "new": 3, "cached": 4, "class_counts": {"a": 5, "b": 2}}
    tags = pool_version_tags(version)
    assert tags["pool.size"] == "7" and tags["pool.new"] == "3" and tags["pool.cached"] == "4"
    assert tags["pool.classes"] == "2" and json.loads(tags["pool.class_counts"]) == {"a": 5, "b": 2}
    rows = [{"class": "a", "images": 5}, {"class": "b", "images": 2}, {"class": "(all)", "images": 7},
            {"class": "(new)", "images": 3}, {"class": "(seen before)", "images": 4}]  # fmt: skip
    artifact = SimpleNamespace(data=json.dumps(rows), description=f"Pool x: 7 images; digest {'f' * 64}.")
    assert read_pool_version(artifact) == {**version}


def test_a_no_op_is_read_from_the_pipeline_summary_artifact():
    from tasks.reports import noop_summary_markdown, pool_line

    reason = "no new images since version 3 (pool digest ffffffffffff, trained with the same parameters): nothing " \
             "trained, nothing registered, the champion stays"
    pool = {"size": 7, "digest": "f" * 64, "new": 0, "cached": 7, "class_counts": {"a": 5, "b": 2}}
    text = noop_summary_markdown(reason, pool, "m")
    assert noop_reason({"vecaf-pipeline-summary": SimpleNamespace(data=text)}) == reason
    trained = "# VeCAF pipeline run\n\n**Final held-out top-1: 0.5**"
    assert noop_reason({"vecaf-pipeline-summary": SimpleNamespace(data=trained)}) is None
    assert noop_reason({}) is None
    assert "**0 new**" in pool_line(pool) and "7 seen before" in pool_line(pool)
