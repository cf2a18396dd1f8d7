"""``vecaf gc`` (issue 11, finding 10) against the session stack's MLflow server and bucket.

An experiment of old runs (one FAILED, one with a nested loop run, one still RUNNING, one recent) and a
registered model with four versions, one holding ``champion``. The dry run lists and changes nothing;
``--apply`` deletes exactly the runs and versions expected, their artifacts leave the bucket, an aliased
version survives (also one that gained its alias after the plan was made), failed runs' work folders go,
a large log is rotated and a view's Parquet files become one with the same rows.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DAY_MS = 86_400_000


@pytest.fixture
def env(stack, monkeypatch):
    for key, value in stack.env.items():
        monkeypatch.setenv(key, value)
    return stack


def _objects(stack, artifact_uri: str) -> list[str]:
    from tasks.tracking import s3_location

    location = s3_location(artifact_uri, stack.bucket)
    prefix = location.split(f"s3://{stack.bucket}/", 1)[1].rstrip("/") + "/"
    listed = stack.s3_client().list_objects_v2(Bucket=stack.bucket, Prefix=prefix)
    return [o["Key"] for o in listed.get("Contents", [])]


@pytest.fixture
def history(env):
    """Runs and versions in a fresh experiment and registered model; returns their ids by role."""
    from tasks.tracking import mlflow_client

    client = mlflow_client(env.mlflow_url)
    tag = uuid.uuid4().hex[:8]
    experiment, model = f"vecaf-test-gc-{tag}", f"vecaf-test-gc-{tag}"
    exp_id = client.create_experiment(experiment)
    now = int(time.time() * 1000)
    base = now - 100 * DAY_MS
    runs = []
    for i in range(6):
        run = client.create_run(exp_id, start_time=base + i * DAY_MS, run_name=f"old-{i}")
        client.log_text(run.info.run_id, f"run {i}", "config/params.yaml")
        client.set_terminated(run.info.run_id, "FAILED" if i == 1 else "FINISHED")
        runs.append(run.info.run_id)
    child = client.create_run(exp_id, start_time=base, run_name="loop-1", tags={"mlflow.parentRunId": runs[0]})
    client.log_text(child.info.run_id, "loop 1", "loop/record.json")
    client.set_terminated(child.info.run_id, "FINISHED")
    recent = client.create_run(exp_id, start_time=now + 20 * DAY_MS, run_name="recent").info.run_id
    client.set_terminated(recent, "FINISHED")
    running = client.create_run(exp_id, start_time=base - DAY_MS, run_name="still-running").info.run_id
    client.create_registered_model(model)
    versions = {}
    for i in (2, 3, 4, 5):  # versions 1..4 from runs old-2..old-5
        info = client.get_run(runs[i]).info
        mv = client.create_model_version(model, source=f"{info.artifact_uri}/config", run_id=runs[i])
        versions[runs[i]] = str(mv.version)
    client.set_registered_model_alias(model, "champion", "1")
    return {
        "client": client, "experiment": experiment, "model": model, "runs": runs, "child": child.info.run_id,
        "recent": recent, "running": running, "versions": versions, "now": now,
    }  # fmt: skip


def test_gc_dry_run_lists_and_apply_deletes_only_what_is_expected(env, history, tmp_path):
    from tasks.features import read_embeddings, write_image_embeddings
    from tasks.retention import apply_gc, plan_gc

    h = history
    client, runs = h["client"], h["runs"]
    state = tmp_path / "state"
    for run_id in (runs[1], runs[5], runs[0], "0123456789abcdef0123456789abcdef", h["running"]):
        (state / "work" / "runs" / run_id / "checkpoints").mkdir(parents=True)
        (state / "work" / "runs" / run_id / "checkpoints" / "loop-0.pt").write_bytes(b"x" * 1000)
    (state / "logs").mkdir(parents=True)
    (state / "logs" / "mlflow.log").write_text("line\n" * 400)
    (state / "logs" / "s3.log").write_text("short\n")
    store = tmp_path / "feast"
    rng = np.random.default_rng(0)
    for part in range(3):
        ids = [f"img/{part}-{i}" for i in range(4)] + ["img/shared"]
        write_image_embeddings(store, ids, rng.normal(size=(5, 8)).astype(np.float32), labels=[0, 1, 0, 1, part],
                               split="train", pvm="pvm-a", event_time=datetime(2026, 1, 1 + part, tzinfo=timezone.utc))
    before_ids, before_vectors, before_labels = read_embeddings(store, pvm="pvm-a", split="train")

    # "now" 40 days ahead: every version (created just now) is older than 30 days; the "recent" run is not.
    options = dict(tracking_uri=env.mlflow_url, state_dir=state, store_dir=store, keep_runs=2, keep_versions=1,
                   older_than_days=30, log_max_bytes=1000, experiments=[h["experiment"]], models=[h["model"]],
                   now_ms=h["now"] + 40 * DAY_MS)  # fmt: skip
    plan = plan_gc(**options)
    planned_runs = {r["run_id"] for r in plan.runs}
    # Kept: recent and old-5 (the 2 newest), old-2 (source of the champion), old-5 (source of the newest
    # version), the RUNNING run. Deleted: old-4 and old-3 (their versions go), old-1 (FAILED), old-0 (+ loop-1).
    assert planned_runs == {runs[4], runs[3], runs[1], runs[0]}
    assert [r["children"] for r in plan.runs if r["run_id"] == runs[0]] == [[h["child"]]]
    assert {v["version"] for v in plan.versions} == {"2", "3"}
    assert plan.kept_versions[f"{h['model']}/1"] == "holds an alias"
    assert {w["run_id"]: w["reason"] for w in plan.work_dirs} == {
        runs[1]: "run deleted by this gc", runs[0]: "run deleted by this gc",
        "0123456789abcdef0123456789abcdef": "run unknown to MLflow",
    }  # fmt: skip
    assert [p["view"] for p in plan.parquet] == ["image_embeddings"]
    assert [log["path"] for log in plan.logs] == [str(state / "logs" / "mlflow.log")]

    # The dry run changed nothing.
    assert all(client.get_run(r).info.lifecycle_stage == "active" for r in [*runs, h["child"]])
    assert len(client.search_model_versions(f"name = '{h['model']}'")) == 4
    assert all(_objects(env, client.get_run(r).info.artifact_uri) for r in runs)
    assert len(list((state / "work" / "runs").iterdir())) == 5
    assert len(list((store / "data" / "image_embeddings").glob("*.parquet"))) == 3

    # Version 2 gains an alias between the plan and its application: it and its run (old-3) survive.
    client.set_registered_model_alias(h["model"], "challenger", "2")
    done = apply_gc(plan, tracking_uri=env.mlflow_url, log_keep=2)
    assert done == {"versions": 1, "versions_skipped": 1, "runs": 3, "nested_runs": 1, "work_dirs": 3, "logs": 1,
                    "parquet_views": 1, "run_prefixes": 0, "run_prefix_objects": 0}  # fmt: skip
    deleted = {runs[4], runs[1], runs[0], h["child"]}
    for run_id in [*runs, h["child"], h["recent"], h["running"]]:
        info = client.get_run(run_id).info
        assert info.lifecycle_stage == ("deleted" if run_id in deleted else "active"), run_id
        logged = run_id not in (h["recent"], h["running"])  # the two runs that never logged an artifact
        assert bool(_objects(env, info.artifact_uri)) == (logged and run_id not in deleted), run_id
    assert sorted(v.version for v in client.search_model_versions(f"name = '{h['model']}'")) == ["1", "2", "4"]
    assert client.get_registered_model(h["model"]).aliases == {"champion": "1", "challenger": "2"}
    assert sorted(p.name for p in (state / "work" / "runs").iterdir()) == sorted([runs[5], h["running"]])
    assert (state / "logs" / "mlflow.log").stat().st_size == 0
    assert (state / "logs" / "mlflow.log.1").read_text() == "line\n" * 400
    assert (state / "logs" / "s3.log").read_text() == "short\n"
    assert len(list((store / "data" / "image_embeddings").glob("*.parquet"))) == 1
    after_ids, after_vectors, after_labels = read_embeddings(store, pvm="pvm-a", split="train")
    assert list(after_ids) == list(before_ids) and len(after_ids) == 13
    np.testing.assert_array_equal(after_vectors, before_vectors)
    np.testing.assert_array_equal(after_labels, before_labels)

    # A second pass finds nothing more to do among these runs, versions and files.
    again = plan_gc(**options)
    assert again.runs == [] and again.versions == [] and again.work_dirs == [] and again.parquet == []


def test_vecaf_gc_without_apply_lists_and_deletes_nothing(env, history):
    from typer.testing import CliRunner

    from infra.cli import app

    h = history
    client, runs = h["client"], h["runs"]
    args = ["gc", "--experiment", h["experiment"], "--model", h["model"], "--keep-runs", "2", "--keep-versions", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    listed = {ln.split()[1] for ln in result.output.splitlines() if ln.startswith("run ")}
    # With the real clock every version is recent, so each one's run is protected; old-0 (+ loop) and old-1 go.
    assert listed == {runs[0], runs[1]}
    assert "dry run: would handle runs 2, nested_runs 1, versions 0" in result.output
    assert all(client.get_run(r).info.lifecycle_stage == "active" for r in [*runs, h["child"]])
    assert len(client.search_model_versions(f"name = '{h['model']}'")) == 4
