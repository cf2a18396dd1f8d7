"""What every flow run needs from the settings: folders, service addresses and credentials, who it is in Prefect.

Settings are read once per flow run (``load_settings()``). Service addresses come from
``vecaf.services.resolve_services`` (``services.*`` settings, then the clients' usual variables, then the
local stack's defaults), so a flow never imports the local-stack module: the same code runs against the
servers of ``vecaf stack up`` and against production services.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vecaf.services import ResolvedServices, resolve_services, state_dir
from vecaf.settings import Settings, load_settings


@dataclass(frozen=True)
class Runtime:
    """Resolved locations of one flow run.

    Attributes:
        settings: the settings it was built from.
        state_dir: the stack's state folder (absolute).
        store_dir: the folder of the Feast store's local files (``stack.feast_dir``; the SQLite online store,
            file registry and Parquet by default). Tasks are given ``feature_store``, not this folder.
        feature_store: the Feast store spec of the settings (``tasks.features.store_spec``: ``settings.feast``
            or a user's ``feature_store.yaml``, never rewritten): what every task that reads or writes
            features receives. JSON-able and free of secrets (``${VAR}`` references and S3 keys are resolved
            where the store is opened).
        work_dir: ``<state_dir>/work``: this worker's scratch space.
        cache_dir: ``<work_dir>/cache``: the local cache of run state kept in the bucket (``tasks.storage``);
            it may vanish between tasks, anything in it is downloaded again when missing.
        tracking_uri: the MLflow tracking server.
        s3_endpoint: the S3 endpoint holding MLflow's artifacts (None: AWS).
        bucket: the S3 bucket.
        prefect_ui: the Prefect UI base URL.
        allow_hub: whether model names may be fetched from a hub.
        services: every service address and credential (see ``vecaf.services.ResolvedServices``).
        prefix: key prefix of the pipeline's objects in ``bucket`` ('' or ending in '/').
        prefect_api_url: the Prefect API.
    """

    settings: Settings
    state_dir: Path
    store_dir: str
    feature_store: dict[str, Any]
    work_dir: str
    cache_dir: str
    tracking_uri: str
    s3_endpoint: str | None
    bucket: str
    prefect_ui: str
    allow_hub: bool
    services: ResolvedServices
    prefix: str
    prefect_api_url: str

    def client_env(self) -> dict[str, str]:
        """The environment a child process (or an MLflow/boto3/Prefect client) needs to reach the services."""
        return self.services.client_env()

    def s3_client(self, *, timeout: float = 10.0) -> Any:
        """A boto3 S3 client for the services' endpoint (or AWS), with their keys or boto3's credential chain."""
        return s3_client(self.services, timeout=timeout)


def s3_client(services: ResolvedServices, *, timeout: float = 10.0) -> Any:
    """A boto3 S3 client for ``services`` (endpoint, region, addressing style, keys or the credential chain)."""
    import boto3
    from botocore.config import Config

    options = services.s3_client_options(timeout=timeout)
    options["config"] = Config(**options["config"])
    return boto3.client("s3", **options)


def runtime(settings: Settings | None = None) -> Runtime:
    """The :class:`Runtime` of these settings (default: ``load_settings()``).

    Raises:
        ValueError: the Feast configuration names an unknown store type or a bad location (before any work).
    """
    from tasks.features import store_spec

    s = settings if settings is not None else load_settings()
    root = state_dir(s.stack)
    services = resolve_services(s)
    store = Path(s.stack.feast_path).expanduser()
    if not store.is_absolute():
        store = (Path.cwd() / store).resolve()
    return Runtime(
        settings=s,
        state_dir=root,
        store_dir=str(store),
        feature_store=store_spec(s, services=services),
        work_dir=str(root / "work"),
        cache_dir=str(root / "work" / "cache"),
        tracking_uri=services.mlflow_tracking_uri,
        s3_endpoint=services.s3_endpoint_url,
        bucket=services.bucket,
        prefect_ui=services.prefect_ui_url,
        allow_hub=bool(s.models.allow_hub),
        services=services,
        prefix=services.prefix,
        prefect_api_url=services.prefect_api_url,
    )


def prefect_api_url(settings: Settings) -> str:
    """The Prefect API URL of these settings (``services.prefect_api_url``, ``PREFECT_API_URL``, the local stack)."""
    return resolve_services(settings).prefect_api_url


@contextlib.contextmanager
def prefect_client_settings(settings: Settings) -> Iterator[str]:
    """Point this process's Prefect client at the services' API, with its auth string or API key; yields the URL."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY, PREFECT_API_URL, temporary_settings

    services = resolve_services(settings)
    updates: dict[Any, Any] = {PREFECT_API_URL: services.prefect_api_url}
    if services.prefect_auth_string is not None:
        updates[PREFECT_API_AUTH_STRING] = services.prefect_auth_string.get_secret_value()
    if services.prefect_api_key is not None:
        updates[PREFECT_API_KEY] = services.prefect_api_key.get_secret_value()
    with temporary_settings(updates=updates):
        yield services.prefect_api_url


def flow_run_info() -> dict[str, Any]:
    """``{"id", "name", "deployment_id", "root_id"}`` of the current Prefect flow run (None outside one).

    ``root_id`` is the outermost flow run (the ``vecaf-pipeline`` run when this one is its subflow).
    """
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run = getattr(ctx, "flow_run", None)
    if run is None:
        return {"id": None, "name": None, "deployment_id": None, "root_id": None}
    try:
        from prefect.client.orchestration import get_client

        from tasks.progress import top_level_run_id

        with get_client(sync_client=True) as client:
            root_id = top_level_run_id(client, str(run.id))
    except Exception:  # noqa: BLE001 - the root is a convenience for look-ups, not needed to run
        root_id = str(run.id)
    return {
        "id": str(run.id),
        "name": run.name,
        "deployment_id": None if run.deployment_id is None else str(run.deployment_id),
        "root_id": root_id,
    }


def flow_run_url(prefect_ui: str, flow_run_id: str) -> str:
    """The Prefect UI page of a flow run."""
    return f"{prefect_ui.rstrip('/')}/runs/flow-run/{flow_run_id}"
