"""``vecaf simulate --days 3 --quick`` against the session stack, then a drop with no new images.

The command runs in this process (typer's runner) against the real stack: each day writes a drop of
Fashion-MNIST PNGs into the growing folder, triggers the production pipeline deployment (VeCAF) and the
experiment deployment (random shadow) through Prefect, and the stack's worker runs them. Checked from the
summary it writes and from the servers: the pool grows by the drop each day and only the drop is new to the
feature cache; every day has a promotion decision and both lanes; the late classes refuse the warm start;
the snowy day and the objective change are recorded; the MLflow run, the figure and the Prefect artifact
exist. Then the production deployment runs again on the same folder: a no-op that says so and registers
nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def simulation(env) -> SimpleNamespace:
    from typer.testing import CliRunner

    from infra.cli import app
    from infra.stack import state_dir
    from vecaf.settings import load_settings

    settings = load_settings()
    result = CliRunner().invoke(app, ["simulate", "--days", "3", "--quick"])
    path = state_dir(settings) / "simulate" / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else None
    return SimpleNamespace(settings=settings, result=result, summary=summary, path=path)


def test_the_command_completes_and_writes_its_summary(simulation):
    assert simulation.result.exit_code == 0, (simulation.result.output, simulation.result.exception)
    assert simulation.summary is not None
    assert [d["day"] for d in simulation.summary["days"]] == [1, 2, 3]
    assert "VeCAF top-1" in simulation.result.output or "top1" in simulation.result.output


def test_the_pool_grows_by_each_drop_and_only_the_drop_is_new(simulation):
    per_day = simulation.summary["config"]["per_day"]
    for d in simulation.summary["days"]:
        pool = d["vecaf"]["pool"]
        assert d["drop"]["images"] == per_day
        assert pool["size"] == per_day * d["day"]
        assert (pool["new"], pool["cached"]) == (per_day, per_day * (d["day"] - 1))
        assert sum(pool["class_counts"].values()) == pool["size"]
        shadow = d["shadow"]["pool"]  # the shadow runs after VeCAF on the same folder: everything is cached
        assert (shadow["size"], shadow["new"], shadow["digest"]) == (pool["size"], 0, pool["digest"])
    digests = [d["vecaf"]["pool"]["digest"] for d in simulation.summary["days"]]
    assert len(set(digests)) == 3


def test_every_day_has_a_promotion_decision_and_both_lanes(simulation):
    for d in simulation.summary["days"]:
        for lane in ("vecaf", "shadow"):
            run = d[lane]
            assert run["decision"] in ("promoted", "kept-champion"), (lane, run)
            assert run["champion_version"] is not None
            assert 0.0 <= run["top1"] <= 1.0 and 0.0 <= run["top1_snow"] <= 1.0
            assert run["selected"] > 0 and run["seconds"] > 0
    first = simulation.summary["days"][0]
    assert first["vecaf"]["decision"] == "promoted" and first["vecaf"]["champion_version"] == "1"
    table = simulation.summary["table"]
    assert [r["day"] for r in table] == [1, 2, 3]
    assert all(r["shadow_top1"] is not None and r["top1"] is not None for r in table)


def test_late_classes_refuse_the_warm_start_and_the_events_are_recorded(simulation):
    day1, day2, day3 = simulation.summary["days"]
    assert len(day1["drop"]["classes"]) == 8 and sorted(day2["drop"]["classes_new"]) == ["Ankle boot", "Bag"]
    assert day1["vecaf"]["init_used"] == "base" and "no champion yet" in day1["vecaf"]["init_reason"]
    assert day2["vecaf"]["init_used"] == "base" and "warm start refused" in day2["vecaf"]["init_reason"]
    # the 8-class champion was evaluated on the 10-class held-out split, its classes mapped by name
    assert "does not know ['Ankle boot', 'Bag']" in day2["vecaf"]["reason"]
    if day2["vecaf"]["decision"] == "promoted":  # a champion on all ten classes: day 3 starts from it
        assert day3["vecaf"]["init_used"] == "champion", day3["vecaf"]["init_reason"]
    assert day2["drop"]["domain"] == "snow" and day2["ood_prompt"] == "It's a snowy day!"
    assert day3["objective"] == {"kind": "class-weighted", "weights": {"Shirt": 3.0}}
    per_class = day3["vecaf"]["per_class"]  # the fixed set has all ten classes: weights 3 (Shirt) and 1 (nine)
    expected = (3 * per_class["Shirt"] + sum(a for c, a in per_class.items() if c != "Shirt")) / 12
    assert day3["vecaf"]["objective_metric"] == pytest.approx(expected)


def test_mlflow_run_figure_and_prefect_artifact(simulation, env):
    from prefect.client.orchestration import get_client

    from tasks.tracking import mlflow_client

    figure = Path(simulation.summary["outputs"]["figure"])
    assert figure.is_file() and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = mlflow_client(env.mlflow_url)
    experiment = client.get_experiment_by_name("vecaf-simulate")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`vecaf.kind` = 'simulation'")
    assert runs, "no simulation run in MLflow"
    history = client.get_metric_history(runs[0].info.run_id, "top1")
    assert sorted(m.step for m in history) == [1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"summary.json", "simulation.png"} <= artifacts
    with get_client(sync_client=True) as prefect:
        latest = prefect.read_latest_artifacts()
    texts = [a.data for a in latest if a.key == "vecaf-simulate-summary"]
    assert texts and "| day |" in texts[0] and "random top-1" in texts[0]


def test_a_drop_with_no_new_images_is_a_no_op_that_says_so(simulation, env):
    from flows.deploy import PIPELINE_DEPLOYMENT
    from infra.simulate import Folders, day_parameters, run_pipeline_day, simulation_config
    from tasks.tracking import mlflow_client

    config = simulation_config(3, quick=True)
    day3 = simulation.summary["days"][2]
    folders = Folders(Path(simulation.summary["folders"]["root"]))
    client = mlflow_client(env.mlflow_url)
    before = {mv.version for mv in client.search_model_versions(f"name = '{config.model_name}'")}
    params = day_parameters(config, 3, folders, day3["drop"]["classes"])
    run = run_pipeline_day(simulation.settings, f"vecaf-pipeline/{PIPELINE_DEPLOYMENT}", params, timeout=600)
    assert run["noop"] and run["noop"].startswith(f"no new images since version {day3['vecaf']['version']}")
    assert run["decision"] == "no-op" and run["version"] is None
    assert run["pool"]["new"] == 0 and run["pool"]["digest"] == day3["vecaf"]["pool"]["digest"]
    after = {mv.version for mv in client.search_model_versions(f"name = '{config.model_name}'")}
    assert after == before
    tagged = client.search_runs(
        [client.get_experiment_by_name("vecaf-simulate").experiment_id],
        filter_string=f"tags.prefect_pipeline_run_id = '{run['flow_run_id']}'",
    )
    assert tagged == []
