"""Shard fan-out: each caption / embedding shard as its own flow run on the work pool, so N workers take N shards.

A deployed ``caption`` or ``featurize`` run (one a worker started) creates one flow run of the shard
deployment (``caption-shard/fan-out`` or ``embed-shard/fan-out``) per shard with ``run_deployment(...,
timeout=0)``, then waits for all of them. Each shard run writes its Parquet file to the store itself and
publishes a one-row table artifact ``shard summary`` (counts and the worker that ran it), which is all the
parent reads back: no result storage is shared between workers.

Outside a deployment (a plain Python call in a notebook or a test), with ``deploy.fan_out_shards: never``,
in ``auto`` mode on a ``process`` pool with fewer than two workers online, or when the shard deployment is
not registered, the flows run their shards in-process as before.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

from prefect import get_run_logger, task

from tasks.data import LOCAL_TASK
from tasks.progress import StepProgress

CAPTION_SHARD_DEPLOYMENT = "caption-shard/fan-out"
EMBED_SHARD_DEPLOYMENT = "embed-shard/fan-out"
_PROGRESS_STEP = {CAPTION_SHARD_DEPLOYMENT: "caption", EMBED_SHARD_DEPLOYMENT: "embed"}
SUMMARY_DESCRIPTION = "shard summary"
_FINAL_FAILURES = ("FAILED", "CRASHED", "CANCELLED", "CANCELLING")


def in_deployed_run() -> bool:
    """True inside a flow run that a worker started (``PREFECT__FLOW_RUN_ID`` is set) or that has a deployment."""
    if os.environ.get("PREFECT__FLOW_RUN_ID"):
        return True
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run = getattr(ctx, "flow_run", None)
    return run is not None and run.deployment_id is not None


def fan_out_deployment(mode: str, deployment: str) -> str | None:
    """The shard deployment to fan out to, or None to run shards in-process.

    Args:
        mode: ``deploy.fan_out_shards``: ``"always"``, ``"never"``, or ``"auto"`` (fan out on kubernetes/docker
            pools, where each run gets its own pod or container; on a ``process`` pool only when two or more
            workers are online, since one worker gains nothing but the start-up cost of a process per shard).
        deployment: ``"<flow>/<deployment>"`` of the shard flow.

    Fan-out also needs a deployed run and the shard deployment registered on the server (``vecaf deploy``
    registers it; an older deployment set runs in-process).
    """
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"deploy.fan_out_shards must be 'auto', 'always' or 'never', got {mode!r}")
    if mode == "never" or not in_deployed_run():
        return None
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    logger = get_run_logger()
    with get_client(sync_client=True) as client:
        try:
            target = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            logger.warning("shard deployment %s is not registered: shards run in-process", deployment)
            return None
        if not target.work_pool_name:
            return deployment
        pool = client.read_work_pool(target.work_pool_name)
        if pool.concurrency_limit is not None and pool.concurrency_limit < 2:
            logger.warning(
                "work pool %s runs one flow run at a time: shards run in-process (this run holds the slot)", pool.name
            )
            return None
        if mode == "auto" and pool.type == "process":
            online = [w for w in client.read_workers_for_work_pool(pool.name) if w.status == "ONLINE"]
            if len(online) < 2:
                logger.info(
                    "%d worker(s) online on process pool %s: shards run in-process "
                    "(deploy.fan_out_shards=always fans out anyway)", len(online), pool.name,
                )  # fmt: skip
                return None
    return deployment


def worker_name() -> str | None:
    """The name of the Prefect worker that started this flow run (None in a plain process)."""
    return os.environ.get("PREFECT__WORKER_NAME") or None


@task(name="publish-shard-summary", **LOCAL_TASK)
def publish_shard_summary_task(result: dict[str, Any]) -> dict[str, Any]:
    """Attach the shard's counts and worker to its flow run as a one-row table artifact; returns that row."""
    from prefect.artifacts import create_table_artifact

    row = {k: v for k, v in result.items() if k in ("kind", "split", "start", "stop", "new", "cached")}
    row["worker"] = worker_name() or ""
    create_table_artifact(table=[row], description=SUMMARY_DESCRIPTION)
    get_run_logger().info("shard [%s:%s] run by worker %s", row.get("start"), row.get("stop"), row["worker"])
    return row


@task(name="run-shard-flows", **LOCAL_TASK)
def run_shard_flows_task(
    deployment: str, shards: Sequence[dict[str, Any]], poll_s: float = 2.0, log_every_s: float = 60.0
) -> list[dict[str, Any]]:
    """Create one flow run of ``deployment`` per parameter set, wait for all, and return their summaries in order.

    Args:
        deployment: ``"<flow>/<deployment>"`` of the shard flow.
        shards: the parameters of each shard run (JSON-ready).
        poll_s: seconds between polls of the runs' states.
        log_every_s: seconds between progress lines while waiting.

    Returns:
        One summary per shard (``{"start", "stop", "new", "cached", "worker", ...}``), in the order given.

    Raises:
        RuntimeError: a shard run ended in a failed state (names the run and its message), or published no summary.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    runs = [run_deployment(name=deployment, parameters=dict(p), timeout=0, as_subflow=True) for p in shards]
    logger.info("%d shard runs of %s created; waiting for the pool's workers", len(runs), deployment)
    pending = {r.id for r in runs}
    progress = StepProgress(_PROGRESS_STEP[deployment], len(runs), "shards") if deployment in _PROGRESS_STEP else None
    last_log = time.monotonic()
    with get_client(sync_client=True) as client:
        while pending:
            for run_id in list(pending):
                run = client.read_flow_run(run_id)
                if run.state is None or not run.state.is_final():
                    continue
                pending.discard(run_id)
                if not run.state.is_completed():
                    raise RuntimeError(
                        f"shard run {run.name} ({run_id}) of {deployment} ended {run.state.type.value}: "
                        f"{run.state.message or 'no message'}"
                    )
                if progress is not None:
                    progress.advance()
            if pending:
                if time.monotonic() - last_log > log_every_s:
                    logger.info("%d of %d shard runs still running or waiting for a worker", len(pending), len(runs))
                    last_log = time.monotonic()
                time.sleep(poll_s)
        return [shard_summary(client, r) for r in runs]


def shard_summary(client: Any, run: Any) -> dict[str, Any]:
    """The ``shard summary`` row a shard flow run published, plus its ``flow_run_id``.

    Raises:
        RuntimeError: the run published none.
    """
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]), type=ArtifactFilterType(any_=["table"])
        )
    )
    for artifact in artifacts:
        if artifact.description == SUMMARY_DESCRIPTION:
            data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
            return {**data[0], "flow_run_id": str(run.id)}
    raise RuntimeError(f"shard run {run.name} ({run.id}) completed but published no {SUMMARY_DESCRIPTION!r} artifact")
