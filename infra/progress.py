"""What `vecaf run` and `vecaf demo` show while they wait for a flow run: its state and its progress.

The flow run's progress artifacts (``tasks/progress.py``: ``pipeline``, ``caption``, ``embed``, ``select``,
``train``, each 0-100 % with a description such as ``train: 150/300 batches``) are read at every poll. On a
terminal they are rich progress bars under a line with the run's state; elsewhere (a CI log, a pipe) one
plain line is printed per change, so logs stay readable and grep-able:

    [  42.0 s] flow run fancy-dog: Running
    [  57.1 s] caption  50% (caption: 1/2 shards)

Reading progress never fails the wait: an unreachable API only leaves the display as it was.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from tasks.progress import STEPS, progress_key

_log = logging.getLogger(__name__)
_ORDER = {progress_key(step): i for i, step in enumerate(STEPS)}
"""Display order: the pipeline's own bar first, then the steps in the order they run."""


def latest_artifacts(flow_run_id: Any, *, kind: str | None = None) -> dict[str, Any]:
    """The newest artifact of each key that a flow run holds (key -> artifact; ``kind``: only that type)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    wanted = ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
        type=None if kind is None else ArtifactFilterType(any_=[kind]),
    )
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=wanted)
    return {a.key: a for a in sorted(found, key=lambda a: a.updated or a.created) if a.key}


def read_progress(flow_run_id: Any) -> dict[str, tuple[float, str]]:
    """``{artifact key: (percent, description)}`` of a flow run's progress artifacts (current Prefect API)."""
    out = {
        key: (float(a.data or 0.0), a.description or "")
        for key, a in latest_artifacts(flow_run_id, kind="progress").items()
    }
    return dict(sorted(out.items(), key=lambda kv: (_ORDER.get(kv[0], len(_ORDER)), kv[0])))


class RunProgress:
    """An ``on_poll`` callback for ``flows.deploy.wait_for_run`` that shows the run's state and progress.

    Args:
        console: the rich console to write to.
        live: rich bars (default: when the console is a terminal); else plain lines, one per change.
        show_state: also show the run's state (off when another display prints it).
    """

    def __init__(self, console: Any, *, live: bool | None = None, show_state: bool = True) -> None:
        self.console = console
        self.live = console.is_terminal if live is None else live
        self.show_state = show_state
        self.start = time.monotonic()
        self.state = ""
        self.shown: dict[str, tuple[float, str]] = {}
        self.bars: Any = None
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> RunProgress:
        if self.live:
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

            self.bars = Progress(
                TextColumn("{task.description:<10}"), BarColumn(), TaskProgressColumn(),
                TextColumn("[dim]{task.fields[note]}"), console=self.console,
            )  # fmt: skip
            self.bars.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bars is not None:
            self.bars.stop()

    def __call__(self, run: Any) -> None:
        state = run.state.name if run.state is not None else "?"
        if self.show_state and state != self.state:
            self._state(run.name, state)
        self.state = state
        try:
            progress = read_progress(run.id)
        except Exception as exc:  # noqa: BLE001 - a display must not end the wait
            _log.debug("progress of %s not read: %s", run.id, exc)
            return
        for key, (value, note) in progress.items():
            if self.shown.get(key) != (value, note):
                self._progress(key, value, note)
                self.shown[key] = (value, note)

    def _state(self, name: str, state: str) -> None:
        if self.bars is None:
            self.console.print(f"[{self._t()}] flow run {name}: {state}", highlight=False, markup=False)
            return
        if "state" not in self.tasks:
            self.tasks["state"] = self.bars.add_task("run", total=None, note="")
        self.bars.update(self.tasks["state"], note=f"{name}: {state}")

    def _progress(self, key: str, value: float, note: str) -> None:
        label = key.removesuffix("-progress")
        detail = note.split(": ", 1)[-1]
        if self.bars is None:
            line = f"[{self._t()}] {label:<8} {value:3.0f}% ({note})"
            self.console.print(line, highlight=False, markup=False)
            return
        if key not in self.tasks:
            self.tasks[key] = self.bars.add_task(label, total=100.0, note="")
        self.bars.update(self.tasks[key], completed=value, note=detail)

    def _t(self) -> str:
        return f"{time.monotonic() - self.start:6.1f} s"


def wait_with_progress(
    settings: Any,
    flow_run_id: Any,
    console: Any,
    *,
    timeout: float | None = None,
    on_poll: Callable[[Any], None] | None = None,
    show_state: bool = True,
    live: bool | None = None,
    poll_s: float = 3.0,
) -> Any:
    """``flows.deploy.wait_for_run`` with :class:`RunProgress` on ``console`` (after ``on_poll``, if given).

    Returns:
        The final ``FlowRun``.

    Raises:
        TimeoutError: as ``wait_for_run``.
    """
    from flows.deploy import wait_for_run

    with RunProgress(console, live=live, show_state=show_state) as display:

        def poll(run: Any) -> None:
            if on_poll is not None:
                on_poll(run)
            display(run)

        return wait_for_run(settings, flow_run_id, timeout=timeout, on_poll=poll, poll_s=poll_s)
