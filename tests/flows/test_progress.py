"""Progress artifacts (``tasks/progress.py``) and the CLI's view of them (``infra/progress.py``) on a real
Prefect server (the session stack).

A small flow with a subflow runs in this process: the subflow tracks 4 shards through a task per shard and
reports two loops of selection and training through the engine's callback objects. Read back from the
Prefect API, every artifact sits on the top-level run (none on the subflow), each shard task saw the share
of the shards finished before it (0, 25, 50, 75 %: worked by hand), and every step ends at 100.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from tasks.progress import LoopProgress, StepProgress, percent, progress_key, report, track_shards

pytestmark = [pytest.mark.integration]


def test_percent_and_keys_by_hand():
    assert percent(1, 4) == 25.0 and percent(3, 3) == 100.0
    assert percent(0, 0) == 100.0  # nothing to do is done
    assert percent(5, 4) == 100.0 and percent(-1, 4) == 0.0
    assert progress_key("embed") == "embed-progress"
    with pytest.raises(ValueError, match="unknown progress step 'bogus'; known: pipeline, caption"):
        progress_key("bogus")


def test_outside_a_run_nothing_is_reported():
    assert report("caption", 1, 2, "shards") is None
    progress = StepProgress("caption", 2, "shards")
    assert list(progress.track([10, 20])) == [10, 20] and progress.done == 2


def _artifacts(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found if a.key}


@pytest.fixture(scope="module")
def ran(stack):
    """Run the parent flow once on the session stack; its state, its subflow's id and what the steps saw."""
    from prefect import flow, task
    from prefect.settings import PREFECT_API_URL, temporary_settings

    seen: list[float] = []
    loops_seen: list[tuple[float, float]] = []

    def now(root_id: str, key: str) -> float:
        return float(_artifacts(root_id)[key].data)

    @task
    def shard(i: int, root_id: str) -> int:
        seen.append(now(root_id, "caption-progress"))
        return i

    @flow
    def steps(root_id: str) -> str:
        from prefect.runtime import flow_run

        (bounds,) = track_shards("caption", [0, 1, 2, 3])
        [shard(i, root_id) for i in bounds]
        images, texts = track_shards("embed", [0, 1], [])
        [shard(i, root_id) for i in images] + [shard(i, root_id) for i in texts]
        for loop in range(2):  # as tasks/training.py drives it: one object per loop task, engine callbacks
            loops = LoopProgress(2, 10, loop)
            if loop == 0:
                loops.on_eval(SimpleNamespace(loop=-1, batches=0))  # the evaluation before training
            loops.on_eval(SimpleNamespace(loop=loop, batches=5 * loop + 2))
            loops_seen.append((now(root_id, "select-progress"), now(root_id, "train-progress")))
            loops.on_loop_end(SimpleNamespace(loop=loop, end_batches=5 * (loop + 1)))
            loops_seen.append((now(root_id, "select-progress"), now(root_id, "train-progress")))
        return str(flow_run.id)

    @flow
    def parent() -> str:
        from prefect.runtime import flow_run

        return steps(str(flow_run.id))

    patch = pytest.MonkeyPatch()
    for key, value in stack.env.items():
        patch.setenv(key, value)
    try:
        with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api_url}):
            state = parent(return_state=True)
            yield SimpleNamespace(
                state=state, root=state.state_details.flow_run_id, child=state.result(), seen=seen,
                loops_seen=loops_seen,
            )  # fmt: skip
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=30)
            EventsWorker.drain_all(timeout=30)
    finally:
        patch.undo()


def test_every_step_ends_at_100_on_the_top_level_run(ran):
    assert ran.state.is_completed(), ran.state.message
    arts = _artifacts(ran.root)
    assert {k: float(a.data) for k, a in arts.items()} == {
        "caption-progress": 100.0, "embed-progress": 100.0, "select-progress": 100.0, "train-progress": 100.0,
    }  # fmt: skip
    assert all(a.type == "progress" for a in arts.values())
    assert arts["caption-progress"].description == "caption: 4/4 shards"
    assert arts["embed-progress"].description == "embed: 2/2 shards"
    assert arts["select-progress"].description == "select: 2/2 loops"
    assert arts["train-progress"].description == "train: 10/10 batches"
    assert _artifacts(ran.child) == {}  # the subflow's progress is on the run a user opens


def test_a_shard_counts_once_its_task_returned(ran):
    # the caption tasks saw 0, 1, 2, 3 of 4 shards finished; the embed tasks saw the caption step complete
    assert ran.seen == [0.0, 25.0, 50.0, 75.0, 100.0, 100.0]


def test_selection_counts_loops_and_training_counts_batches(ran):
    # (select %, train %) after loop 1's first evaluation (1/2 loops chosen, 2/10 batches), its end (5/10),
    # loop 2's evaluation (2/2, 7/10) and its end (10/10)
    assert ran.loops_seen == [(50.0, 20.0), (50.0, 50.0), (100.0, 70.0), (100.0, 100.0)]


def test_the_cli_shows_plain_lines_off_a_terminal_and_bars_on_one(ran):
    from prefect.client.orchestration import get_client
    from rich.console import Console

    from infra.progress import RunProgress, read_progress

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(ran.root)
    assert list(read_progress(run.id)) == ["caption-progress", "embed-progress", "select-progress", "train-progress"]
    out = io.StringIO()
    console = Console(file=out, width=200)
    assert not console.is_terminal
    with RunProgress(console) as display:
        display(run)
        display(run)  # nothing changed: nothing more printed
    lines = out.getvalue().splitlines()
    assert len(lines) == 5, lines
    assert lines[0].endswith(f"flow run {run.name}: Completed")
    assert lines[1].endswith("caption  100% (caption: 4/4 shards)")
    assert lines[4].endswith("train    100% (train: 10/10 batches)")
    tty = Console(file=io.StringIO(), width=200, force_terminal=True)
    with RunProgress(tty) as bars:
        bars(run)
        tasks = {t.description: t for t in bars.bars.tasks}
    assert set(tasks) == {"run", "caption", "embed", "select", "train"}
    assert all(t.completed == 100.0 for name, t in tasks.items() if name != "run")
    assert tasks["train"].fields["note"] == "10/10 batches"
