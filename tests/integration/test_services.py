"""The services of the pipeline outside the local stack's defaults, with real servers on this machine.

- Prefect and MLflow of the local stack on PostgreSQL (127.0.0.1:5432, user postgres): two databases the
  test creates with random names and drops after; the rows of a flow run, an MLflow run and a registered
  model are read back from PostgreSQL itself.
- External servers: the test starts ``prefect server start`` (with its own basic-auth string) and
  ``mlflow server`` itself, in homes of their own; ``stack.up`` then starts only S3 and the worker, the worker
  registers with the external Prefect, ``stack.status`` reports each service as external or started here,
  the digits pipeline deployed on the external Prefect completes and logs to the external MLflow, and
  ``stack.down`` leaves the external servers running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from infra.stack import down, prefect_request, running_stack, services_of, stack_env, status, up, worker_name
from infra.stack_cli import stack_app
from stack_fixtures import drain_prefect_services, make_stack_settings, pick_free_port
from vecaf.settings import ServiceSettings, Settings, StackSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PG = "postgres@127.0.0.1:5432"


def _pg_admin():
    import psycopg

    try:
        return psycopg.connect(f"postgresql://{PG}/postgres", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not reachable at {PG}: {exc}")


@pytest.fixture
def pg_databases() -> Iterator[tuple[str, str]]:
    """Two fresh PostgreSQL databases (random names), dropped after the test."""
    names = (f"vecaf_prefect_{uuid.uuid4().hex[:10]}", f"vecaf_mlflow_{uuid.uuid4().hex[:10]}")
    with _pg_admin() as admin:
        for name in names:
            admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield names
    finally:
        with _pg_admin() as admin:
            for name in names:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _rows(database: str, query: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(f"postgresql://{PG}/{database}", connect_timeout=5) as conn:
        return conn.execute(query).fetchall()


def test_prefect_and_mlflow_of_the_stack_run_on_postgresql(
    tmp_path: Path, stack_settings: Callable[..., StackSettings], pg_databases: tuple[str, str]
) -> None:
    from flows.runtime import prefect_client_settings
    from tasks.tracking import mlflow_client

    prefect_db, mlflow_db = pg_databases
    settings = Settings(
        stack=stack_settings(
            tmp_path / "state",
            prefect_database_url=SecretStr(f"postgresql+asyncpg://{PG}/{prefect_db}"),
            mlflow_backend_store_uri=SecretStr(f"postgresql://{PG}/{mlflow_db}"),
        ),
        services=ServiceSettings(),
    )
    flow_name = f"pg-proof-{uuid.uuid4().hex[:6]}"
    model_name = f"pg-proof-model-{uuid.uuid4().hex[:6]}"
    with running_stack(settings, only=["mlflow", "prefect"], timeout=300.0) as rows:
        assert {row.name for row in rows} == {"s3", "mlflow", "prefect"}
        with prefect_client_settings(settings):
            from prefect import flow

            @flow(name=flow_name)
            def pg_proof() -> int:
                return 7

            assert pg_proof() == 7
        client = mlflow_client(services_of(settings).mlflow_tracking_uri)
        experiment_id = client.create_experiment(f"pg-proof-{uuid.uuid4().hex[:6]}")
        run = client.create_run(experiment_id)
        client.log_metric(run.info.run_id, "proof", 0.5)
        client.set_terminated(run.info.run_id)
        client.create_registered_model(model_name)
        client.create_model_version(model_name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)

        flow_runs = _rows(
            prefect_db,
            "SELECT fr.state_type FROM flow_run fr JOIN flow f ON f.id = fr.flow_id "
            f"WHERE f.name = '{flow_name}'",
        )
        assert [str(r[0]).split(".")[-1] for r in flow_runs] == ["COMPLETED"]
        assert _rows(mlflow_db, f"SELECT status FROM runs WHERE run_uuid = '{run.info.run_id}'") == [("FINISHED",)]
        assert _rows(mlflow_db, f"SELECT value FROM metrics WHERE run_uuid = '{run.info.run_id}'") == [(0.5,)]
        assert _rows(mlflow_db, f"SELECT version FROM model_versions WHERE name = '{model_name}'") == [(1,)]
    state = tmp_path / "state"
    assert not (state / "prefect" / "prefect.db").exists() and not (state / "mlflow" / "mlflow.db").exists()


def _http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def _server(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """A server this test starts itself (not through the stack), stopped after."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True
        )
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not _http_ok(url):
        assert proc.poll() is None, f"{url} exited: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"{url} not healthy in {timeout} s: {log.read_text()[-2000:]}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def external(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """Prefect (with its own auth string) and MLflow started by the test itself, and settings naming them.

    The stack's S3 (started by ``up`` in the tests) holds MLflow's artifacts; the fixture stops the stack's
    servers and then its own at the end.
    """
    tmp = tmp_path_factory.mktemp("external")
    stack = make_stack_settings(tmp / "state")
    prefect_port, mlflow_port = pick_free_port(), pick_free_port()
    auth = f"external:{uuid.uuid4().hex}"
    py = sys.executable
    for home in ("ext-prefect", "ext-mlflow"):
        (tmp / home).mkdir()
    prefect_api = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
    prefect_argv = [py, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
    prefect_env = {
        "PREFECT_HOME": str(tmp / "ext-prefect"),
        "PREFECT_SERVER_API_AUTH_STRING": auth,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": prefect_api,
    }
    mlflow_argv = [
        py, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp / 'ext-mlflow' / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{stack.bucket}/mlflow", "--host", "127.0.0.1", "--port", str(mlflow_port),
        "--workers", "1",
    ]  # fmt: skip
    mlflow_env = {
        "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{stack.s3_port}",
        "AWS_ACCESS_KEY_ID": stack.s3_access_key,
        "AWS_SECRET_ACCESS_KEY": stack.s3_secret_key.get_secret_value(),
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    with (
        _server(prefect_argv, prefect_env, tmp / "ext-prefect.log") as prefect_proc,
        _server(mlflow_argv, mlflow_env, tmp / "ext-mlflow.log") as mlflow_proc,
    ):
        _wait_healthy(f"{prefect_api}/health", prefect_proc, tmp / "ext-prefect.log")
        _wait_healthy(f"{mlflow_uri}/health", mlflow_proc, tmp / "ext-mlflow.log")
        settings = Settings(
            stack=stack,
            services=ServiceSettings(
                prefect_api_url=prefect_api, prefect_api_auth_string=SecretStr(auth), mlflow_tracking_uri=mlflow_uri
            ),
        )
        try:
            yield SimpleNamespace(
                settings=settings, stack=stack, tmp=tmp, prefect_api=prefect_api, mlflow_uri=mlflow_uri,
                prefect_proc=prefect_proc, mlflow_proc=mlflow_proc,
            )  # fmt: skip
        finally:
            down(settings)


def test_stack_starts_only_what_the_external_servers_do_not_provide(external: SimpleNamespace) -> None:
    settings, stack = external.settings, external.stack
    services = services_of(settings)
    assert (services.prefect_external, services.mlflow_external, services.s3_external) == (True, True, False)
    rows = {row.name: row for row in up(settings, timeout=300.0)}
    assert {name: row.where for name, row in rows.items()} == {
        "s3": "started here", "worker": "started here", "prefect": "external", "mlflow": "external",
    }  # fmt: skip
    assert all(row.healthy for row in rows.values()), rows
    assert not (external.tmp / "state" / "pids" / "prefect.json").exists()
    assert not (external.tmp / "state" / "pids" / "mlflow.json").exists()

    pool = urllib.parse.quote(stack.work_pool)
    code, workers = prefect_request(services, f"/work_pools/{pool}/workers/filter", method="POST", body={})
    assert code == 200 and worker_name(stack) in [w["name"] for w in workers]

    report = {row.name: row for row in status(settings)}
    assert [row.where for row in report.values()] == ["started here", "external", "external", "started here"]
    assert all(row.healthy for row in report.values()), report
    assert report["prefect"].url == external.prefect_api and report["mlflow"].url == external.mlflow_uri

    result = CliRunner().invoke(stack_app, ["status"], env=stack_env(settings, with_settings=True))
    assert result.exit_code == 0, result.output
    assert result.output.count("external, answers") == 2 and result.output.count("started here") == 2
    assert external.prefect_api in result.output and external.mlflow_uri in result.output

    wrong = settings.model_copy(
        update={"services": settings.services.model_copy(update={"prefect_api_auth_string": SecretStr("x:y")})}
    )
    assert not {row.name: row for row in status(wrong)}["prefect"].healthy


def test_pipeline_completes_against_the_external_servers(external: SimpleNamespace) -> None:
    """The digits pipeline, deployed on the external Prefect and run by the stack's worker, logs to the external MLflow."""
    from flows.deploy import PIPELINE_DEPLOYMENT, deploy, trigger
    from flows.params import DataParams, PipelineParams, RegistryParams, TrainingParams
    from tasks.tracking import mlflow_client
    from vecaf.settings import load_settings

    settings = external.settings
    up(settings, timeout=300.0)
    params = PipelineParams(
        data=DataParams(dataset="digits", pool_size=300, test_size=120, image_size=32, shard_size=300),
        training=TrainingParams(ratio=0.05, loops=1, batch_budget=8, batch_size=16, lr=0.05),
        registry=RegistryParams(experiment="vecaf-external", model_name="vecaf-external-digits"),
    ).flow_parameters()
    patch = pytest.MonkeyPatch()
    try:
        for key, value in stack_env(settings, with_settings=True).items():
            patch.setenv(key, value)
        loaded = load_settings()
        assert services_of(loaded).prefect_api_url == external.prefect_api
        deploy(loaded, pipeline_parameters=params)
        run = trigger(loaded, f"vecaf-pipeline/{PIPELINE_DEPLOYMENT}", params, wait=True, timeout=1500, poll_s=3.0)
        assert run.state.is_completed(), run.state.message
        client = mlflow_client(external.mlflow_uri)
        versions = client.search_model_versions("name = 'vecaf-external-digits'")
        assert versions and versions[0].run_id
        finished = client.get_run(versions[0].run_id)
        assert finished.info.status == "FINISHED"
        assert finished.data.tags.get("prefect_pipeline_run_id") == str(run.id)
        drain_prefect_services()
    finally:
        patch.undo()


def test_down_leaves_the_external_servers_running(external: SimpleNamespace) -> None:
    up(external.settings, timeout=300.0)
    assert set(down(external.settings)) == {"worker", "s3"}
    assert external.prefect_proc.poll() is None and external.mlflow_proc.poll() is None
    assert _http_ok(f"{external.prefect_api}/health") and _http_ok(f"{external.mlflow_uri}/health")


