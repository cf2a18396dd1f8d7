"""Faults of issue 11 (findings 1 and 3) injected into real servers, and what reconciliation makes of them.

A stack of this module's own (S3, MLflow, Prefect server, worker; free ports, its own state dir) runs tiny
deployed flows: ``reliability-outer`` holds the ``gpu`` slot in a task that sleeps and, when asked, runs the
subflow ``reliability-inner`` that first leaves what a finetuning leaves in MLflow (a parent run tagged with
its flow run, a nested ``loop-1`` run, a PENDING logged model). Then, for real:

- ``vecaf stack down`` + ``up`` while the slot is held: the slot stays taken with no holder (finding 1);
  a new run that watches its slot waits names the tag and frees it, and completes; ``reconcile`` crashes the
  dead run.
- ``kill -9`` of the flow-run process: after ``reconcile`` nothing of that run is RUNNING in Prefect or MLflow
  and the logged model is FAILED, not PENDING (finding 3).
- ``kill -9`` of the worker mid-run: ``stack up`` starts a new one; nothing stays RUNNING; the next run completes.
- a ``log_loop`` that fails half-way and is retried makes one nested run, not two.

The flows below are deployed from this file (the worker imports it), so its top level imports only what a
worker has.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXPERIMENT = "vecaf-reliability"
_ENTRYPOINT = "tests/integration/test_reliability.py:outer"


@task(name="hold-gpu", tags=["gpu"], cache_policy=NO_CACHE, persist_result=False)
def hold_gpu(seconds: float) -> float:
    """Hold the ``gpu`` slot for ``seconds``."""
    time.sleep(seconds)
    return seconds


@flow(name="reliability-inner")
def inner(seconds: float, tracking_uri: str) -> None:
    """What a finetuning leaves in MLflow before its long task, then the long task."""
    from flows.runtime import flow_run_info
    from tasks.tracking import mlflow_client

    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
    info = flow_run_info()
    parent = client.create_run(exp_id, run_name="finetune", tags={"prefect_flow_run_id": str(info["id"])})
    client.create_run(exp_id, run_name="loop-1", tags={"mlflow.parentRunId": parent.info.run_id, "loop": "1"})
    client.create_logged_model(exp_id, name="model", source_run_id=parent.info.run_id)
    hold_gpu(seconds)


@flow(name="reliability-outer")
def outer(
    seconds: float = 1.0, tracking_uri: str | None = None, watch_s: float = 30.0, reconcile_first: bool = False
) -> None:
    """Hold the ``gpu`` slot (in the subflow when ``tracking_uri`` is given) while slot waits are watched.

    With ``reconcile_first`` it starts as ``vecaf-pipeline`` does: the ``reconcile`` task first.
    """
    from flows.runtime import runtime
    from tasks.reconcile import reconcile_task, watch_slot_waits

    if reconcile_first:
        rt = runtime()
        reconcile_task(rt.tracking_uri, rt.settings.stack.work_pool)
    with watch_slot_waits(every_s=watch_s):
        if tracking_uri:
            inner(seconds, tracking_uri)
        else:
            hold_gpu(seconds)


# ---------------------------------------------------------------------------------------------------------


def _wait(what: str, check: Any, timeout: float, poll: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(poll)


@contextlib.contextmanager
def _own_stack(state_dir: Path, **server_env: str) -> Iterator[tuple[Any, dict[str, str]]]:
    """A stack in ``state_dir`` (``server_env`` reaches its servers), the tiny flow deployed, ``gpu`` limit 1."""
    from prefect import Flow
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from stack_fixtures import drain_prefect_services, make_stack_settings

    from flows.deploy import PROJECT_ROOT, ensure_gpu_limit
    from infra.stack import running_stack, stack_env, stack_urls
    from vecaf.settings import Settings

    stack = make_stack_settings(state_dir, work_pool="vecaf-reliability")
    urls = stack_urls(stack)
    patch = pytest.MonkeyPatch()
    for key, value in {**stack_env(stack, with_settings=True), **server_env}.items():
        patch.setenv(key, value)
    try:
        with running_stack(stack, timeout=300.0), temporary_settings({PREFECT_API_URL: urls["prefect_api_url"]}):
            ensure_gpu_limit(1)
            source = Flow.from_source(source=str(PROJECT_ROOT), entrypoint=_ENTRYPOINT)
            source.deploy(
                name="holder", work_pool_name=stack.work_pool, build=False, push=False, print_next_steps=False,
                ignore_warnings=True,
            )  # fmt: skip
            yield Settings(stack=stack), urls
            drain_prefect_services()
    finally:
        patch.undo()


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A stack of this module's own with Prefect's default lease storage (memory), the tiny flow deployed."""
    memory = {"PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.memory"}
    with _own_stack(tmp_path_factory.mktemp("reliability") / "state", **memory) as value:
        yield value




def _client() -> Any:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _run(parameters: dict[str, Any]) -> Any:
    from prefect.deployments import run_deployment

    return run_deployment(name="reliability-outer/holder", parameters=parameters, timeout=0)


def _gpu_usage() -> Any:
    from tasks.reconcile import slot_usage

    with _client() as client:
        return next(u for u in slot_usage(client) if u.name == "tag:gpu")


def _holding_task(flow_run_ids: list[Any]) -> Any:
    """The ``hold-gpu`` task run of these flow runs once it RUNS (holds the slot)."""
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId, TaskRunFilterName

    with _client() as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(
                flow_run_id=TaskRunFilterFlowRunId(any_=flow_run_ids), name=TaskRunFilterName(like_="hold-gpu")
            )
        )
    return next((r for r in runs if r.state is not None and r.state.is_running()), None)


def _tree(root_id: Any) -> list[Any]:
    """The flow run and its subflows (any depth)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    out, todo = [], [root_id]
    with _client() as client:
        while todo:
            current = todo.pop()
            out.append(client.read_flow_run(current))
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[current]))
            )
            todo.extend(c.id for c in children)
    return out


def _final(flow_run_id: Any, timeout: float) -> Any:
    with _client() as client:
        return _wait(
            f"flow run {flow_run_id} final",
            lambda: (r := client.read_flow_run(flow_run_id)).state.is_final() and r,
            timeout,
            poll=2.0,
        )


def _logs(flow_run_id: Any, saying: str, timeout: float = 60.0, at_start: bool = False) -> list[str]:
    """The flow run's log messages that contain ``saying`` (or start with it), once at least one has arrived.

    A flow-run process ships its logs in batches and sends the last ones after it has set the final state,
    so a run can read COMPLETED before its log lines are on the server: poll for them, don't read once.
    """
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    def matching() -> list[str]:
        with _client() as client:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        return [m for m in (log.message for log in logs) if (m.startswith(saying) if at_start else saying in m)]

    return _wait(f"flow run {flow_run_id} logs {saying!r}", matching, timeout, poll=1.0)


def test_filesystem_lease_storage_keeps_the_lease_across_a_restart(tmp_path):
    """Finding 1, the other fix: with leases on disk the restart keeps the lease; Prefect frees it itself."""
    from infra.stack import down, up

    storage = {"PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem"}
    with _own_stack(tmp_path / "state", **storage) as (settings, _urls):
        holder = _run({"seconds": 600})
        held = _wait("the holder task runs", lambda: _holding_task([holder.id]), 180)
        down(settings)
        up(settings, timeout=300.0)
        kept = _gpu_usage()
        assert (kept.active, kept.holders) == (1, (str(held.id),))
        started = time.monotonic()
        _wait("the dead holder's lease expires and the server frees the slot", lambda: _gpu_usage().active == 0, 180)
        freed_after = time.monotonic() - started
        nxt = _final(_run({"seconds": 1, "watch_s": 600}).id, 240)
        assert nxt.state.is_completed(), nxt.state.message
        print(f"\nfilesystem leases: slot freed by Prefect {freed_after:.1f} s after the restart")


def test_stack_restart_mid_task_leaks_the_slot_until_watched_or_reconciled(own):
    """Finding 1: stack down/up while a task holds ``gpu``; the next run still completes, with a message."""
    from infra.stack import down, up
    from tasks.reconcile import reconcile

    settings, urls = own
    holder = _run({"seconds": 600})
    _wait("the holder task runs", lambda: _holding_task([holder.id]), 180)
    assert _gpu_usage().active == 1

    down(settings)
    up(settings, timeout=300.0)
    stale = _gpu_usage()
    assert (stale.active, stale.holders) == (1, ()), "the restart should have lost the lease and kept the count"

    started = time.monotonic()
    waiting = _run({"seconds": 1, "watch_s": 5})
    done = _final(waiting.id, 240)
    waited = time.monotonic() - started
    assert done.state.is_completed(), done.state.message
    messages = _logs(waiting.id, "waits for a 'gpu' slot")  # the waiting run says which slot it waits for
    assert "held by nobody" in messages[0] and "freed" in messages[0], messages[0]
    assert _gpu_usage().active == 0
    print(f"\nrun after restart completed in {waited:.1f} s; message: {messages[0]}")

    report = reconcile(
        prefect_api_url=urls["prefect_api_url"], tracking_uri=urls["mlflow_url"],
        local_work_pool=settings.stack.work_pool,
    )
    assert not report.errors, report.errors
    assert all(not r.state.is_running() for r in _tree(holder.id))
    assert report.automation_id
    assert reconcile(prefect_api_url=urls["prefect_api_url"]).automation_id == report.automation_id


def test_reconcile_frees_a_leaked_slot_at_stack_up(own):
    """Finding 1, at ``stack up``: reconcile gives back the slot the restart leaked; the next run starts at once."""
    from infra.stack import down, up
    from tasks.reconcile import reconcile

    settings, urls = own
    holder = _run({"seconds": 600})
    _wait("the holder task runs", lambda: _holding_task([holder.id]), 180)
    down(settings)
    up(settings, timeout=300.0)
    assert _gpu_usage().orphaned == 1

    report = reconcile(prefect_api_url=urls["prefect_api_url"], local_work_pool=settings.stack.work_pool)
    assert report.freed_slots == {"tag:gpu": 1}, report
    assert str(holder.id) in report.crashed_flow_runs
    started = time.monotonic()
    nxt = _run({"seconds": 1, "watch_s": 600})
    done = _final(nxt.id, 180)
    assert done.state.is_completed(), done.state.message
    print(f"\nrun after reconcile completed in {time.monotonic() - started:.1f} s")
    assert reconcile(prefect_api_url=urls["prefect_api_url"]).freed_slots == {}


def test_kill_9_of_the_flow_run_process_leaves_nothing_running_after_reconcile(own):
    """Finding 3: ``kill -9`` mid-run; reconcile crashes the subflow and task runs, fails MLflow runs and model."""
    import psutil

    from tasks.reconcile import reconcile
    from tasks.tracking import mlflow_client

    settings, urls = own
    root = _run({"seconds": 600, "tracking_uri": urls["mlflow_url"]})
    _wait("the holder task runs", lambda: (t := _tree(root.id)) and _holding_task([r.id for r in t]), 180)
    live = reconcile(
        prefect_api_url=urls["prefect_api_url"], tracking_uri=urls["mlflow_url"],
        local_work_pool=settings.stack.work_pool,
    )
    assert (live.crashed_flow_runs, live.failed_mlflow_runs, live.errors) == ({}, {}, {}), "live runs: leave alone"
    assert all(r.state.is_running() for r in _tree(root.id))
    with _client() as client:
        pid = int(client.read_flow_run(root.id).infrastructure_pid)
    victims = [p for p in psutil.Process(pid).children(recursive=True)] + [psutil.Process(pid)]
    for proc in victims:
        os.kill(proc.pid, signal.SIGKILL)
    psutil.wait_procs(victims, timeout=10)
    time.sleep(3)

    mlflow = mlflow_client(urls["mlflow_url"])
    exp_id = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    tree = _tree(root.id)
    before = [r.name for r in tree if r.state.is_running()]
    assert before, "after kill -9 some flow run should still look RUNNING (the fault)"
    assert mlflow.search_runs([exp_id], "attributes.status = 'RUNNING'")

    report = reconcile(
        prefect_api_url=urls["prefect_api_url"], tracking_uri=urls["mlflow_url"],
        local_work_pool=settings.stack.work_pool,
    )
    assert not report.errors, report.errors
    tree = _tree(root.id)
    assert [r.name for r in tree if not r.state.is_final()] == []
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    with _client() as client:
        in_tree = TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[r.id for r in tree]))
        tasks_ = client.read_task_runs(task_run_filter=in_tree)
    assert tasks_ and all(t.state.is_final() for t in tasks_), [(t.name, t.state.type) for t in tasks_]
    runs = mlflow.search_runs([exp_id])
    assert {r.info.status for r in runs} == {"FAILED"}, [(r.info.run_name, r.info.status) for r in runs]
    models = mlflow.search_logged_models([exp_id])
    assert models and {str(m.status) for m in models} == {"FAILED"}
    started = time.monotonic()
    nxt = _final(_run({"seconds": 1, "watch_s": 600, "reconcile_first": True}).id, 300)
    assert nxt.state.is_completed(), nxt.state.message
    said = _logs(nxt.id, "reconcile: ", at_start=True)
    assert "errors" not in said[0], said
    print(f"\nstuck before reconcile: {before}; reconcile: {report.summary()}; "
          f"next run completed in {time.monotonic() - started:.1f} s")  # fmt: skip


def test_kill_9_of_the_worker_mid_run_then_stack_up_leaves_nothing_stuck(own):
    """Issue 11's proof, the worker: ``kill -9`` of the worker while its flow run holds the ``gpu`` slot.

    ``stack up`` starts a new worker; the orphaned flow-run process finishes on its own (or is crashed by
    ``reconcile`` if it died too); nothing stays RUNNING; the slot is free; the next run completes.
    """
    from infra.stack import read_record, status, up
    from tasks.reconcile import reconcile

    settings, urls = own
    root = _run({"seconds": 20})
    _wait("the holder task runs", lambda: _holding_task([root.id]), 180)
    worker = read_record(settings.stack, "worker")
    os.kill(worker.pid, signal.SIGKILL)
    _wait("the worker is gone", lambda: not any(r.name == "worker" and r.running for r in status(settings)), 30)
    up(settings, timeout=300.0)
    assert read_record(settings.stack, "worker").pid != worker.pid
    report = reconcile(
        prefect_api_url=urls["prefect_api_url"], tracking_uri=urls["mlflow_url"],
        local_work_pool=settings.stack.work_pool,
    )
    assert not report.errors, report.errors
    done = _final(root.id, 300)
    assert all(r.state.is_final() for r in _tree(root.id))
    _wait("the gpu slot is free", lambda: _gpu_usage().active == 0, 120)
    nxt = _final(_run({"seconds": 1, "watch_s": 600, "reconcile_first": True}).id, 300)
    assert nxt.state.is_completed(), nxt.state.message
    print(f"\nworker killed mid-run: the run ended {done.state.type.value}; the next run completed")


def test_a_running_flow_run_without_heartbeat_is_crashed(own):
    """Finding 3, no process to check (another machine): no heartbeat and no state change for long -> CRASHED."""
    from prefect.states import Running

    from tasks.reconcile import reconcile

    _, urls = own
    with _client() as client:
        orphan = client.create_flow_run(outer, state=Running())
    assert reconcile(prefect_api_url=urls["prefect_api_url"], stale_after_s=60).crashed_flow_runs == {}
    time.sleep(4)
    report = reconcile(prefect_api_url=urls["prefect_api_url"], stale_after_s=3)
    assert "no heartbeat" in report.crashed_flow_runs.get(str(orphan.id), ""), report
    with _client() as client:
        state = client.read_flow_run(orphan.id).state
    assert state.is_crashed() and "reconciled" in state.message


def _loop_files(tmp: Path) -> tuple[str, str]:
    import pandas as pd

    record = {
        "loop": 1, "budget": 3, "batches": 2, "end_batches": 2, "top1": 0.5, "test_loss": 1.2, "train_loss": 1.5,
        "mean_pick_loss": 2.0, "seconds": {"train": 0.1}, "train_curve": [[1, 1.6], [2, 1.4]],
        "evals": [{"batches": 2, "top1": 0.5, "loss": 1.2}],
    }  # fmt: skip
    record_path = tmp / "loop-1.json"
    record_path.write_text(json.dumps(record))
    picks = pd.DataFrame(
        {"image_id": ["a", "b", "c"], "label": [0, 1, 2], "class_name": ["0", "1", "2"], "loss": [2.1, 2.0, 1.9],
         "centroid": [0, 1, 2]}
    )  # fmt: skip
    picks_path = tmp / "picks-loop-1.parquet"
    picks.to_parquet(picks_path)
    return str(record_path), str(picks_path)


def test_a_retried_log_loop_reuses_its_nested_run(own, tmp_path):
    """Finding 3: a ``mlflow-log-loop`` that fails after creating its nested run, then retried: one ``loop-1``."""
    from tasks.tracking import log_loop, mlflow_client

    settings, urls = own
    client = mlflow_client(urls["mlflow_url"])
    exp = client.get_experiment_by_name("vecaf-retry")
    exp_id = exp.experiment_id if exp else client.create_experiment("vecaf-retry")
    parent = client.create_run(exp_id, run_name="finetune").info.run_id
    record, picks = _loop_files(tmp_path)
    with pytest.raises(Exception):
        log_loop(urls["mlflow_url"], parent, record, str(tmp_path / "missing.parquet"), bucket=settings.stack.bucket,
                 dataset_name="digits")  # fmt: skip
    first = log_loop(urls["mlflow_url"], parent, record, picks, bucket=settings.stack.bucket, dataset_name="digits")
    again = log_loop(urls["mlflow_url"], parent, record, picks, bucket=settings.stack.bucket, dataset_name="digits")
    nested = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert [r.info.run_id for r in nested] == [first] and again == first
    assert nested[0].info.status == "FINISHED"
    assert len(client.get_metric_history(first, "train_loss")) == 2
    assert len(client.get_metric_history(parent, "loop_top1")) == 1
