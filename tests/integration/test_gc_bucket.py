"""``vecaf gc`` removes old run prefixes from the bucket (``runs/<run key>/``), on the session stack's S3 and MLflow.

Run prefixes are written under a random key prefix of the stack's bucket, each tagged to MLflow runs of a
fresh experiment through the ``run_key`` tag, as ``flows/finetune.py`` tags them. The retention rules of the
work folders decide (``tasks/retention.py``): a prefix goes when its runs are deleted by this gc, FAILED, or
absent, and its newest object is older than the cutoff; it stays for a FINISHED run that stays, a RUNNING
run, the champion's run, a run of an experiment not pruned, and when any one of its runs stays.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DAY_MS = 86_400_000
PROJECT_ROOT = Path(__file__).resolve().parents[2]
FILES = ("checkpoints/loop-1.pt", "loop-1.json", "model/model.safetensors")


@pytest.fixture
def env(stack, monkeypatch):
    for key, value in stack.env.items():
        monkeypatch.setenv(key, value)
    return stack


def _keys(stack, root: str) -> dict[str, set[str]]:
    """``run key (without the test's suffix) -> its object names`` under ``<root>/runs/``."""
    s3 = stack.s3_client()
    out: dict[str, set[str]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket, Prefix=f"{root}/runs/"):
        for obj in page.get("Contents", []):
            key, _, name = obj["Key"][len(root) + 6 :].partition("/")
            out.setdefault(key.rsplit("-", 1)[0], set()).add(name)
    return out


@pytest.fixture
def history(env):
    from tasks.tracking import mlflow_client

    client = mlflow_client(env.mlflow_url)
    tag = uuid.uuid4().hex[:8]
    experiment, other, model = f"vecaf-test-gcb-{tag}", f"vecaf-test-gcb-other-{tag}", f"vecaf-test-gcb-{tag}"
    exp_id, other_id = client.create_experiment(experiment), client.create_experiment(other)
    now = int(time.time() * 1000)
    base = now - 100 * DAY_MS
    # (name, run key, start, final status or None for RUNNING); newest first, keep_runs=3 keeps the first three
    plan = [
        ("shared-ok", "k-shared", now + 20 * DAY_MS, "FINISHED"),  # recent: stays by age
        ("kept", "k-kept", base + 6 * DAY_MS, "FINISHED"),
        ("failed", "k-fail", base + 5 * DAY_MS, "FAILED"),
        ("champion", "k-champ", base + 4 * DAY_MS, "FINISHED"),
        ("running", "k-run", base + 3 * DAY_MS, None),
        ("deleted", "k-del", base + 2 * DAY_MS, "FINISHED"),
        ("shared-failed", "k-shared", base + 1 * DAY_MS, "FAILED"),
    ]
    runs = {}
    for name, key, start, status in plan:
        run = client.create_run(exp_id, start_time=start, run_name=name, tags={"run_key": f"{key}-{tag}"})
        if status:
            client.set_terminated(run.info.run_id, status)
        runs[name] = run.info.run_id
    elsewhere = client.create_run(other_id, start_time=base, run_name="elsewhere", tags={"run_key": f"k-other-{tag}"})
    client.set_terminated(elsewhere.info.run_id, "FAILED")
    client.create_registered_model(model)
    info = client.get_run(runs["champion"]).info
    mv = client.create_model_version(model, source=f"{info.artifact_uri}/model", run_id=runs["champion"])
    client.set_registered_model_alias(model, "champion", str(mv.version))

    root = f"gcb-{tag}"
    s3 = env.s3_client()
    for key in ("k-shared", "k-kept", "k-fail", "k-champ", "k-run", "k-del", "k-other", "k-orphan"):
        for name in FILES:
            s3.put_object(Bucket=env.bucket, Key=f"{root}/runs/{key}-{tag}/{name}", Body=f"{key}/{name}".encode())
    return {"client": client, "experiment": experiment, "model": model, "runs": runs, "root": root, "now": now,
            "runs_uri": f"s3://{env.bucket}/{root}/runs", "tag": tag}  # fmt: skip


def test_gc_removes_old_run_prefixes_from_the_bucket_by_the_retention_rules(env, history, tmp_path):
    from tasks.retention import apply_gc, plan_gc

    h = history
    every = {k: set(FILES) for k in ("k-shared", "k-kept", "k-fail", "k-champ", "k-run", "k-del", "k-other", "k-orphan")}
    assert _keys(env, h["root"]) == every
    options = dict(tracking_uri=env.mlflow_url, state_dir=tmp_path / "state", store_dir=None, keep_runs=3,
                   keep_versions=1, older_than_days=30, experiments=[h["experiment"]], models=[h["model"]],
                   runs_uri=h["runs_uri"])  # fmt: skip

    # Today every object is fresh: nothing in the bucket may go, whatever the runs.
    fresh = plan_gc(**options, now_ms=h["now"])
    assert fresh.run_prefixes == [] and {k.rsplit("-", 1)[0] for k in fresh.kept_prefixes} == set(every)

    # 40 days on: the objects are old; the runs decide.
    plan = plan_gc(**options, now_ms=h["now"] + 40 * DAY_MS)
    assert {r["run_id"] for r in plan.runs} == {h["runs"]["deleted"], h["runs"]["shared-failed"]}
    assert {p["run_key"].rsplit("-", 1)[0]: p["reason"] for p in plan.run_prefixes} == {
        "k-del": "run deleted by this gc", "k-fail": "run FAILED", "k-orphan": "no MLflow run names it",
    }  # fmt: skip
    assert all(p["objects"] == len(FILES) and p["bytes"] > 0 for p in plan.run_prefixes)
    kept = {k.rsplit("-", 1)[0]: why for k, why in plan.kept_prefixes.items()}
    assert kept["k-champ"] == f"run {h['runs']['champion']} is behind a model version that stays"
    assert kept["k-run"] == f"run {h['runs']['running']} is RUNNING"
    assert kept["k-kept"] == f"run {h['runs']['kept']} is FINISHED"
    assert kept["k-shared"] == f"run {h['runs']['shared-ok']} is FINISHED"  # one of its two runs stays
    assert kept["k-other"].endswith("is in an experiment this gc does not prune")
    assert any(line.startswith(f"bucket   {h['runs_uri']}/k-orphan-{h['tag']}/") for line in plan.lines())
    assert _keys(env, h["root"]) == every  # planning changed nothing

    done = apply_gc(plan, tracking_uri=env.mlflow_url)
    assert (done["run_prefixes"], done["run_prefix_objects"]) == (3, 3 * len(FILES))
    assert _keys(env, h["root"]) == {k: v for k, v in every.items() if k not in ("k-del", "k-fail", "k-orphan")}
    assert h["client"].get_run(h["runs"]["deleted"]).info.lifecycle_stage == "deleted"


def test_a_prefix_written_after_the_plan_is_left_alone(env, history, tmp_path):
    """A rerun resuming in a prefix between the plan and --apply: its objects stay."""
    from tasks.retention import apply_gc, plan_gc

    h = history
    plan = plan_gc(tracking_uri=env.mlflow_url, state_dir=tmp_path / "state", store_dir=None, keep_runs=3,
                   keep_versions=1, older_than_days=30, experiments=[h["experiment"]], models=[h["model"]],
                   runs_uri=h["runs_uri"], now_ms=h["now"] + 40 * DAY_MS)  # fmt: skip
    time.sleep(1.1)  # S3 times have one-second resolution
    env.s3_client().put_object(Bucket=env.bucket, Key=f"{h['root']}/runs/k-fail-{h['tag']}/loop-2.json", Body=b"{}")
    done = apply_gc(plan, tracking_uri=env.mlflow_url)
    assert done["run_prefixes"] == 2
    assert _keys(env, h["root"])["k-fail"] == {*FILES, "loop-2.json"}


def test_vecaf_gc_lists_the_bucket_prefixes_of_its_services(env, history):
    """The CLI plans on the services' bucket and prefix (``VECAF_SERVICES__PREFIX``), as a dry run."""
    h = history
    cmd = [sys.executable, "-m", "infra.cli", "gc", "--keep-runs", "3", "--older-than-days", "0",
           "--experiment", h["experiment"], "--model", h["model"]]  # fmt: skip
    environ = {**os.environ, "VECAF_SERVICES__PREFIX": h["root"], "PYTHONPATH": str(PROJECT_ROOT)}
    out = subprocess.run(cmd, cwd=PROJECT_ROOT, env=environ, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    listed = sorted(line.split()[1] for line in out.stdout.splitlines() if line.startswith("bucket "))
    assert listed == [f"{h['runs_uri']}/{k}-{h['tag']}/" for k in ("k-del", "k-fail", "k-orphan")]
    assert "run_prefixes 3" in out.stdout and "nothing changed" in out.stdout
    assert _keys(env, h["root"])["k-del"] == set(FILES)
