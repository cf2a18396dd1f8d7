"""Artifact faults on a stack of its own (S3 + MLflow): the error names the part that failed; nothing half-logged.

- S3 killed (``kill -9`` of the rclone server), MLflow healthy: logging a model and listing a model's files
  fail with an error naming the S3 endpoint behind MLflow's artifact proxy, not the MLflow server; the
  logged model whose upload broke is FAILED, never left PENDING.
- MLflow killed too: the same calls now name the MLflow tracking server.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def tiny_model(tmp_path):
    """A small timm classifier (random weights, 3 classes) saved as config + safetensors."""
    from vecaf.models import load_pvm
    from vecaf.models.classifier import classifier_config, save_classifier

    pvm = load_pvm("test_efficientnet", pretrained=False, num_classes=3)
    config = classifier_config(pvm, pvm.model, class_names=["a", "b", "c"], mode="head", image_size=32)
    save_classifier(pvm.model, config, tmp_path / "model")
    return str(tmp_path / "model")


def _wait_dead(pid: int, timeout: float = 10.0) -> None:
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} still runs after SIGKILL")


def test_s3_down_behind_mlflow_is_named_and_the_half_logged_model_fails(
    tmp_path, stack_settings, monkeypatch, tiny_model
):
    from mlflow.entities import LoggedModelStatus

    from infra.stack import read_record, running_stack, stack_env, stack_urls
    from tasks.tracking import EndpointUnreachableError, log_model, mlflow_client, verify_model_artifacts

    settings = stack_settings(tmp_path / "state")
    with running_stack(settings, only=["mlflow"], timeout=300.0):
        for key, value in stack_env(settings).items():
            monkeypatch.setenv(key, value)
        urls = stack_urls(settings)
        mlflow_url, s3_url = urls["mlflow_url"], urls["s3_endpoint_url"]
        client = mlflow_client(mlflow_url)
        experiment_id = client.create_experiment("faults")
        run_id = client.create_run(experiment_id, run_name="s3-down").info.run_id
        stored = log_model(mlflow_url, run_id, tiny_model, metadata={"note": "before"}, final_metrics={})
        assert verify_model_artifacts(mlflow_url, stored["model_id"])["files"] == [
            "MLmodel", "config.json", "model.safetensors",
        ]  # fmt: skip

        s3_pid = read_record(settings, "s3").pid
        os.kill(s3_pid, signal.SIGKILL)
        _wait_dead(s3_pid)
        s3_named = rf"S3 endpoint {re.escape(s3_url)} \(behind MLflow's artifact proxy at {re.escape(mlflow_url)}\)"
        with pytest.raises(EndpointUnreachableError, match=s3_named) as upload:
            log_model(mlflow_url, run_id, tiny_model, metadata={"note": "during"}, final_metrics={})
        assert "MLflow tracking server" not in str(upload.value)
        with pytest.raises(EndpointUnreachableError, match=s3_named):
            verify_model_artifacts(mlflow_url, stored["model_id"])

        statuses = {m.model_id: m.status for m in client.search_logged_models([experiment_id])}
        assert statuses.pop(stored["model_id"]) == LoggedModelStatus.READY
        assert list(statuses.values()) == [LoggedModelStatus.FAILED]  # the half-logged one, not PENDING

        mlflow_pid = read_record(settings, "mlflow").pid
        os.killpg(mlflow_pid, signal.SIGKILL)  # the server and its workers
        _wait_dead(mlflow_pid)
        with pytest.raises(EndpointUnreachableError, match=rf"MLflow tracking server at {re.escape(mlflow_url)}"):
            verify_model_artifacts(mlflow_url, stored["model_id"])
