"""Deployments of the pipeline's flows on the stack's ``process`` work pool, and triggering them.

``deploy`` registers, from this repository (``flow.from_source(<repo root>, <file>:<flow>)``, so the worker
runs the code in place; no image is built):

- ``vecaf-pipeline/recurring-finetune``: caption -> featurize -> finetune -> promote on cron ``0 3 * * *``
  (UTC), with the pipeline's default parameters or those given;
- ``promote/on-demand``: promotion alone, no schedule;
- ``caption/on-demand``, ``featurize/on-demand``, ``finetune/on-demand``: each step alone, no schedule.

It also sets the tag concurrency limit ``gpu`` (default 1): tasks that run a model carry that tag, so at
most that many run at once, whichever flow runs them. Everything is idempotent: deploying again updates
the deployments in place.

``trigger`` creates a flow run of a deployment (the Prefect server validates the parameters against the
flow's schema first, so an out-of-range value is refused before any run exists) and can wait for it.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from vecaf.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PIPELINE_DEPLOYMENT = "recurring-finetune"
ON_DEMAND = "on-demand"
DEFAULT_CRON = "0 3 * * *"
GPU_TAG = "gpu"

_ENTRYPOINTS = {
    "vecaf-pipeline": "flows/pipeline.py:vecaf_pipeline",
    "promote": "flows/promote.py:promote",
    "caption": "flows/caption.py:caption",
    "featurize": "flows/featurize.py:featurize",
    "finetune": "flows/finetune.py:finetune",
}


@contextlib.contextmanager
def prefect_api(settings: Settings) -> Iterator[str]:
    """Point this process's Prefect client at the services' API (with its credentials); yields the API URL."""
    from flows.runtime import prefect_client_settings

    with prefect_client_settings(settings) as url:
        yield url


def ensure_gpu_limit(limit: int = 1) -> int:
    """Create (or reset) the tag concurrency limit ``gpu``; returns the limit."""
    from prefect.client.orchestration import get_client

    if limit < 1:
        raise ValueError(f"the gpu concurrency limit must be >= 1, got {limit}")
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=limit)
    return limit


def deploy(
    settings: Settings,
    *,
    pipeline_parameters: Mapping[str, Any] | None = None,
    cron: str = DEFAULT_CRON,
    timezone: str = "UTC",
    paused: bool = False,
    gpu_limit: int = 1,
    flows: tuple[str, ...] = tuple(_ENTRYPOINTS),
) -> dict[str, str]:
    """Register the deployments on the stack's work pool (the stack must be up).

    Args:
        settings: the settings (stack URLs, work pool).
        pipeline_parameters: default parameters of the scheduled pipeline (``PipelineParams.flow_parameters()``);
            None keeps the flow's defaults.
        cron: the pipeline's schedule (recurring finetuning).
        timezone: the schedule's time zone.
        paused: create the schedule paused.
        gpu_limit: the ``gpu`` tag concurrency limit.
        flows: which flows to deploy (names of the table above).

    Returns:
        ``{"<flow>/<deployment>": deployment id}``.

    Raises:
        ValueError: an unknown flow name, or the work pool does not exist (start the stack first).
    """
    from prefect import Flow
    from prefect.schedules import Cron

    from flows.params import close_deployment_parameters

    unknown = sorted(set(flows) - set(_ENTRYPOINTS))
    if unknown:
        raise ValueError(f"unknown flow(s) {unknown}; deployable: {sorted(_ENTRYPOINTS)}")
    pool = settings.stack.work_pool
    out: dict[str, str] = {}
    with prefect_api(settings):
        ensure_gpu_limit(gpu_limit)
        for name in flows:
            flow = Flow.from_source(source=str(PROJECT_ROOT), entrypoint=_ENTRYPOINTS[name])
            options: dict[str, Any] = {}
            if name == "vecaf-pipeline":
                deployment = PIPELINE_DEPLOYMENT
                options["schedules"] = [Cron(cron, timezone=timezone)]
                options["paused"] = paused
                if pipeline_parameters is not None:
                    options["parameters"] = dict(pipeline_parameters)
            else:
                deployment = ON_DEMAND
            with contextlib.redirect_stdout(io.StringIO()):
                dep_id = flow.deploy(
                    name=deployment,
                    work_pool_name=pool,
                    build=False,
                    push=False,
                    print_next_steps=False,
                    ignore_warnings=True,
                    tags=["vecaf"],
                    enforce_parameter_schema=True,
                    **options,
                )
            close_deployment_parameters(dep_id)
            out[f"{name}/{deployment}"] = str(dep_id)
    return out


def trigger(
    settings: Settings,
    deployment: str,
    parameters: Mapping[str, Any] | None = None,
    *,
    wait: bool = False,
    timeout: float | None = None,
    on_poll: Callable[[Any], None] | None = None,
    poll_s: float = 3.0,
) -> Any:
    """Create a flow run of ``deployment`` (``"<flow>/<deployment>"``) and optionally wait for it to end.

    Args:
        settings: the settings (stack URLs).
        deployment: e.g. ``"vecaf-pipeline/recurring-finetune"``.
        parameters: parameters overriding the deployment's defaults (top-level keys replace whole values).
        wait: poll until the run is in a final state.
        timeout: seconds to wait at most (None: no limit); on expiry ``TimeoutError``.
        on_poll: called with the flow run at each poll (progress display).
        poll_s: seconds between polls.

    Returns:
        The Prefect ``FlowRun`` (final when ``wait``).

    Raises:
        ValueError: the server refused the parameters (the message says which).
    """
    from prefect.deployments import run_deployment
    from prefect.exceptions import PrefectHTTPStatusError

    with prefect_api(settings):
        try:
            run = run_deployment(name=deployment, parameters=dict(parameters or {}), timeout=0)
        except PrefectHTTPStatusError as exc:
            detail = exc.response.text if exc.response is not None else str(exc)
            raise ValueError(f"Prefect refused a run of {deployment}: {detail}") from exc
        if not wait:
            return run
    return wait_for_run(settings, run.id, timeout=timeout, on_poll=on_poll, poll_s=poll_s)


def wait_for_run(
    settings: Settings,
    flow_run_id: Any,
    *,
    timeout: float | None = None,
    on_poll: Callable[[Any], None] | None = None,
    poll_s: float = 3.0,
) -> Any:
    """Poll a flow run until it reaches a final state; returns the final ``FlowRun``.

    Raises:
        TimeoutError: still not final after ``timeout`` seconds (None: wait as long as it takes).
    """
    from prefect.client.orchestration import get_client

    start = time.monotonic()
    with prefect_api(settings), get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if on_poll is not None:
                on_poll(run)
            if run.state is not None and run.state.is_final():
                return run
            if timeout is not None and time.monotonic() - start > timeout:
                raise TimeoutError(f"flow run {flow_run_id} did not finish within {timeout:.0f} s")
            time.sleep(poll_s)
