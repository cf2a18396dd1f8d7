"""What every flow run needs from the settings: folders, server URLs, and who it is in Prefect.

Settings are read once per flow run (``load_settings()``: a deployment's worker passes the stack's
``VECAF_STACK__*`` variables, so a flow run finds the same servers and state folder as ``vecaf stack up``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vecaf.settings import Settings, load_settings


@dataclass(frozen=True)
class Runtime:
    """Resolved locations of one flow run.

    Attributes:
        settings: the settings it was built from.
        state_dir: the stack's state folder (absolute).
        store_dir: the Feast store folder.
        work_dir: ``<state_dir>/work``: manifests, training checkpoints, picks, models before logging.
        tracking_uri: the MLflow tracking server.
        s3_endpoint: the S3 endpoint holding MLflow's artifacts.
        bucket: the S3 bucket.
        prefect_ui: the Prefect UI base URL.
        allow_hub: whether model names may be fetched from a hub.
    """

    settings: Settings
    state_dir: Path
    store_dir: str
    work_dir: str
    tracking_uri: str
    s3_endpoint: str
    bucket: str
    prefect_ui: str
    allow_hub: bool


def runtime(settings: Settings | None = None) -> Runtime:
    """The :class:`Runtime` of these settings (default: ``load_settings()``)."""
    from infra.stack import stack_urls, state_dir

    s = settings if settings is not None else load_settings()
    root = state_dir(s)
    urls = stack_urls(s)
    store = Path(s.stack.feast_path).expanduser()
    if not store.is_absolute():
        store = (Path.cwd() / store).resolve()
    return Runtime(
        settings=s,
        state_dir=root,
        store_dir=str(store),
        work_dir=str(root / "work"),
        tracking_uri=urls["mlflow_url"],
        s3_endpoint=urls["s3_endpoint_url"],
        bucket=s.stack.bucket,
        prefect_ui=urls["prefect_ui_url"],
        allow_hub=bool(s.models.allow_hub),
    )


def flow_run_info() -> dict[str, Any]:
    """``{"id", "name", "deployment_id", "root_id"}`` of the current Prefect flow run (None outside one).

    ``root_id`` is the outermost flow run (the ``vecaf-pipeline`` run when this one is its subflow).
    """
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run = getattr(ctx, "flow_run", None)
    if run is None:
        return {"id": None, "name": None, "deployment_id": None, "root_id": None}
    root = run
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            for _ in range(10):
                if root.parent_task_run_id is None:
                    break
                parent_task = client.read_task_run(root.parent_task_run_id)
                if parent_task.flow_run_id is None:
                    break
                root = client.read_flow_run(parent_task.flow_run_id)
    except Exception:  # noqa: BLE001 - the root is a convenience for look-ups, not needed to run
        root = run
    return {
        "id": str(run.id),
        "name": run.name,
        "deployment_id": None if run.deployment_id is None else str(run.deployment_id),
        "root_id": str(root.id),
    }


def flow_run_url(prefect_ui: str, flow_run_id: str) -> str:
    """The Prefect UI page of a flow run."""
    return f"{prefect_ui.rstrip('/')}/runs/flow-run/{flow_run_id}"
