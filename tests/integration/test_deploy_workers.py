"""Deployments on real work pools of the session stack (Prefect server + its ``process`` worker).

- A pool named in the settings that does not exist: ``deploy`` fails with a message naming the pool and how
  to create it, before anything is registered.
- No command injection through job variables (issue 11, finding 5a): with the worker's stock template a flow
  run's ``job_variables.command`` really runs (the control); after ``deploy`` writes the project's template,
  the server refuses such a run, and a run created before the change runs the flow, not the command.
- Shards fan out across workers: a second worker joins the pool; one deployed ``featurize`` run of digits
  spreads its ``embed-shard`` runs over both workers, and the embeddings equal an in-process run's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flows.params import DataParams, ModelParams

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHARD_DATA = DataParams(dataset="digits", pool_size=40, test_size=20, image_size=32, shard_size=16)
FAN_OUT_DATA = DataParams(dataset="digits", pool_size=160, test_size=80, image_size=32, shard_size=40)


def _client() -> Any:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _wait_until(predicate, *, timeout: float, what: str, poll_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")


def test_a_missing_work_pool_is_a_clear_error_before_anything_is_deployed(env) -> None:
    from flows.deploy import WorkPoolError, deploy
    from vecaf.settings import load_settings

    with _client() as client:
        before = {d.id: d.updated for d in client.read_deployments()}
        limit_before = [c.concurrency_limit for c in client.read_concurrency_limits(limit=100, offset=0)]
    missing = f"vecaf-no-such-pool-{uuid.uuid4().hex[:6]}"
    with pytest.raises(WorkPoolError) as err:
        deploy(load_settings(deploy={"gpu_pool": missing}), flows=("finetune", "promote"), gpu_limit=3)
    message = str(err.value)
    assert f"work pool {missing!r}" in message and "deploy.gpu_pool" in message
    assert f"prefect work-pool create {missing} --type process" in message and "nothing was deployed" in message
    assert env.prefect_api_url in message
    with pytest.raises(WorkPoolError, match="does not exist"):
        deploy(load_settings(deploy={"cpu_pool": missing}), flows=("promote",))
    with pytest.raises(WorkPoolError, match="'command' was unexpected"):
        deploy(load_settings(deploy={"job_variables": {"cpu": {"command": "id"}}}), flows=("promote",))
    with _client() as client:
        assert {d.id: d.updated for d in client.read_deployments()} == before
        assert [c.concurrency_limit for c in client.read_concurrency_limits(limit=100, offset=0)] == limit_before


def test_fan_out_decision_on_a_process_pool_with_one_worker(env, monkeypatch) -> None:
    from prefect import flow

    from flows.deploy import deploy
    from tasks.fanout import EMBED_SHARD_DEPLOYMENT, fan_out_deployment
    from vecaf.settings import load_settings

    deploy(load_settings(), flows=("embed-shard",))

    @flow(name="fan-out-decision")
    def decide(mode: str) -> str | None:
        return fan_out_deployment(mode, EMBED_SHARD_DEPLOYMENT)

    assert decide("always") is None  # a plain call from this process is not a deployed run
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", str(uuid.uuid4()))  # as in a process a worker started
    assert decide("always") == EMBED_SHARD_DEPLOYMENT
    assert decide("never") is None
    assert decide("auto") is None  # only the stack's worker is online: no gain from a process per shard
    with pytest.raises(ValueError, match="fan_out_shards"):
        fan_out_deployment("sometimes", EMBED_SHARD_DEPLOYMENT)
    from prefect.client.schemas.actions import WorkPoolUpdate

    with _client() as client:
        client.update_work_pool(env.work_pool, WorkPoolUpdate(concurrency_limit=1))
        try:
            assert decide("always") is None  # the waiting parent would hold the pool's only slot
        finally:
            client.update_work_pool(env.work_pool, WorkPoolUpdate(concurrency_limit=None))


def test_the_caption_shard_flow_captions_its_shard_and_publishes_a_summary(env) -> None:
    from flows.caption import caption_shard_flow

    summary = caption_shard_flow(data=SHARD_DATA, start=0, stop=8)
    assert summary["kind"] == "caption" and (summary["start"], summary["stop"]) == (0, 8)
    assert summary["new"] + summary["cached"] == 8 and summary["worker"] == ""  # no worker in this process


def _shard_params(start: int = 0, stop: int = 16) -> dict[str, Any]:
    return {
        "data": SHARD_DATA.model_dump(mode="json"), "models": ModelParams().model_dump(mode="json"),
        "kind": "image", "split": "train", "start": start, "stop": stop,
    }  # fmt: skip


def test_a_flow_run_cannot_replace_the_worker_command(env, tmp_path: Path) -> None:
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.states import Scheduled
    from prefect.workers.process import ProcessWorker

    from flows.deploy import deploy, wait_for_run
    from vecaf.settings import load_settings

    settings = load_settings()
    pool = settings.stack.work_pool
    control, early_marker, late_marker = (tmp_path / n for n in ("control", "early", "late"))
    now = datetime.now(timezone.utc)

    # 1. the pool as the worker creates it (the stock process template): a caller's command runs
    with _client() as client:
        client.update_work_pool(pool, WorkPoolUpdate(base_job_template=ProcessWorker.get_default_base_job_template()))
    ids = deploy(load_settings(deploy={"manage_pool_templates": False}), flows=("embed-shard",))
    dep_id = ids["embed-shard/fan-out"]
    with _client() as client:
        run = client.create_flow_run_from_deployment(
            dep_id, parameters=_shard_params(), job_variables={"command": f"touch {control}"}
        )
        try:
            _wait_until(control.exists, timeout=180, what="the control command on the stock template")
        finally:
            client.delete_flow_run(run.id)
        # a run queued for later, with the command, while the stock template still accepts it
        early = client.create_flow_run_from_deployment(
            dep_id, parameters=_shard_params(), job_variables={"command": f"touch {early_marker}"},
            state=Scheduled(scheduled_time=now + timedelta(hours=1)),
        )  # fmt: skip

    # 2. deploy writes the project's template: no command variable any more
    deploy(settings, flows=("embed-shard",))
    with _client() as client:
        variables = client.read_work_pool(pool).base_job_template["variables"]
        assert "command" not in variables["properties"] and variables["additionalProperties"] is False
        # 3. a new run asking for a command (or a code-loading env) is refused by the server
        for job_variables in ({"command": f"touch {late_marker}"}, {"env": {"PYTHONPATH": str(tmp_path)}}):
            with pytest.raises(PrefectHTTPStatusError) as refused:
                client.create_flow_run_from_deployment(dep_id, parameters=_shard_params(), job_variables=job_variables)
            assert refused.value.response.status_code == 422
        # 4. the early run, now due, runs the flow: the worker ignores the stored command
        client.set_flow_run_state(early.id, Scheduled(scheduled_time=datetime.now(timezone.utc)), force=True)
    final = wait_for_run(settings, early.id, timeout=600, poll_s=2.0)
    assert final.state.is_completed(), final.state.message
    assert not early_marker.exists() and not late_marker.exists()
    summary = _summaries([final])[0]
    assert summary["start"] == 0 and summary["stop"] == 16 and summary["new"] + summary["cached"] == 16


def test_a_git_source_at_a_branch_is_what_the_worker_runs(env, tmp_path: Path) -> None:
    from flows.deploy import deploy, trigger
    from vecaf.settings import load_settings

    root = Path(__file__).resolve().parents[2]
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip(f"the project is not a git checkout here: {head.stderr.strip()}")
    remote = tmp_path / "vecaf.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(root), str(remote)], check=True, timeout=300)
    subprocess.run(["git", "-C", str(remote), "branch", "vecaf-src", head.stdout.strip()], check=True)
    settings = load_settings(deploy={"source": f"file://{remote}", "branch": "vecaf-src"})
    ids = deploy(settings, flows=("embed-shard",))
    with _client() as client:
        dep = client.read_deployment(ids["embed-shard/fan-out"])
    clone = dep.pull_steps[0]["prefect.deployments.steps.git_clone"]
    assert clone["repository"] == f"file://{remote}" and clone["branch"] == "vecaf-src"
    run = trigger(settings, "embed-shard/fan-out", _shard_params(16, 32), wait=True, timeout=600, poll_s=2.0)
    assert run.state.is_completed(), run.state.message
    assert _summaries([run])[0]["start"] == 16
    with pytest.raises(ValueError, match="deploy.branch"):
        deploy(load_settings(deploy={"branch": "main"}), flows=("embed-shard",))
    deploy(load_settings(), flows=("embed-shard",))  # back to the checkout for the tests that follow


def test_the_cli_writes_a_prefect_yaml_and_deploys_what_it_says(env, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.deploy import WorkPoolError
    from infra.cli import app

    path = tmp_path / "prefect.yaml"
    runner = CliRunner()
    written = runner.invoke(app, ["deploy", "--write-prefect-yaml", str(path), "--cron", "0 4 * * *"])
    assert written.exit_code == 0, written.output
    edited = path.read_text().replace("0 4 * * *", "30 5 * * *")
    assert edited != path.read_text()
    path.write_text(edited)
    deployed = runner.invoke(app, ["deploy", "--prefect-file", str(path)])
    assert deployed.exit_code == 0, f"{deployed.output}\n{deployed.exception!r}"
    with _client() as client:
        pipeline = client.read_deployment_by_name("vecaf-pipeline/production")
    assert [s.schedule.cron for s in pipeline.schedules] == ["30 5 * * *"]
    assert pipeline.work_pool_name == env.work_pool
    path.write_text(edited.replace(f"name: {env.work_pool}", "name: vecaf-typo-pool"))
    refused = runner.invoke(app, ["deploy", "--prefect-file", str(path)])
    assert refused.exit_code != 0 and isinstance(refused.exception, WorkPoolError)
    assert "'vecaf-typo-pool'" in str(refused.exception)


def _summaries(runs: list[Any]) -> list[dict[str, Any]]:
    from tasks.fanout import shard_summary

    with _client() as client:
        return [shard_summary(client, r) for r in runs]


def _start_worker(stack, name: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, **stack.env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PYTHONUNBUFFERED": "1"}
    argv = [
        sys.executable, "-m", "prefect", "worker", "start", "--pool", stack.work_pool, "--type", "process",
        "--name", name, "--limit", "2", "--install-policy", "never",
    ]  # fmt: skip
    with log.open("ab") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parents[2],
            start_new_session=True,
        )  # fmt: skip


def _stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _shard_runs(parent_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with _client() as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))
        )


def test_two_workers_share_the_shards_of_one_featurize_run(env, tmp_path: Path, monkeypatch) -> None:
    from flows.deploy import deploy, trigger
    from flows.featurize import featurize
    from flows.runtime import runtime
    from infra.stack import worker_name
    from tasks.embeddings import feature_keys
    from tasks.features import read_embeddings
    from vecaf.settings import load_settings

    settings = load_settings()
    deploy(settings, flows=("featurize", "embed-shard"), gpu_limit=2)
    pool = env.work_pool
    second = f"vecaf-second-{uuid.uuid4().hex[:6]}"
    log = tmp_path / "second-worker.log"
    with _client() as client:
        queue = client.read_work_queues(work_pool_name=env.work_pool)[0]
        # at most 4 runs of the pool at once (the parent and 3 shards): no worker can take every shard at once
        client.update_work_queue(queue.id, concurrency_limit=4)
    proc = _start_worker(env, second, log)
    try:
        with _client() as client:
            def online() -> bool:
                return any(w.name == second and w.status == "ONLINE" for w in client.read_workers_for_work_pool(pool))

            _wait_until(online, timeout=180, what=f"worker {second} online")
        started = time.monotonic()
        run = trigger(
            settings, "featurize/standalone", {"data": FAN_OUT_DATA.model_dump(mode="json"), "text": False},
            wait=True, timeout=900, poll_s=2.0,
        )  # fmt: skip
        deployed_s = time.monotonic() - started
    finally:
        _stop_worker(proc)
        with _client() as client:
            client.update_work_queue(queue.id, concurrency_limit=None)
    assert run.state.is_completed(), f"{run.state.message}\n{log.read_text()[-3000:]}"

    shards = [r for r in _shard_runs(run.id) if r.deployment_id is not None]
    assert len(shards) == 6 and all(r.state.is_completed() for r in shards)  # 160/40 pool + 80/40 held-out
    summaries = _summaries(shards)
    assert sorted((s["split"], s["start"]) for s in summaries) == sorted(
        [("train", a) for a in range(0, 160, 40)] + [("test", a) for a in range(0, 80, 40)]
    )
    workers = {s["worker"] for s in summaries}
    assert workers == {worker_name(env.settings), second}, workers
    from infra.progress import read_progress

    assert read_progress(run.id) == {"embed-progress": (100.0, "embed: 6/6 shards")}  # moved as shard runs ended
    waits = [(r.start_time - r.created).total_seconds() for r in shards]
    runs_s = [r.total_run_time.total_seconds() for r in shards]

    # the same features as one in-process run (no fan-out outside a deployment) into another store
    monkeypatch.setenv("VECAF_STACK__FEAST_DIR", str(tmp_path / "feast-one-process"))
    started = time.monotonic()
    local = featurize(data=FAN_OUT_DATA, text=False)
    local_s = time.monotonic() - started
    assert local["image"] == {"new": 240, "cached": 0}
    pvm = feature_keys(ModelParams(), FAN_OUT_DATA, None).pvm
    shared_store = runtime(settings).store_dir
    for split, n in (("train", 160), ("test", 80)):
        ids_b, emb_b, lab_b = read_embeddings(str(tmp_path / "feast-one-process"), pvm=pvm, split=split)
        ids_a, emb_a, lab_a = read_embeddings(shared_store, pvm=pvm, split=split, ids=ids_b)
        assert len(ids_b) == n and list(ids_a) == list(ids_b)
        np.testing.assert_array_equal(lab_a, lab_b)
        np.testing.assert_allclose(emb_a, emb_b, rtol=0, atol=1e-5)
    print(
        f"\nfeaturize of {FAN_OUT_DATA.pool_size}+{FAN_OUT_DATA.test_size} digits: deployed with 6 shard runs on "
        f"2 workers {deployed_s:.1f} s, in-process {local_s:.1f} s; shard run created->started "
        f"{np.median(waits):.1f} s median ({min(waits):.1f}-{max(waits):.1f}), running {np.median(runs_s):.1f} s "
        f"median ({min(runs_s):.1f}-{max(runs_s):.1f}); workers {sorted(s['worker'] for s in summaries)}"
    )
