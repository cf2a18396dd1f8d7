"""MLflow and S3 faults against the real stack: retries, errors that name the endpoint, nothing half-registered.

- An MLflow server that does not answer: the task retries, then fails naming the tracking URI.
- An S3 endpoint that does not answer during ``finetune``: the model is logged (the tracking server proxies
  its artifacts), the boto3 check of the bucket retries and fails naming the endpoint, no model version
  is created and the MLflow run ends FAILED.
- A registration whose alias step fails on the server: the version just created is deleted again.
"""

from __future__ import annotations

import pytest

from flows.params import DataParams, RegistryParams, TrainingParams

pytestmark = pytest.mark.integration

DATA = DataParams(dataset="digits", pool_size=500, test_size=200, image_size=32, shard_size=250)
EXPERIMENT = "vecaf-test-faults"


def _drain_prefect_services() -> None:
    """Send this process's queued Prefect logs and events while the stack still answers (not at exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)


@pytest.fixture
def env(stack, monkeypatch):
    """This process's Prefect client and ``load_settings()`` pointed at the session stack."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    for key, value in stack.env.items():
        monkeypatch.setenv(key, value)
    with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api_url}):
        yield stack
        _drain_prefect_services()


def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_unreachable_mlflow_is_retried_then_named(env, free_port, tmp_path):
    from prefect import flow

    from tasks.tracking import start_run_task

    url = f"http://127.0.0.1:{free_port()}"
    manifest = str(tmp_path / "unused.parquet")

    @flow(name="test-unreachable-mlflow")
    def track() -> None:
        start_run_task.with_options(retry_delay_seconds=0)(
            url, EXPERIMENT, "never", {}, {}, {}, manifest, manifest
        )

    state = track(return_state=True)
    assert state.is_failed()
    with pytest.raises(ConnectionError, match=rf"MLflow tracking server at {url} is unreachable"):
        state.result()
    [run] = _task_runs(state.state_details.flow_run_id)
    assert run.name.startswith("mlflow-start-run") and run.run_count == 3  # the first try and 2 retries


@pytest.mark.slow
def test_unreachable_s3_fails_before_registration(env, monkeypatch, free_port):
    from flows.caption import caption
    from flows.featurize import featurize
    from flows.finetune import finetune
    from tasks.tracking import mlflow_client

    caption(data=DATA)
    featurize(data=DATA)
    s3_port = free_port()
    monkeypatch.setenv("VECAF_STACK__S3_PORT", str(s3_port))
    registry = RegistryParams(experiment=EXPERIMENT, model_name="vecaf-test-unregistered")
    training = TrainingParams(method="random", cea=False, ratio=0.02, loops=1, batch_budget=4, batch_size=8)
    state = finetune(data=DATA, training=training, registry=registry, return_state=True)
    assert state.is_failed()
    with pytest.raises(ConnectionError, match=rf"S3 endpoint at http://127\.0\.0\.1:{s3_port} is unreachable"):
        state.result()
    names = {t.name.rsplit("-", 1)[0]: t for t in _task_runs(state.state_details.flow_run_id)}
    assert names["mlflow-log-model"].state.is_completed()
    assert names["verify-model-artifacts"].state.is_failed() and names["verify-model-artifacts"].run_count == 3
    assert "register-model" not in names

    client = mlflow_client(env.mlflow_url)
    [run] = client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id],
        filter_string=f"tags.prefect_flow_run_id = '{state.state_details.flow_run_id}'",
    )
    assert run.info.status == "FAILED"
    assert client.search_model_versions(f"run_id = '{run.info.run_id}'") == []


def test_registration_is_all_or_nothing(env, tmp_path):
    import torch
    from mlflow.exceptions import MlflowException

    from tasks.registry import register_model
    from tasks.tracking import log_model, mlflow_client

    client = mlflow_client(env.mlflow_url)
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
    run = client.create_run(exp_id, run_name="tiny")
    path = tmp_path / "tiny.pt"
    torch.save(torch.nn.Linear(4, 2), path)
    logged = log_model(
        env.mlflow_url, run.info.run_id, str(path), metadata={"note": "tiny"}, input_shape=(4,), final_metrics={}
    )
    with pytest.raises(MlflowException, match="alias"):
        # "v1" is reserved for version numbers: the server refuses the alias after the version exists.
        register_model(
            env.mlflow_url, "vecaf-test-rollback", model_uri=logged["model_uri"], model_id=logged["model_id"],
            run_id=run.info.run_id, tags={}, alias="v1",
        )  # fmt: skip
    assert client.search_model_versions("name = 'vecaf-test-rollback'") == []
    ok = register_model(
        env.mlflow_url, "vecaf-test-rollback", model_uri=logged["model_uri"], model_id=logged["model_id"],
        run_id=run.info.run_id, tags={"k": "v"},
    )  # fmt: skip
    version = client.get_model_version_by_alias("vecaf-test-rollback", "challenger")
    assert version.version == ok["version"] and version.tags["k"] == "v"
