"""Reconciliation: after a kill, a crash or a server restart, no run stays RUNNING and no slot stays taken.

Prefect 3.9.1 keeps concurrency leases in the server's memory by default
(``PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE``): a server restart forgets the lease of a task that held the
``gpu`` slot while the slot count (``tag:gpu``, a V2 global limit in the database) stays taken, and nothing
ever gives it back. A process killed with ``kill -9`` leaves its flow run, its subflows and its task runs
RUNNING in Prefect, and its MLflow runs (parent and nested ``loop-<l>``) RUNNING, its logged model PENDING.

:func:`reconcile` puts that right; every step is idempotent and leaves live runs alone:

1. :func:`free_orphaned_slots`: a ``tag:*`` limit counts more active slots than the leases the server
   knows (each lease names the task run holding it): the difference is slots nobody holds, released.
   A lease of a dead holder is left to Prefect (it expires 60 s after its last renewal and the server's
   repossessor frees it).
2. :func:`crash_dead_flow_runs`: a RUNNING/CANCELLING/PENDING flow run whose process is gone becomes
   CRASHED, with its subflows and its unfinished task runs. "Gone": on this machine's work pool, the
   ``infrastructure_pid`` is no longer a process carrying ``PREFECT__FLOW_RUN_ID=<the run>``; anywhere, no
   heartbeat (``prefect.flow-run.heartbeat``, every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` s) and no state
   change for ``stale_after_s``; for a subflow, an ancestor already final or gone.
3. :func:`fail_orphaned_mlflow_runs`: a RUNNING MLflow run whose ``prefect_flow_run_id`` names a final
   flow run ends FAILED; so does a RUNNING nested run whose parent is no longer RUNNING; a PENDING logged
   model of a run that is no longer RUNNING is finalized FAILED.
4. :func:`ensure_zombie_automation`: the Prefect automation "flow run heartbeat missing -> CRASHED", so a
   dead run is crashed by the server itself even when nobody calls :func:`reconcile`.

:func:`watch_slot_waits` is the visible side: while a flow runs, a thread names each of its task runs that
waits for a slot, the tag, and who holds it (or that nobody does: then it frees the slot).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger, task

from tasks.data import LOCAL_TASK

ZOMBIE_AUTOMATION = "vecaf: crash flow runs whose heartbeat stopped"
"""Name of the automation :func:`ensure_zombie_automation` keeps (one per server)."""

RECONCILED_TAG = "vecaf.reconciled"
"""MLflow tag set on each run or logged model that reconciliation ended, with the reason."""

_ALIVE_STATES = ("RUNNING", "CANCELLING", "PENDING")
_FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlotUsage:
    """One ``tag:<tag>`` concurrency limit as the server counts it.

    Attributes:
        name: the V2 limit's name (``tag:gpu``).
        limit: how many slots it has.
        active: slots counted as taken.
        holders: task run ids holding a lease on it (the server's lease storage).
    """

    name: str
    limit: int
    active: int
    holders: tuple[str, ...]

    @property
    def tag(self) -> str:
        """The task tag (``gpu``)."""
        return self.name.removeprefix("tag:")

    @property
    def orphaned(self) -> int:
        """Slots counted as taken that no lease accounts for."""
        return max(0, self.active - len(self.holders))


@dataclass
class ReconcileReport:
    """What :func:`reconcile` changed (ids as strings).

    Attributes:
        freed_slots: ``{limit name: slots released}``.
        crashed_flow_runs: flow runs set to CRASHED, ``{id: reason}``.
        crashed_task_runs: task runs set to CRASHED.
        failed_mlflow_runs: MLflow runs ended FAILED, ``{run id: reason}``.
        failed_logged_models: logged models finalized FAILED.
        automation_id: the zombie automation (None when not asked for or not available).
        errors: steps that could not run, ``{step: message}`` (the other steps still ran).
    """

    freed_slots: dict[str, int] = field(default_factory=dict)
    crashed_flow_runs: dict[str, str] = field(default_factory=dict)
    crashed_task_runs: list[str] = field(default_factory=list)
    failed_mlflow_runs: dict[str, str] = field(default_factory=dict)
    failed_logged_models: list[str] = field(default_factory=list)
    automation_id: str | None = None
    errors: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for a log."""
        return (
            f"freed slots {self.freed_slots or 'none'}; crashed {len(self.crashed_flow_runs)} flow run(s) and "
            f"{len(self.crashed_task_runs)} task run(s); failed {len(self.failed_mlflow_runs)} MLflow run(s) and "
            f"{len(self.failed_logged_models)} logged model(s)"
            + (f"; errors: {self.errors}" if self.errors else "")
        )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _client() -> Any:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def slot_usage(client: Any) -> list[SlotUsage]:
    """The ``tag:*`` concurrency limits: slots counted as taken and the task runs holding a lease."""
    out = []
    offset = 0
    while True:
        page = client.read_global_concurrency_limits(limit=200, offset=offset)
        for gl in page:
            if not gl.name.startswith("tag:") or not gl.active:
                continue
            v1 = client.read_concurrency_limit_by_tag(gl.name.removeprefix("tag:"))
            holders = tuple(str(h) for h in (v1.active_slots or []))
            out.append(SlotUsage(name=gl.name, limit=int(gl.limit), active=int(gl.active_slots), holders=holders))
        if len(page) < 200:
            return out
        offset += 200


def free_orphaned_slots(client: Any, *, settle_s: float = 1.0) -> dict[str, int]:
    """Release the slots of ``tag:*`` limits that no lease accounts for (a server restart forgot them).

    A slot is counted orphaned only when two readings ``settle_s`` apart agree (a slot being acquired is
    counted a moment before its lease exists); the smaller count is released.

    Returns:
        ``{limit name: slots released}`` (empty when nothing was orphaned).
    """
    first = {u.name: u.orphaned for u in slot_usage(client) if u.orphaned}
    if not first:
        return {}
    time.sleep(settle_s)
    freed = {}
    for usage in slot_usage(client):
        count = min(first.get(usage.name, 0), usage.orphaned)
        if count:
            client.release_concurrency_slots(names=[usage.name], slots=count, occupancy_seconds=1.0)
            freed[usage.name] = count
    return freed


def _process_alive(run: Any) -> bool | None:
    """Whether the flow run's own process (``infrastructure_pid`` on this machine) still runs it."""
    import psutil

    try:
        pid = int(str(run.infrastructure_pid))
    except (TypeError, ValueError):
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return proc.environ().get("PREFECT__FLOW_RUN_ID") == str(run.id)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return None


def _last_heartbeat(client: Any, flow_run_id: Any, since: dt.datetime) -> dt.datetime | None:
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    page = client.read_events(
        filter=EventFilter(
            occurred=EventOccurredFilter(since=since),
            event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
        ),
        limit=1,
    )
    return max((e.occurred for e in page.events), default=None)


def _state_time(run: Any) -> dt.datetime:
    ts = run.state.timestamp if run.state is not None else run.created
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.timezone.utc)


def heartbeat_stale_after() -> float:
    """Seconds without heartbeat after which a run counts as gone: 3 periods + 10 s.

    The period is ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` (180 s by default in Prefect 3.9.1).
    """
    from prefect.settings import get_current_settings

    frequency = get_current_settings().flows.heartbeat_frequency or 180
    return 3.0 * frequency + 10.0


def crash_dead_flow_runs(
    client: Any, *, local_work_pool: str | None = None, stale_after_s: float | None = None
) -> tuple[dict[str, str], list[str]]:
    """Set CRASHED on each unfinished flow run whose process is gone, its subflows and its task runs.

    Args:
        client: a sync Prefect client.
        local_work_pool: the work pool whose worker runs on this machine: its runs' ``infrastructure_pid``
            is checked here (other runs are judged by heartbeat only).
        stale_after_s: seconds without heartbeat or state change after which a run counts as gone
            (default :func:`heartbeat_stale_after`).

    Returns:
        ``({flow run id: reason}, [task run ids])`` of what was set to CRASHED.
    """
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    stale = heartbeat_stale_after() if stale_after_s is None else float(stale_after_s)
    now = _now()
    unfinished = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(s) for s in _ALIVE_STATES]))
    runs = {str(r.id): r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(state=unfinished), limit=200)}
    verdict: dict[str, str | None] = {}  # run id -> reason it is gone, None when alive

    def parent_flow_run(run: Any) -> Any:
        if run.parent_task_run_id is None:
            return None
        parent_task = client.read_task_run(run.parent_task_run_id)
        if parent_task.flow_run_id is None:
            return None
        key = str(parent_task.flow_run_id)
        return runs.get(key) or client.read_flow_run(parent_task.flow_run_id)

    def judge(run: Any, depth: int = 0) -> str | None:
        key = str(run.id)
        if key in verdict:
            return verdict[key]
        reason = None
        if run.state is not None and run.state.type.value in _FINAL_STATES:
            reason = f"flow run {run.name} is {run.state.type.value}"
            verdict[key] = reason
            return reason
        parent = parent_flow_run(run) if depth < 20 else None
        if parent is not None:
            why = judge(parent, depth + 1)
            if why is not None:
                reason = f"its parent flow run {parent.name} is gone ({why})"
        if reason is None and local_work_pool and run.work_pool_name == local_work_pool and run.infrastructure_pid:
            if _process_alive(run) is False:
                reason = f"its process (pid {run.infrastructure_pid}) is gone"
        if reason is None and (now - _state_time(run)).total_seconds() > stale:
            since = now - dt.timedelta(seconds=stale)
            if _last_heartbeat(client, run.id, since) is None:
                reason = f"no heartbeat and no state change for {stale:.0f} s"
        verdict[key] = reason
        return reason

    crashed: dict[str, str] = {}
    for key, run in runs.items():
        reason = judge(run)
        if reason is None:
            continue
        message = f"reconciled: {reason}"
        client.set_flow_run_state(run.id, Crashed(message=message), force=True)
        crashed[key] = reason
    task_runs: list[str] = []
    if crashed:
        open_tasks = TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[uuid.UUID(k) for k in crashed]),
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType(s) for s in _ALIVE_STATES])),
        )
        while True:
            found = client.read_task_runs(task_run_filter=open_tasks, limit=200)
            batch = [t for t in found if str(t.id) not in task_runs]
            if not batch:
                break
            for tr in batch:
                message = f"reconciled: its flow run is gone ({crashed[str(tr.flow_run_id)]})"
                client.set_task_run_state(tr.id, Crashed(message=message), force=True)
                task_runs.append(str(tr.id))
    return crashed, task_runs


def _flow_run_state_type(client: Any, flow_run_id: str, cache: dict[str, str | None]) -> str | None:
    """The state type of a flow run (``"CRASHED"``...), None when it is not a flow run id of this server."""
    from prefect.exceptions import ObjectNotFound

    if flow_run_id not in cache:
        try:
            run = client.read_flow_run(uuid.UUID(flow_run_id))
            cache[flow_run_id] = None if run.state is None else run.state.type.value
        except (ValueError, ObjectNotFound):
            cache[flow_run_id] = None
    return cache[flow_run_id]


def fail_orphaned_mlflow_runs(tracking_uri: str, prefect_client: Any | None) -> tuple[dict[str, str], list[str]]:
    """End FAILED the MLflow runs left RUNNING by gone flow runs; finalize FAILED their PENDING models.

    Args:
        tracking_uri: the MLflow server.
        prefect_client: a sync Prefect client (None: only nested runs whose parent ended are looked at).

    Returns:
        ``({run id: reason}, [logged model ids])``.
    """
    from mlflow.entities import RunStatus, ViewType
    from mlflow.exceptions import MlflowException

    from tasks.tracking import mlflow_client, talking_to

    failed: dict[str, str] = {}
    models: list[str] = []
    with talking_to("MLflow tracking server", tracking_uri):
        client = mlflow_client(tracking_uri)
        experiment_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
        if not experiment_ids:
            return failed, models
        running = client.search_runs(experiment_ids, "attributes.status = 'RUNNING'", max_results=5000)
        states: dict[str, str | None] = {}

        def status_of(run_id: str) -> str:
            if run_id in failed:
                return "FAILED"
            try:
                return client.get_run(run_id).info.status
            except MlflowException:
                return "DELETED"

        def end(run: Any, reason: str) -> None:
            client.set_tag(run.info.run_id, RECONCILED_TAG, reason[:5000])
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
            failed[run.info.run_id] = reason

        for run in running:
            flow_run_id = run.data.tags.get("prefect_flow_run_id")
            if prefect_client is None or not flow_run_id:
                continue
            state = _flow_run_state_type(prefect_client, flow_run_id, states)
            if state in _FINAL_STATES:
                end(run, f"its Prefect flow run {flow_run_id} is {state}")
        for run in running:
            parent_id = run.data.tags.get("mlflow.parentRunId")
            if run.info.run_id in failed or not parent_id:
                continue
            parent_status = status_of(parent_id)
            if parent_status != "RUNNING":
                end(run, f"its parent run {parent_id} is {parent_status}")
        token = None
        while True:
            page = client.search_logged_models(experiment_ids, max_results=100, page_token=token)
            for model in page:
                if str(model.status) != "PENDING" or not model.source_run_id:
                    continue
                run_status = status_of(model.source_run_id)
                if run_status != "RUNNING":
                    client.set_logged_model_tags(
                        model.model_id, {RECONCILED_TAG: f"its run {model.source_run_id} is {run_status}"}
                    )
                    client.finalize_logged_model(model.model_id, "FAILED")
                    models.append(model.model_id)
            token = page.token
            if not token:
                break
    return failed, models


def ensure_zombie_automation(client: Any, *, within_s: float | None = None) -> str:
    """Create (once) the automation that sets CRASHED on a flow run whose heartbeat stopped.

    It fires for each flow run that sent a ``prefect.flow-run.heartbeat`` and then, within ``within_s``
    (default :func:`heartbeat_stale_after`), neither another heartbeat nor a final state.

    Returns:
        The automation's id.
    """
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    existing = client.read_automations_by_name(ZOMBIE_AUTOMATION)
    if existing:
        return str(existing[0].id)
    within = heartbeat_stale_after() if within_s is None else float(within_s)
    automation = AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description="A flow run whose process stopped sending heartbeats is marked CRASHED (zombie detection).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=dt.timedelta(seconds=within),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {within:.0f} s: the flow run's process is gone (zombie)",
            )
        ],
    )
    return str(client.create_automation(automation))


def reconcile(
    *,
    prefect_api_url: str | None = None,
    tracking_uri: str | None = None,
    local_work_pool: str | None = None,
    stale_after_s: float | None = None,
    automation: bool = True,
) -> ReconcileReport:
    """Free orphaned slots, crash dead flow runs, fail their MLflow runs and models; keep the zombie automation.

    Call it at ``vecaf stack up``, at ``deploy`` and at the start of each pipeline run. Each step is
    idempotent and leaves live runs alone; a step that fails is reported in ``errors`` and the next runs.

    Args:
        prefect_api_url: the Prefect API (None: the current Prefect settings', e.g. inside a flow run).
        tracking_uri: the MLflow server (None: MLflow is skipped).
        local_work_pool: the work pool whose worker runs on this machine (its runs' PIDs are checked).
        stale_after_s: seconds without heartbeat after which a run counts as gone.
        automation: also create the zombie automation when missing.

    Returns:
        A :class:`ReconcileReport`.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    report = ReconcileReport()
    scope = (
        temporary_settings(updates={PREFECT_API_URL: prefect_api_url}) if prefect_api_url else contextlib.nullcontext()
    )
    with scope, _client() as client:
        steps = [("slots", lambda: report.freed_slots.update(free_orphaned_slots(client)))]

        def crash() -> None:
            flows, tasks_ = crash_dead_flow_runs(client, local_work_pool=local_work_pool, stale_after_s=stale_after_s)
            report.crashed_flow_runs.update(flows)
            report.crashed_task_runs.extend(tasks_)

        steps.append(("flow runs", crash))
        if tracking_uri:

            def mlflow_step() -> None:
                runs, models = fail_orphaned_mlflow_runs(tracking_uri, client)
                report.failed_mlflow_runs.update(runs)
                report.failed_logged_models.extend(models)

            steps.append(("mlflow", mlflow_step))
        if automation:

            def automation_step() -> None:
                report.automation_id = ensure_zombie_automation(client)

            steps.append(("automation", automation_step))
        for name, step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - one broken step must not stop the others
                report.errors[name] = f"{type(exc).__name__}: {exc}"
    return report


@task(name="reconcile", **LOCAL_TASK)
def reconcile_task(tracking_uri: str, local_work_pool: str | None = None) -> dict[str, Any]:
    """Prefect task around :func:`reconcile` (this flow run's own Prefect API); logs what it changed."""
    report = reconcile(tracking_uri=tracking_uri, local_work_pool=local_work_pool)
    logger = get_run_logger()
    (logger.warning if report.errors else logger.info)("reconcile: %s", report.summary())
    return {
        "freed_slots": report.freed_slots,
        "crashed_flow_runs": report.crashed_flow_runs,
        "failed_mlflow_runs": report.failed_mlflow_runs,
        "failed_logged_models": report.failed_logged_models,
        "errors": report.errors,
    }


def _root_flow_run_id(client: Any, flow_run_id: Any, cache: dict[str, str]) -> str:
    key = str(flow_run_id)
    if key not in cache:
        run = client.read_flow_run(flow_run_id)
        root = key
        if run.parent_task_run_id is not None:
            parent_task = client.read_task_run(run.parent_task_run_id)
            if parent_task.flow_run_id is not None:
                root = _root_flow_run_id(client, parent_task.flow_run_id, cache)
        cache[key] = root
    return cache[key]


def slot_waits(client: Any, root_flow_run_id: str, *, waited_s: float = 30.0) -> list[str]:
    """Messages about the task runs of ``root_flow_run_id`` (and its subflows) waiting for a slot.

    A task run waits when it is PENDING for more than ``waited_s`` with a tag that has a concurrency limit
    whose slots are all taken. A slot counted as taken but held by nobody is freed on the spot.
    """
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterState, TaskRunFilterStateType
    from prefect.client.schemas.objects import StateType

    usages = {u.tag: u for u in slot_usage(client) if u.active >= u.limit}
    if not usages:
        return []
    pending = client.read_task_runs(
        task_run_filter=TaskRunFilter(
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.PENDING])),
        ),
        limit=200,
    )
    now = _now()
    roots: dict[str, str] = {}
    messages = []
    freed = False
    for tr in pending:
        tags = [t for t in tr.tags if t in usages]
        if not tags or tr.flow_run_id is None or (now - _state_time(tr)).total_seconds() < waited_s:
            continue
        if _root_flow_run_id(client, tr.flow_run_id, roots) != str(root_flow_run_id):
            continue
        for tag in tags:
            usage = usages[tag]
            holders = []
            for holder in usage.holders:
                try:
                    held = client.read_task_run(uuid.UUID(holder))
                    state = held.state.type.value if held.state else "?"
                    holders.append(f"task run {held.name} ({state}, flow run {held.flow_run_id})")
                except Exception:  # noqa: BLE001 - a name is a courtesy
                    holders.append(f"task run {holder}")
            held_by = "; ".join(holders) or "nobody"
            message = (
                f"task run {tr.name} waits for a {tag!r} slot ({usage.active}/{usage.limit} taken) since "
                f"{_state_time(tr).isoformat(timespec='seconds')}; held by {held_by}"
            )
            if usage.orphaned and not freed:
                released = free_orphaned_slots(client)
                freed = True
                if usage.name in released:
                    message += (
                        f"; freed {released[usage.name]} {tag!r} slot(s) held by nobody (a server restart lost "
                        "their leases)"
                    )
            messages.append(message)
    return messages


@contextlib.contextmanager
def watch_slot_waits(every_s: float = 30.0) -> Iterator[None]:
    """While the block runs in a flow, log (warning) every ``every_s`` which of its task runs wait for a slot.

    Uses the current flow run (its subflows included) and its run logger; outside a flow run it does nothing.
    """
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run = getattr(ctx, "flow_run", None)
    if run is None:
        yield
        return
    logger = get_run_logger()
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                with _client() as client:
                    for message in slot_waits(client, str(run.id), waited_s=every_s):
                        logger.warning(message)
            except Exception:  # noqa: BLE001 - the watch must never break the flow it watches
                _log.debug("slot watch failed", exc_info=True)

    import contextvars

    thread = threading.Thread(target=contextvars.copy_context().run, args=(loop,), daemon=True, name="slot-watch")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
