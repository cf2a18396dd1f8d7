"""MLflow and S3 faults against the real stack: retries, errors that name the endpoint, nothing half-registered.

- An MLflow server that does not answer: the task retries, then fails naming the tracking URI.
- The S3 store behind MLflow's artifact proxy killed while ``finetune`` logs its model: the upload is retried,
  then fails naming the S3 endpoint (not MLflow), each half-logged model is FAILED, no model version is
  created and the MLflow run ends FAILED.
- A registration whose alias step fails on the server: the version just created is deleted again.
"""

from __future__ import annotations

import pytest

from flows.params import DataParams, RegistryParams, TrainingParams

pytestmark = pytest.mark.integration

DATA = DataParams(dataset="digits", pool_size=500, test_size=200, image_size=32, shard_size=250)
EXPERIMENT = "vecaf-test-faults"


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
def test_unreachable_s3_fails_before_registration(env, monkeypatch, tmp_path, stack_settings):
    """S3 behind MLflow killed while ``finetune`` logs its model: S3 is named, nothing is registered."""
    import os
    import re
    import signal

    from mlflow.entities import LoggedModelStatus

    import flows.finetune as finetune_flow
    from flows.caption import caption
    from flows.featurize import featurize
    from infra.stack import read_record, running_stack, stack_env, stack_urls
    from tasks.tracking import mlflow_client

    caption(data=DATA)
    featurize(data=DATA)
    own = stack_settings(tmp_path / "state")  # S3 + MLflow of its own, so killing S3 spares the session's
    with running_stack(own, only=["mlflow"], timeout=300.0):
        urls = stack_urls(own)
        monkeypatch.setenv("VECAF_STACK__MLFLOW_PORT", str(own.mlflow_port))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", urls["mlflow_url"])  # the client variable wins over the port
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", urls["s3_endpoint_url"])
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", urls["s3_endpoint_url"])
        for key, value in stack_env(own).items():  # run state goes to that S3 too (tasks.storage): its keys
            if key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                monkeypatch.setenv(key, value)
        log_model_task = finetune_flow.log_model_task

        def kill_s3_then_log(*args, **kwargs):
            os.kill(read_record(own, "s3").pid, signal.SIGKILL)
            return log_model_task.with_options(retry_delay_seconds=0)(*args, **kwargs)

        monkeypatch.setattr(finetune_flow, "log_model_task", kill_s3_then_log)
        registry = RegistryParams(experiment=EXPERIMENT, model_name="vecaf-test-unregistered")
        training = TrainingParams(method="random", cea=False, ratio=0.02, loops=1, batch_budget=4, batch_size=8)
        state = finetune_flow.finetune(data=DATA, training=training, registry=registry, return_state=True)
        assert state.is_failed()
        s3 = re.escape(urls["s3_endpoint_url"])
        with pytest.raises(ConnectionError, match=rf"S3 endpoint {s3} \(behind MLflow's artifact proxy"):
            state.result()
        names = {t.name.rsplit("-", 1)[0]: t for t in _task_runs(state.state_details.flow_run_id)}
        assert names["mlflow-log-model"].state.is_failed() and names["mlflow-log-model"].run_count == 3
        assert "verify-model-artifacts" not in names and "register-model" not in names

        client = mlflow_client(urls["mlflow_url"])
        experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
        [run] = client.search_runs(
            [experiment_id], filter_string=f"tags.prefect_flow_run_id = '{state.state_details.flow_run_id}'"
        )
        assert run.info.status == "FAILED"
        assert client.search_model_versions(f"run_id = '{run.info.run_id}'") == []
        models = client.search_logged_models([experiment_id])
        assert [m.status for m in models] == [LoggedModelStatus.FAILED] * 3  # one per try, none left PENDING


def test_registration_is_all_or_nothing(env, tmp_path):
    from mlflow.exceptions import MlflowException

    from tasks.registry import register_model
    from tasks.tracking import log_model, mlflow_client

    client = mlflow_client(env.mlflow_url)
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
    run = client.create_run(exp_id, run_name="tiny")
    from vecaf.models import load_pvm
    from vecaf.models.classifier import classifier_config, save_classifier

    pvm = load_pvm("test_efficientnet", pretrained=False, num_classes=2)
    save_classifier(pvm.model, classifier_config(pvm, pvm.model, class_names=["a", "b"], mode="head"), tmp_path / "m")
    logged = log_model(
        env.mlflow_url, run.info.run_id, str(tmp_path / "m"), metadata={"note": "tiny"}, final_metrics={}
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
