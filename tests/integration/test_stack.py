"""The local stack (infra/stack.py, `vecaf stack ...`) against real servers on free ports.

The full stack is started once for the session (the ``stack`` fixture, 30-50 s on 2 cores; the tests using it
are also marked ``slow``); the fault tests use stacks of their own in temporary state dirs (only S3, which
starts in about a second, where a server is needed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from infra.stack import (
    SERVICES,
    ServerSpec,
    StackError,
    check_services,
    down,
    local_services,
    prefect_request,
    read_record,
    start_server,
    s3_client,
    services_of,
    stack_env,
    status,
    up,
    worker_name,
)
from infra.stack_cli import stack_app
from vecaf.settings import ServiceSettings, Settings, StackSettings

Factory = Callable[..., StackSettings]

pytestmark = pytest.mark.integration


def _get(url: str) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        return response.status, response.read()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _settings_env(settings) -> dict[str, str]:
    return {k: v for k, v in stack_env(settings, with_settings=True).items() if k.startswith("VECAF_STACK__")}


@contextmanager
def _foreign_listener(port: int) -> Iterator[subprocess.Popen]:
    """A process the project did not start, listening on ``port``."""
    code = (
        "import socket, sys, time\n"
        "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
        "print('listening', flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _accepts(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        return True


# --- settings and bad input: refused before anything starts ------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"prefect_port": 24567, "mlflow_port": 24567}, "ports must differ"),
        ({"s3_access_key": "ab"}, "at least 3 characters"),
        ({"s3_access_key": "key,with,comma"}, "must not contain a comma"),
        ({"s3_secret_key": SecretStr("")}, "s3_secret_key must not be empty"),
        ({"bucket": "Not_A_Bucket"}, "not a valid S3 bucket name"),
        ({"bucket": "ab"}, "not a valid S3 bucket name"),
        ({"work_pool": "  "}, "work_pool must not be empty"),
    ],
)
def test_invalid_settings_are_refused_before_anything_starts(
    tmp_path: Path, stack_settings: Factory, overrides: dict, match: str
) -> None:
    settings = stack_settings(tmp_path / "state", **overrides)
    with pytest.raises(ValueError, match=match):
        up(settings)
    assert not (tmp_path / "state").exists()


def test_unknown_server_name_is_refused(tmp_path: Path, stack_settings: Factory) -> None:
    with pytest.raises(ValueError, match=r"unknown server\(s\) \['redis'\]"):
        up(stack_settings(tmp_path / "state"), only=["redis"])


def test_stack_env_points_clients_at_the_configured_ports(tmp_path: Path, stack_settings: Factory) -> None:
    settings = stack_settings(tmp_path / "state", prefect_port=21001, mlflow_port=21002, s3_port=21003)
    env = stack_env(settings)
    assert env == {
        "PREFECT_API_URL": "http://127.0.0.1:21001/api",
        "PREFECT_API_AUTH_STRING": settings.prefect_auth_string.get_secret_value(),
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:21002",
        "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:21003",
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:21003",
        "AWS_ACCESS_KEY_ID": "vecaf-test",
        "AWS_SECRET_ACCESS_KEY": settings.s3_secret_key.get_secret_value(),
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    full = stack_env(settings, with_settings=True)
    assert full["VECAF_STACK__STATE_DIR"] == str((tmp_path / "state").resolve())
    assert full["VECAF_STACK__MLFLOW_PORT"] == "21002"


# --- the running stack (session fixture) ---------------------------------------------------------------


@pytest.mark.slow
def test_each_server_answers_its_health_check(stack) -> None:
    code, body = _get(f"{stack.prefect_api_url}/health")
    assert (code, json.loads(body)) == (200, True)
    code, body = _get(f"{stack.mlflow_url}/health")
    assert (code, body) == (200, b"OK")
    buckets = [b["Name"] for b in stack.s3_client().list_buckets()["Buckets"]]
    assert stack.bucket in buckets
    rows = status(stack.settings)
    assert [r.name for r in rows] == list(SERVICES)
    assert all(r.running and r.healthy for r in rows), rows
    assert [r.pid for r in rows] == [read_record(stack.settings, name).pid for name in SERVICES]


@pytest.mark.slow
def test_state_and_logs_live_under_the_state_dir(stack) -> None:
    for name in SERVICES:
        record = read_record(stack.settings, name)
        assert Path(record.log) == stack.state_dir.resolve() / "logs" / f"{name}.log"
        assert Path(record.log).stat().st_size > 0
        assert record.ready_s is not None and record.ready_s > 0
    assert (stack.state_dir / "mlflow" / "mlflow.db").is_file()
    assert (stack.state_dir / "prefect" / "prefect.db").is_file()
    assert (stack.state_dir / "s3" / stack.bucket).is_dir()


@pytest.mark.slow
def test_object_put_through_s3_is_read_back_and_is_a_file_on_disk(stack) -> None:
    client = stack.s3_client()
    key = f"tests/{uuid.uuid4().hex}/blob.bin"
    payload = os.urandom(3000) + b"end"
    client.put_object(Bucket=stack.bucket, Key=key, Body=payload)
    assert client.get_object(Bucket=stack.bucket, Key=key)["Body"].read() == payload
    assert (stack.state_dir / "s3" / stack.bucket / key).read_bytes() == payload


@pytest.mark.slow
def test_wrong_s3_secret_is_refused(stack) -> None:
    from botocore.exceptions import ClientError

    wrong = stack.settings.model_copy(update={"s3_secret_key": SecretStr("not-the-secret")})
    with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
        s3_client(wrong).list_buckets()


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_mlflow_artifact_is_proxied_into_the_bucket(stack) -> None:
    """The REST calls the MLflow client makes (create a run, PUT an artifact): HTTP only, no S3 keys."""
    api = f"{stack.mlflow_url}/api/2.0/mlflow"
    experiment_id = _post(f"{api}/experiments/create", {"name": f"stack-test-{uuid.uuid4().hex[:8]}"})[
        "experiment_id"
    ]
    run = _post(f"{api}/runs/create", {"experiment_id": experiment_id})["run"]["info"]
    assert run["artifact_uri"] == f"mlflow-artifacts:/{experiment_id}/{run['run_id']}/artifacts"

    payload = f"artifact of run {run['run_id']}".encode()
    artifact = f"{experiment_id}/{run['run_id']}/artifacts/proof/note.txt"
    request = urllib.request.Request(
        f"{stack.mlflow_url}/api/2.0/mlflow-artifacts/artifacts/{artifact}", data=payload, method="PUT"
    )
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30) as response:
        assert response.status == 200
    assert _get(f"{stack.mlflow_url}/api/2.0/mlflow-artifacts/artifacts/{artifact}") == (200, payload)

    s3 = stack.s3_client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=stack.bucket, Prefix="mlflow/")["Contents"]]
    assert f"mlflow/{artifact}" in keys
    assert s3.get_object(Bucket=stack.bucket, Key=f"mlflow/{artifact}")["Body"].read() == payload


@pytest.mark.slow
def test_process_work_pool_exists_hardened_and_the_worker_polls_it(stack) -> None:
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(stack.prefect_api_url, auth_string=stack.prefect_auth_string) as client:
        pool = client.read_work_pool(stack.work_pool)
        workers = client.read_workers_for_work_pool(stack.work_pool)
    assert pool.type == "process"
    # created by `up` with the project's template: a flow run cannot replace the worker's command
    assert "command" not in pool.base_job_template["variables"]["properties"]
    assert pool.base_job_template["variables"]["additionalProperties"] is False
    online = [w for w in workers if w.status.value == "ONLINE" and w.name == worker_name(stack.settings)]
    assert online, [(w.name, w.status.value) for w in workers]  # other tests add (and stop) workers of their own
    record = read_record(stack.settings, "worker")
    assert online[0].last_heartbeat_time.timestamp() >= record.create_time - 2.0
    assert _alive(record.pid)


@pytest.mark.slow
def test_up_twice_is_harmless(stack) -> None:
    before = {r.name: r.pid for r in status(stack.settings)}
    again = up(stack.settings, timeout=60)
    assert {r.name: r.pid for r in again} == before
    assert all(r.detail == "already running" for r in again)
    result = CliRunner().invoke(stack_app, ["up"], env=_settings_env(stack.settings))
    assert result.exit_code == 0, result.output
    assert result.output.count("already running") == len(SERVICES)
    after = status(stack.settings)
    assert {r.name: r.pid for r in after} == before
    assert all(r.healthy for r in after)


@pytest.mark.slow
def test_cli_status_lists_the_running_servers(stack) -> None:
    result = CliRunner().invoke(stack_app, ["status"], env=_settings_env(stack.settings))
    assert result.exit_code == 0, result.output
    for name in SERVICES:
        assert str(read_record(stack.settings, name).pid) in result.output
    assert stack.mlflow_url in result.output


# --- faults ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("server", "variable"), [
    ("prefect", "VECAF_STACK__PREFECT_PORT"),
    ("mlflow", "VECAF_STACK__MLFLOW_PORT"),
    ("s3", "VECAF_STACK__S3_PORT"),
])  # fmt: skip
def test_port_taken_by_a_foreign_process_is_a_clear_error(
    tmp_path: Path, stack_settings: Factory, free_port: Callable[[], int], server: str, variable: str
) -> None:
    port = free_port()
    settings = stack_settings(tmp_path / "state", **{f"{server}_port": port})
    with _foreign_listener(port) as foreign:
        with pytest.raises(StackError) as caught:
            up(settings)
        message = str(caught.value)
        assert f"port {port}" in message and f"needed by {server}" in message
        assert f"{variable}=" in message and "did not start" in message
        assert f"pid {foreign.pid}" in message
        assert not list((tmp_path / "state").glob("pids/*.json"))

        result = CliRunner().invoke(stack_app, ["up"], env=_settings_env(settings))
        assert result.exit_code == 1
        assert f"port {port}" in result.output and variable in result.output

        row = {r.name: r for r in status(settings)}[server]
        assert not row.running and f"port {port} is held by a process this project did not start" in row.detail
        assert foreign.poll() is None and _accepts(port)


def test_down_stops_only_what_the_stack_started(
    tmp_path: Path, stack_settings: Factory, free_port: Callable[[], int]
) -> None:
    settings = stack_settings(tmp_path / "state")
    root = (tmp_path / "state").resolve()
    foreign_port = free_port()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        with _foreign_listener(foreign_port) as listener:
            rows = up(settings, only=["s3"])
            assert [r.name for r in rows] == ["s3"]
            s3_pid = rows[0].pid
            assert _alive(s3_pid)

            with pytest.raises(StackError, match="running with other settings"):
                up(settings.model_copy(update={"s3_port": free_port()}), only=["s3"])
            with pytest.raises(StackError, match="or other S3 keys"):
                up(settings.model_copy(update={"s3_secret_key": SecretStr("another-secret")}), only=["s3"])
            assert _alive(s3_pid)

            # Records that name foreign processes, as after a PID was recycled: one with the right
            # command line but another start time, one with the right start time but another command line.
            sleeper_proc = psutil.Process(sleeper.pid)
            forged = {
                "mlflow": {"create_time": sleeper_proc.create_time() - 1000.0, "argv": sleeper_proc.cmdline()},
                "worker": {
                    "create_time": psutil.Process(listener.pid).create_time(),
                    "argv": ["python", "-m", "prefect", "worker", "start"],
                },
            }
            pids = {"mlflow": sleeper.pid, "worker": listener.pid}
            for name, fields in forged.items():
                record = {
                    "name": name, "pid": pids[name], "url": "http://127.0.0.1:1", "port": None,
                    "log": str(root / "logs" / f"{name}.log"), "started_at": "2026-01-01T00:00:00+00:00",
                    **fields,
                }  # fmt: skip
                (root / "pids" / f"{name}.json").write_text(json.dumps(record))

            assert down(settings, timeout=10) == ["s3"]
            assert not _alive(s3_pid)
            assert sleeper.poll() is None
            assert listener.poll() is None and _accepts(foreign_port)
            assert not list(root.glob("pids/*.json"))
            assert not any(r.running for r in status(settings))
            assert down(settings) == []
    finally:
        down(settings)  # also when an assertion above failed with S3 still up
        sleeper.kill()
        sleeper.wait()


def test_status_of_a_stopped_stack_says_so(tmp_path: Path, stack_settings: Factory) -> None:
    settings = stack_settings(tmp_path / "state")
    rows = status(settings)
    assert [(r.name, r.pid, r.running, r.healthy, r.detail) for r in rows] == [
        (name, None, False, False, "not running") for name in SERVICES
    ]
    runner = CliRunner()
    result = runner.invoke(stack_app, ["status"], env=_settings_env(settings))
    assert result.exit_code == 1
    assert "the stack is not running" in result.output
    result = runner.invoke(stack_app, ["down"], env=_settings_env(settings))
    assert result.exit_code == 0 and "nothing to stop" in result.output
    assert down(settings) == []
    assert not (tmp_path / "state").exists()


def test_objects_persist_across_a_restart_of_s3(tmp_path: Path, stack_settings: Factory) -> None:
    settings = stack_settings(tmp_path / "state")
    payload = b"kept across restarts"
    try:
        first = up(settings, only=["s3"])
        s3_client(settings).put_object(Bucket=settings.bucket, Key="keep/me.txt", Body=payload)
        assert down(settings) == ["s3"]
        second = up(settings, only=["s3"])
        assert second[0].pid != first[0].pid and second[0].detail.startswith("started")
        assert s3_client(settings).get_object(Bucket=settings.bucket, Key="keep/me.txt")["Body"].read() == payload
    finally:
        down(settings)


def test_failed_up_stops_what_it_started(
    tmp_path: Path, stack_settings: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real S3 server comes up, then MLflow (here a stand-in that fails like a broken database) exits."""
    import infra.stack as stack_module

    real_specs = stack_module.server_specs
    crash = "import sys; print('sqlite3.DatabaseError: file is not a database', flush=True); sys.exit(1)"

    def specs_with_broken_mlflow(settings):
        return [
            dataclasses.replace(spec, argv=(sys.executable, "-c", crash)) if spec.name == "mlflow" else spec
            for spec in real_specs(settings)
        ]

    monkeypatch.setattr(stack_module, "server_specs", specs_with_broken_mlflow)
    settings = stack_settings(tmp_path / "state")
    with pytest.raises(StackError, match="mlflow exited with code 1 before it became healthy") as caught:
        up(settings, only=["mlflow"])
    assert "file is not a database" in str(caught.value)
    assert "mlflow.log" in str(caught.value)
    s3_log = (tmp_path / "state" / "logs" / "s3.log").read_text()
    assert "Starting s3 server" in s3_log
    assert not list((tmp_path / "state").glob("pids/*.json"))
    assert not any(r.running for r in status(settings))
    assert not stack_module.port_in_use("127.0.0.1", settings.s3_port)


def test_server_that_exits_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    spec = ServerSpec(
        name="broken",
        argv=(sys.executable, "-c", "import sys; print('broken: cannot open database', flush=True); sys.exit(3)"),
        url="http://127.0.0.1:1",
        health=lambda _record: False,
    )
    with pytest.raises(StackError, match="exited with code 3") as caught:
        start_server(spec, tmp_path / "state", timeout=60)
    assert "broken: cannot open database" in str(caught.value)
    assert not list((tmp_path / "state").glob("pids/*.json"))


def test_server_that_never_gets_healthy_times_out_and_is_stopped(tmp_path: Path) -> None:
    code = "import os, time; print(f'pid={os.getpid()} still starting', flush=True); time.sleep(600)"
    spec = ServerSpec(
        name="slow", argv=(sys.executable, "-c", code), url="http://127.0.0.1:1", health=lambda _record: False
    )
    with pytest.raises(StackError, match="did not become healthy within 2 s") as caught:
        start_server(spec, tmp_path / "state", timeout=2.0)
    message = str(caught.value)
    assert "still starting" in message
    pid = int(re.search(r"pid=(\d+) still starting", message).group(1))
    assert not _alive(pid)
    assert not list((tmp_path / "state").glob("pids/*.json"))


# --- security by default ----------------------------------------------------------------------------------


def _request(url: str, *, method: str = "GET", headers: dict | None = None, body: dict | None = None) -> int:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={**(headers or {}), "Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _basic(auth_string: str) -> dict[str, str]:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()}


@pytest.mark.slow
def test_prefect_api_refuses_unauthenticated_calls_and_writes_without_csrf(stack) -> None:
    api = stack.prefect_api_url
    assert _request(f"{api}/admin/version") == 401
    assert _request(f"{api}/admin/version", headers=_basic("vecaf-test:wrong")) == 401
    assert _request(f"{api}/admin/version", headers=_basic(stack.prefect_auth_string)) == 200
    pool = urllib.parse.quote(stack.work_pool)
    assert _request(f"{api}/work_pools/{pool}/workers/filter", method="POST", body={}) == 403  # CSRF runs first
    assert _request(f"{api}/csrf-token?client={uuid.uuid4()}") == 401  # and no token without the auth string
    authed = _basic(stack.prefect_auth_string)
    assert _request(f"{api}/work_pools/{pool}/workers/filter", method="POST", body={}, headers=authed) == 403
    code, workers = prefect_request(services_of(stack.settings), f"/work_pools/{pool}/workers/filter", method="POST", body={})
    assert code == 200 and worker_name(stack.settings) in [w["name"] for w in workers]  # other tests add workers


@pytest.mark.slow
def test_prefect_cors_allows_only_its_ui_origin(stack) -> None:
    ui = stack.prefect_api_url.removesuffix("/api")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for origin, allowed in ((ui, True), ("http://evil.example", False)):
        request = urllib.request.Request(
            f"{stack.prefect_api_url}/health",
            method="OPTIONS",
            headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
        )
        try:
            with opener.open(request, timeout=10) as response:
                header = response.headers.get("access-control-allow-origin")
        except urllib.error.HTTPError as exc:
            header = exc.headers.get("access-control-allow-origin")
        assert (header == origin) is allowed, (origin, header)


@pytest.mark.slow
def test_no_secret_in_pid_records_logs_or_command_lines(stack) -> None:
    secrets = [stack.secret_key, stack.prefect_auth_string, stack.prefect_auth_string.split(":", 1)[1]]
    files = list(stack.state_dir.glob("pids/*.json")) + list(stack.state_dir.glob("logs/*.log"))
    assert len(files) >= 2 * len(SERVICES)
    for path in files:
        text = path.read_text(errors="replace")
        for secret in secrets:
            assert secret not in text, f"a secret is in {path}"
    for name in SERVICES:
        record = read_record(stack.settings, name)
        assert not any(secret in " ".join(record.argv) for secret in secrets)
        assert " ".join(psutil.Process(record.pid).cmdline()).find(stack.secret_key) < 0
        assert record.fingerprint and record.fingerprint != _unsalted_fingerprint(record)
    written_by_servers = [stack.state_dir / sub for sub in ("mlflow", "prefect", "logs", "pids")]
    for path in [stack.state_dir, *written_by_servers, *(p for d in written_by_servers for p in d.rglob("*"))]:
        assert path.stat().st_mode & 0o007 == 0, f"{path} is accessible to others: {oct(path.stat().st_mode)}"
    assert (stack.state_dir / "mlflow" / "mlflow.db").stat().st_mode & 0o077 == 0


def _unsalted_fingerprint(record) -> str:
    import hashlib

    return hashlib.sha256(json.dumps([list(record.argv), []]).encode()).hexdigest()


def test_generated_keys_are_private_and_nothing_is_world_readable(tmp_path: Path, stack_settings: Factory) -> None:
    settings = stack_settings(tmp_path / "state", s3_access_key=None, s3_secret_key=None, prefect_auth_string=None)
    root = (tmp_path / "state").resolve()
    old_umask = os.umask(0o022)
    try:
        up(settings, only=["s3"])
        services = services_of(settings)
        secrets_file = json.loads((root / "secrets.json").read_text())
        assert services.s3_secret_key.get_secret_value() == secrets_file["s3_secret_key"]
        client = s3_client(settings)
        client.put_object(Bucket=settings.bucket, Key="private/blob", Body=b"x")
        assert (root / "s3" / settings.bucket / "private" / "blob").read_bytes() == b"x"
        assert (root / "secrets.json").stat().st_mode & 0o777 == 0o600
        assert root.stat().st_mode & 0o777 == 0o700
        for path in [root, *root.rglob("*")]:
            assert path.stat().st_mode & 0o007 == 0, f"{path} is accessible to others: {oct(path.stat().st_mode)}"
        for path in [*root.glob("pids/*.json"), *root.glob("logs/*.log")]:
            assert secrets_file["s3_secret_key"] not in path.read_text()
        down(settings)
        again = up(settings, only=["s3"])  # the same keys after a restart: objects still readable
        assert again[0].detail.startswith("started")
        assert s3_client(settings).get_object(Bucket=settings.bucket, Key="private/blob")["Body"].read() == b"x"
    finally:
        os.umask(old_umask)
        down(settings)


# --- external services and backends: bad input is refused before anything starts --------------------------


def test_unreachable_external_service_names_the_service_and_url(
    tmp_path: Path, stack_settings: Factory, free_port: Callable[[], int]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    for field, name in (("prefect_api_url", "Prefect API"), ("mlflow_tracking_uri", "MLflow tracking server")):
        url = f"{dead}/api" if field == "prefect_api_url" else dead
        settings = Settings(
            stack=stack_settings(tmp_path / field), services=ServiceSettings(**{field: url})
        )
        with pytest.raises(StackError, match=f"external {name} {re.escape(url)} .*{field}.* does not answer"):
            up(settings)
        assert not list((tmp_path / field).glob("pids/*.json"))
        rows = {row.name: row for row in status(settings)}
        short = "prefect" if field == "prefect_api_url" else "mlflow"
        assert rows[short].where == "external" and not rows[short].healthy
    settings = Settings(
        stack=stack_settings(tmp_path / "s3"),
        services=ServiceSettings(
            s3_endpoint_url=dead, s3_access_key=SecretStr("key"), s3_secret_key=SecretStr("secret"), bucket="b-1"
        ),
    )
    with pytest.raises(StackError, match=f"S3 endpoint {re.escape(dead)} .*services.s3_endpoint_url.* does not answer"):
        up(settings)
    assert not list((tmp_path / "s3").glob("pids/*.json"))


@pytest.mark.parametrize(
    ("field", "url", "reason"),
    [
        ("mlflow_backend_store_uri", "postgresql://postgres@127.0.0.1:5432/vecaf_no_such_db_{r}", "does not exist"),
        ("prefect_database_url", "postgresql+asyncpg://postgres:pw-{r}@127.0.0.1:{port}/postgres", "refused|connect"),
    ],
)
def test_wrong_postgresql_url_names_the_setting(
    tmp_path: Path, stack_settings: Factory, free_port: Callable[[], int], field: str, url: str, reason: str
) -> None:
    r = uuid.uuid4().hex[:8]
    value = url.format(r=r, port=free_port())
    settings = stack_settings(tmp_path / "state", **{field: SecretStr(value)})
    with pytest.raises(StackError, match=rf"stack\.{field} \(VECAF_STACK__{field.upper()}\)") as caught:
        up(settings)
    assert re.search(reason, str(caught.value))
    assert f"pw-{r}" not in str(caught.value)
    assert not list((tmp_path / "state").glob("pids/*.json"))


def _external_s3(tmp_path: Path, port: int, access: str, secret: str, *extra: str) -> ServerSpec:
    from infra.stack import _rclone

    return ServerSpec(
        name="external-s3",
        argv=(_rclone(), "serve", "s3", str(tmp_path / "external-s3"), "--addr", f"127.0.0.1:{port}", *extra),
        url=f"http://127.0.0.1:{port}",
        port=port,
        env={"RCLONE_AUTH_KEY": f'"{access},{secret}"'},
        health=lambda _record: _accepts_quietly(port),
    )


def _accepts_quietly(port: int) -> bool:
    try:
        return _accepts(port)
    except OSError:
        return False


@pytest.mark.parametrize("read_only", [False, True])
def test_missing_external_bucket_is_created_or_a_clear_error(
    tmp_path: Path, stack_settings: Factory, free_port: Callable[[], int], read_only: bool
) -> None:
    from infra.stack import _stop_record

    port = free_port()
    (tmp_path / "external-s3").mkdir()
    spec = _external_s3(tmp_path, port, "ext-key", "ext-secret", *(["--read-only"] if read_only else []))
    record = start_server(spec, tmp_path / "external-state", timeout=60)
    try:
        bucket = f"fresh-{uuid.uuid4().hex[:8]}"
        settings = Settings(
            stack=stack_settings(tmp_path / "state"),
            services=ServiceSettings(
                s3_endpoint_url=spec.url,
                s3_access_key=SecretStr("ext-key"),
                s3_secret_key=SecretStr("ext-secret"),
                bucket=bucket,
            ),
        )
        assert services_of(settings).s3_external
        assert "s3" not in local_services(settings)
        if read_only:
            with pytest.raises(StackError, match=f"S3 bucket {bucket} at {re.escape(spec.url)} does not exist and could not be created"):
                check_services(settings)
        else:
            check_services(settings)
            assert (tmp_path / "external-s3" / bucket).is_dir()
            rows = {row.name: row for row in status(settings)}
            assert rows["s3"].where == "external" and rows["s3"].healthy
    finally:
        _stop_record((tmp_path / "external-state").resolve(), record, timeout=10)
