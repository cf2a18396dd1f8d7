"""Progress of the pipeline's long steps as Prefect progress artifacts on the top-level flow run.

One artifact per step, keyed ``<step>-progress`` (the pipeline's own ``pipeline``, then ``caption``,
``embed``, ``select``, ``train``): its value is 100 * done / total (percent) and its description says what was
counted (``3/4 shards``, ``loop 2/3``, ``150/300 batches``). The artifact lives on the *top-level* run (the
``vecaf-pipeline`` run when the step is its subflow, else the step's own run), so the page a user opens, and
``vecaf run``'s progress bars (``infra/progress.py``), show every step. A task on another worker finds the
same artifact by its key and run, so any process may move it.

Outside a Prefect run, or when the API cannot be reached, nothing is reported: progress is a view, never a
reason for a step to fail.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

STEPS = ("pipeline", "caption", "embed", "select", "train")
"""The steps that report progress; the artifact key of step ``s`` is ``s-progress``."""

_log = logging.getLogger(__name__)
_ROOTS: dict[str, str] = {}
_IDS: dict[tuple[str, str], Any] = {}


def progress_key(step: str) -> str:
    """The artifact key of a step (``caption`` -> ``caption-progress``).

    Raises:
        ValueError: a step not in :data:`STEPS`.
    """
    if step not in STEPS:
        raise ValueError(f"unknown progress step {step!r}; known: {', '.join(STEPS)}")
    return f"{step}-progress"


def percent(done: float, total: float) -> float:
    """100 * done / total, clipped to [0, 100]; a step with nothing to do (total 0) is complete."""
    if total <= 0:
        return 100.0
    return min(100.0, max(0.0, 100.0 * done / total))


def current_flow_run_id() -> str | None:
    """The flow run this code runs in (also inside a task run), or None outside Prefect."""
    from prefect.context import FlowRunContext, TaskRunContext

    task_ctx = TaskRunContext.get()
    if task_ctx is not None and task_ctx.task_run.flow_run_id is not None:
        return str(task_ctx.task_run.flow_run_id)
    flow_ctx = FlowRunContext.get()
    run = getattr(flow_ctx, "flow_run", None)
    return None if run is None else str(run.id)


def top_level_run_id(client: Any, flow_run_id: str) -> str:
    """The outermost flow run above ``flow_run_id`` (following subflow parents; itself when it has none)."""
    if flow_run_id in _ROOTS:
        return _ROOTS[flow_run_id]
    run = client.read_flow_run(flow_run_id)
    for _ in range(10):
        if run.parent_task_run_id is None:
            break
        parent = client.read_task_run(run.parent_task_run_id)
        if parent.flow_run_id is None:
            break
        run = client.read_flow_run(parent.flow_run_id)
    _ROOTS[flow_run_id] = str(run.id)
    return _ROOTS[flow_run_id]


def report(step: str, done: float, total: float, note: str) -> float | None:
    """Set step ``step``'s progress artifact on the top-level run to ``percent(done, total)``.

    Creates the artifact on the first report of the run (or finds it by key when another process created
    it), updates it afterwards.

    Args:
        step: one of :data:`STEPS`.
        done: units finished.
        total: units in all.
        note: what the units are, for the description (e.g. ``"shards"``, ``"batches (loop 2/3)"``).

    Returns:
        The value set, or None when nothing was reported (outside a Prefect run, or the API failed).
    """
    key = progress_key(step)
    value = percent(done, total)
    flow_run_id = current_flow_run_id()
    if flow_run_id is None:
        return None
    description = f"{step}: {_count(done)}/{_count(total)} {note}"
    try:
        _write(flow_run_id, key, value, description)
    except Exception as exc:  # noqa: BLE001 - a progress view must not fail the step it watches
        _log.warning("progress %s not reported: %s", key, exc)
        return None
    return value


def _count(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _write(flow_run_id: str, key: str, value: float, description: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        root = top_level_run_id(client, flow_run_id)
        artifact_id = _IDS.get((root, key))
        if artifact_id is None:
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[root]), key=ArtifactFilterKey(any_=[key])
                ),
                limit=1,
            )
            if found:
                artifact_id = found[0].id
            else:
                created = client.create_artifact(
                    ArtifactCreate(key=key, type="progress", data=value, description=description, flow_run_id=root)
                )
                _IDS[(root, key)] = created.id
                return
            _IDS[(root, key)] = artifact_id
        client.update_artifact(artifact_id, ArtifactUpdate(data=value, description=description))


class StepProgress:
    """Counts a step's units and reports after each one (see :func:`report`).

    Args:
        step: one of :data:`STEPS`.
        total: units in all.
        note: what a unit is (``"shards"``).
        start: report 0 % now, so the bar shows before the first unit ends.
    """

    def __init__(self, step: str, total: int, note: str, *, start: bool = True) -> None:
        progress_key(step)
        self.step, self.total, self.note, self.done = step, total, note, 0
        if start:
            report(step, 0, total, note)

    def advance(self, units: int = 1) -> None:
        """``units`` more finished; report."""
        self.done += units
        report(self.step, self.done, self.total, self.note)

    def track(self, items: Iterable[T]) -> Iterator[T]:
        """Yield ``items``; each counts as finished when the next one is asked for (or the iteration ends),
        so a comprehension that calls a task per item advances after each call returns."""
        for item in items:
            yield item
            self.advance()


def track_shards(step: str, *groups: list[T]) -> tuple[Iterator[T], ...]:
    """One :class:`StepProgress` over all ``groups`` of shard bounds (e.g. image and text shards); returns one
    tracking iterator per group, in order."""
    progress = StepProgress(step, sum(len(g) for g in groups), "shards")
    return tuple(progress.track(g) for g in groups)


class LoopProgress:
    """Selection and training progress of a run of L loops and B batches, as engine callbacks.

    ``select`` counts loops whose subset is chosen (loop l's selection is done when its first evaluation, or
    its end, arrives); ``train`` counts batches trained over the whole budget B. Pass the object in the
    engine's ``callbacks`` (it has ``on_eval`` and ``on_loop_end``).

    Args:
        loops: L.
        batch_budget: B.
        loop: the 0-based loop this process trains (earlier loops count as done; loop 0 reports 0 % at once).
    """

    def __init__(self, loops: int, batch_budget: int, loop: int) -> None:
        self.loops, self.budget, self.loop = loops, batch_budget, loop
        self.selected = loop
        if loop == 0:
            report("select", 0, loops, "loops")
            report("train", 0, batch_budget, "batches")

    def on_eval(self, point: Any) -> None:
        if point.loop < 0:
            return
        if point.loop + 1 > self.selected:
            self.selected = point.loop + 1
            report("select", self.selected, self.loops, "loops")
        report("train", point.batches, self.budget, "batches")

    def on_loop_end(self, record: Any) -> None:
        if record.loop + 1 > self.selected:
            self.selected = record.loop + 1
            report("select", self.selected, self.loops, "loops")
        report("train", record.end_batches, self.budget, "batches")

    def stored(self, end_batches: int) -> None:
        """The loop was already stored (a resumed run): its selection and batches count as done."""
        self.on_loop_end(_Done(self.loop, end_batches))


class _Done:
    def __init__(self, loop: int, end_batches: int) -> None:
        self.loop, self.end_batches = loop, end_batches
