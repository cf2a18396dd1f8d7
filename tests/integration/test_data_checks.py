"""Data checks before training, parameter refusals before a run exists, and failures the CLI explains.

Against the session stack (Prefect server + worker, MLflow, S3, Feast):

- Finding 7: an ImageFolder without ``train``/``test`` folders. The held-out split is carved out by content
  hash: no held-out image is in the pool (by content), and MLflow's manifests say so.
- Finding 8: ``pool_size=100000`` on a folder of a few dozen images: MLflow records the size used
  (``data.pool_size_used``) and the run log warns. A class whose images are all corrupt: the finetune flow
  fails naming the class, and no MLflow run or model version exists. An unknown top-level parameter and a
  10,000-character ``ood_prompt`` sent to the deployments are refused by the Prefect server: no flow run
  is created.
- Finding 9: ``vecaf run`` of a pipeline that fails prints the failing subflow and task with their error;
  a failed run's ERROR lines that reach the server after its final state are still printed.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from stack_fixtures import drain_prefect_services

from flows.params import DataParams, RegistryParams, TrainingParams

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLASSES = ("circle", "square", "stripes")


@pytest.fixture(scope="module")
def deployed(env):
    """The pipeline and promote deployments on the stack's work pool (schedule paused)."""
    from flows.deploy import deploy
    from vecaf.settings import load_settings

    settings = load_settings()
    ids = deploy(settings, flows=("vecaf-pipeline", "promote"), paused=True)
    return settings, ids


def _folder(root: Path, per_class: int, *, corrupt_class: str | None = None) -> Path:
    """``root/<class>/<i>.png`` with no split folders; every image of ``corrupt_class`` truncated."""
    from PIL import Image

    rng = np.random.default_rng(7)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            pixels[:, :, c] = 255
            path = root / name / f"{i}.png"
            Image.fromarray(pixels).save(path)
            if name == corrupt_class:
                path.write_bytes(path.read_bytes()[:40])
    return root


def _flow_runs(deployment_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def _run_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    drain_prefect_services()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def test_a_folder_without_splits_trains_on_a_pool_disjoint_from_its_held_out_split(env, tmp_path):
    from flows.featurize import featurize
    from flows.finetune import finetune
    from tasks.data import read_manifest
    from tasks.tracking import mlflow_client

    root = _folder(tmp_path / "pool", 8)
    data = DataParams(dataset="imagefolder", root=str(root), pool_size=100_000, test_size=None, image_size=32,
                      shard_size=16)  # fmt: skip
    featurize(data=data, text=False)
    training = TrainingParams(method="random", ratio=0.2, loops=1, batch_budget=2, batch_size=4, cea=False)
    registry = RegistryParams(experiment="vecaf-test-data-checks", model_name="vecaf-test-data-checks", promote=False)
    state = finetune(data=data, training=training, registry=registry, return_state=True)
    assert state.is_completed(), state.message
    tuned = state.result()

    client = mlflow_client(env.mlflow_url)
    run = client.get_run(tuned["run_id"])
    resolved = Path(client.download_artifacts(tuned["run_id"], "config/resolved.yaml", str(tmp_path)))
    import yaml

    refs = yaml.safe_load(resolved.read_text())
    pool, test = read_manifest(refs["pool"]["manifest"]), read_manifest(refs["test"]["manifest"])
    pool_hashes, test_hashes = set(pool["content_hash"].to_pylist()), set(test["content_hash"].to_pylist())
    assert pool.num_rows + test.num_rows == 3 * 8 and test.num_rows > 0
    assert not pool_hashes & test_hashes
    assert set(pool["label"].to_pylist()) == set(test["label"].to_pylist()) == {0, 1, 2}

    # Finding 8: the pool size actually used is recorded, and the run log says less than asked was used.
    assert run.data.params["data.pool_size"] == "100000"
    assert run.data.params["data.pool_size_used"] == str(pool.num_rows)
    assert run.data.tags["pool_size_used"] == str(pool.num_rows)
    assert any(
        f"data.pool_size=100000 asked, but the pool holds only {pool.num_rows} images" in m
        for m in _run_logs(state.state_details.flow_run_id)
    )


def test_a_class_whose_images_are_all_corrupt_stops_before_training(env, tmp_path):
    from flows.finetune import finetune
    from tasks.tracking import mlflow_client

    root = _folder(tmp_path / "pool", 5, corrupt_class="stripes")
    data = DataParams(dataset="imagefolder", root=str(root), pool_size=None, test_size=None, image_size=32)
    experiment, model = "vecaf-test-corrupt-class", "vecaf-test-corrupt-class"
    training = TrainingParams(method="random", ratio=0.2, loops=1, batch_budget=2, batch_size=4, cea=False)
    state = finetune(
        data=data, training=training, registry=RegistryParams(experiment=experiment, model_name=model),
        return_state=True,
    )  # fmt: skip
    assert state.is_failed()
    assert "have no image in the pool" in state.message and "['stripes']" in state.message
    assert "after 5 corrupt image(s) were skipped" in state.message
    client = mlflow_client(env.mlflow_url)
    found = client.get_experiment_by_name(experiment)
    assert found is None or client.search_runs([found.experiment_id]) == []
    assert client.search_model_versions(f"name = '{model}'") == []


@pytest.mark.parametrize(
    "flow_name, parameters, reason",
    [
        ("vecaf-pipeline", {"bogus": 1}, "'bogus' was unexpected"),
        ("vecaf-pipeline", {"ood_prompt": "x" * 10_000}, "is too long"),
        ("vecaf-pipeline", {"data": {"dataset": "digits", "bogus": 1}}, "'bogus' was unexpected"),
        ("promote", {"bogus": 1}, "'bogus' was unexpected"),
        ("promote", {"device": "c" * 5000}, "device"),
    ],
)
def test_unknown_parameters_and_oversized_strings_are_refused_before_a_run_exists(
    deployed, flow_name, parameters, reason
):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    from flows.deploy import trigger

    settings, ids = deployed
    matches = {k: v for k, v in ids.items() if k.startswith(f"{flow_name}/")}  # the pipeline has two deployments
    name = f"{flow_name}/production" if f"{flow_name}/production" in matches else next(iter(matches))
    dep_id = matches[name]
    before = len(_flow_runs(dep_id))
    with get_client(sync_client=True) as client:  # the raw API, as any caller would send it
        with pytest.raises(PrefectHTTPStatusError) as refused:
            client.create_flow_run_from_deployment(dep_id, parameters=parameters)
    assert refused.value.response.status_code == 409
    assert reason in refused.value.response.text
    with pytest.raises(ValueError, match="Prefect refused a run"):
        trigger(settings, name, parameters)
    assert len(_flow_runs(dep_id)) == before


def test_vecaf_run_says_which_subflow_and_task_failed_and_why(deployed, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from infra.cli import app

    missing = tmp_path / "no-such-folder"
    params = {
        "data": {"dataset": "imagefolder", "root": str(missing), "pool_size": None, "test_size": None},
        "training": {"cea": False, "method": "random", "ratio": 0.2, "loops": 1, "batch_budget": 2},
        "registry": {"promote": False, "experiment": "vecaf-test-cli", "model_name": "vecaf-test-cli"},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, ["run", "--params", str(path)])
    assert result.exit_code == 1, result.output
    out = result.output
    assert "Traceback" not in out
    lines = out.splitlines()
    assert any(ln.startswith("flow vecaf-pipeline ") and "Failed" in ln for ln in lines), out
    assert any(ln.strip().startswith("subflow featurize ") and "Failed" in ln for ln in lines), out
    task_lines = [ln for ln in lines if ln.strip().startswith("task load-dataset")]
    assert task_lines and f"image folder {missing} does not exist" in task_lines[0], out


def test_a_failed_runs_error_lines_that_arrive_after_its_end_are_still_reported(env):
    """A flow-run process sends its last log lines at exit, after its final state: ``describe_failure`` waits.

    A FAILED run with no failed child gets its ERROR line 2 s after it ended (as a process shipping its last
    batch would); the report holds it. Read once, as before, it held only the state line.
    """
    import contextvars
    import threading
    from datetime import datetime, timezone

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import LogCreate
    from prefect.states import Failed

    from infra.cli import describe_failure

    @flow(name="late-logs")
    def late_logs() -> None:
        """Only its name is used: the run is made through the API."""

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(late_logs, state=Failed(message="Flow run encountered an exception"))
        quiet = client.create_flow_run(late_logs, state=Failed(message="Flow run process exited"))

    def late_line() -> None:
        time.sleep(2.0)
        with get_client(sync_client=True) as client:
            client.create_logs([LogCreate(
                name="prefect.flow_runs", level=40, message="Traceback ...\nValueError: the late line",
                timestamp=datetime.now(timezone.utc), flow_run_id=run.id,
            )])  # fmt: skip

    sender = threading.Thread(target=contextvars.copy_context().run, args=(late_line,))  # this stack's API
    sender.start()
    try:
        lines = describe_failure(run.id, log_wait_s=30.0)
    finally:
        sender.join()
    assert lines == [
        f"flow late-logs {run.name!r}: Failed: Flow run encountered an exception",
        "  log: ValueError: the late line",
    ], lines
    # A run whose error lines never come: the state line alone, once the wait is over.
    quiet_lines = describe_failure(quiet.id, log_wait_s=1.0)
    assert quiet_lines == [f"flow late-logs {quiet.name!r}: Failed: Flow run process exited"], quiet_lines
