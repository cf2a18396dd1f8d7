"""Fixtures that run the real local stack (``infra/stack.py``) on free ports in a temporary state dir.

``stack`` (session scope) starts S3, MLflow, the Prefect server and a worker once for the whole test session
and always stops them at the end, also when a test or the start-up fails. It never uses the default ports
4200/5000/9000, so a developer's own ``vecaf stack up`` is left alone. ``stack_environ`` points the
current test's environment at it. The fixtures ``stack_settings`` (a factory: state dir and overrides in,
settings on free ports out) and ``free_port`` (a factory of free ports) serve tests that need a stack of
their own.
"""

from __future__ import annotations

import random
import secrets
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from infra.stack import running_stack, s3_client, stack_env, stack_urls
from vecaf.settings import StackSettings

_DEFAULT_PORTS = frozenset({4200, 5000, 9000})
_HANDED_OUT: set[int] = set()


def pick_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port in 20000-31999 (below Linux's ephemeral range) that binds now and was not handed out before."""
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.randrange(20000, 32000)
        if port in _HANDED_OUT or port in _DEFAULT_PORTS:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free TCP port found in 20000-31999")


def make_stack_settings(state_dir: Path, **overrides: Any) -> StackSettings:
    """Stack settings on free ports, in ``state_dir``, with a random S3 secret and Prefect auth string;
    ``overrides`` win."""
    values: dict[str, Any] = {
        "state_dir": Path(state_dir),
        "prefect_port": pick_free_port(),
        "mlflow_port": pick_free_port(),
        "s3_port": pick_free_port(),
        "s3_access_key": "vecaf-test",
        "s3_secret_key": SecretStr(secrets.token_hex(16)),
        "prefect_auth_string": SecretStr(f"vecaf-test:{secrets.token_hex(16)}"),
        "bucket": "vecaf-test",
        "work_pool": "vecaf-test-process",
    }
    values.update(overrides)
    return StackSettings(**values)


@dataclass(frozen=True)
class LocalStack:
    """A running stack, as the ``stack`` fixture yields it.

    Attributes:
        settings: Its ``StackSettings`` (pass to ``infra.stack`` functions or ``Settings(stack=...)``).
        state_dir: Where its data, logs and pid files are.
        prefect_api_url: ``http://127.0.0.1:<port>/api``.
        mlflow_url: The MLflow tracking URI.
        s3_endpoint_url: The S3 endpoint.
        access_key: The S3 access key id.
        secret_key: The S3 secret access key.
        bucket: The bucket ``up`` created.
        work_pool: The Prefect ``process`` work pool its worker polls.
        env: The environment a client (or a flow run) needs: URLs, keys, ``PREFECT_API_AUTH_STRING`` and the
            ``VECAF_STACK__*`` variables.
        prefect_auth_string: The Prefect server's basic-auth string ``user:password``.
    """

    settings: StackSettings
    state_dir: Path
    prefect_api_url: str
    mlflow_url: str
    s3_endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    work_pool: str
    env: dict[str, str]
    prefect_auth_string: str = ""

    def s3_client(self) -> Any:
        """A boto3 S3 client for this stack."""
        return s3_client(self.settings)


def _local_stack(settings: StackSettings) -> LocalStack:
    urls = stack_urls(settings)
    env = stack_env(settings, with_settings=True)
    return LocalStack(
        settings=settings,
        state_dir=Path(settings.state_dir),
        prefect_api_url=urls["prefect_api_url"],
        mlflow_url=urls["mlflow_url"],
        s3_endpoint_url=urls["s3_endpoint_url"],
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        bucket=settings.bucket,
        work_pool=settings.work_pool,
        env=env,
        prefect_auth_string=env.get("PREFECT_API_AUTH_STRING", ""),
    )


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The whole stack (S3, MLflow, Prefect server, worker), up for the session, always stopped after."""
    settings = make_stack_settings(tmp_path_factory.mktemp("vecaf-stack") / "state")
    with running_stack(settings, timeout=300.0):
        yield _local_stack(settings)


@pytest.fixture
def stack_environ(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Set the stack's client environment (``LocalStack.env``) for one test; returns it."""
    for key, value in stack.env.items():
        monkeypatch.setenv(key, value)
    return stack.env


@pytest.fixture
def free_port() -> Callable[[], int]:
    """A factory of free TCP ports (never 4200/5000/9000, never the same one twice in a session)."""
    return pick_free_port


@pytest.fixture
def stack_settings() -> Callable[..., StackSettings]:
    """A factory ``(state_dir, **overrides) -> StackSettings`` on free ports (see ``make_stack_settings``)."""
    return make_stack_settings


@pytest.fixture(scope="module")
def stack_clients(stack: LocalStack) -> Iterator[LocalStack]:
    """This module's process pointed at the session stack: its client environment (``load_settings()``, MLflow,
    boto3) and Prefect's API URL, for every test of the module; queued Prefect logs and events are sent
    before the module ends (while the stack still answers)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    patch = pytest.MonkeyPatch()
    for key, value in stack.env.items():
        patch.setenv(key, value)
    with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api_url}):
        yield stack
        APILogWorker.drain_all(timeout=30)
        EventsWorker.drain_all(timeout=30)
    patch.undo()
