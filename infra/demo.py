"""``make demo`` / ``vecaf demo``: the whole product on the embedded defaults, through the real servers.

The demo is two simulated days of recurring finetuning (``infra/simulate.py``, its :func:`run_days`):

1. Start the stack (S3, MLflow, Prefect server, worker) unless it is already up.
2. Deploy the flows (``flows/deploy.py``); the scheduled pipeline deployment gets the demo's parameters, so
   its nightly run retrains on the demo's folder (a no-op until new images arrive).
3. Day 1: half of the demo's Fashion-MNIST pool lands as PNGs in ``<state_dir>/demo/pool``; the worker runs
   ``vecaf-pipeline/production`` (triggered through Prefect, visible in the UI): EfficientNet-Lite0
   (frozen, ``head`` mode), the ImageNet-label captioner and MiniLM, VeCAF selection with CEA; the first
   model becomes champion. Each task is printed as it finishes, and the run's progress artifacts as bars
   (``infra/progress.py``).
4. Day 2: the other half lands; only it is captioned and embedded; training warm-starts from the champion
   (loop 1 selects with the champion's losses); the promote flow decides whether the new model replaces it.
5. Print the days (pool, new images, per-loop top-1, the decisions) and the last run's summary (registered
   model version and aliases, MLflow and Prefect URLs, S3 locations); write it to
   ``<state_dir>/demo/summary.json``.

The stack stays up for exploring (``vecaf stack down`` / ``make stop`` stops it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from vecaf.settings import Settings

DEMO_DEFAULTS: dict[str, Any] = {
    "pool_size": 3000,
    "test_size": 1000,
    "image_size": 64,
    "ratio": 0.01,
    "loops": 3,
    "batch_budget": 300,
    "batch_size": 32,
    "lr": 5e-4,
    "mode": "head",
    "method": "vecaf",
}
"""The pool over both days (half a day), the held-out split, and each day's training."""
DEMO_DAYS = 2


def demo_config(
    *,
    pool_size: int = DEMO_DEFAULTS["pool_size"],
    test_size: int = DEMO_DEFAULTS["test_size"],
    image_size: int = DEMO_DEFAULTS["image_size"],
    ratio: float = DEMO_DEFAULTS["ratio"],
    loops: int = DEMO_DEFAULTS["loops"],
    batch_budget: int = DEMO_DEFAULTS["batch_budget"],
    mode: str = DEMO_DEFAULTS["mode"],
    method: str = DEMO_DEFAULTS["method"],
    ood_prompt: str | None = None,
    timeout: float = 3600.0,
) -> Any:
    """The demo as a two-day simulation (``infra.simulate.SimConfig``) on the production model: no late
    classes, no snow, no objective change, no shadow; the champion's score is the promotion's held-out top-1.

    Raises:
        ValueError: a size that does not fit (e.g. a pool smaller than two images per class a day).
        pydantic.ValidationError: a training parameter out of range (checked on the day's parameters).
    """
    from flows.params import RegistryParams
    from infra.simulate import Folders, day_parameters, simulation_config

    if pool_size < 2 * DEMO_DAYS * 10 or test_size < 10:
        raise ValueError(f"the demo needs pool_size >= {2 * DEMO_DAYS * 10} and test_size >= 10 (10 classes)")
    registry = RegistryParams()
    config = simulation_config(
        DEMO_DAYS, shadow=False, per_day=pool_size // DEMO_DAYS, holdout_per_class=test_size // 10, fixed_per_class=0,
        image_size=image_size, ratio=ratio, loops=loops, batch_budget=batch_budget,
        batch_size=DEMO_DEFAULTS["batch_size"], lr=DEMO_DEFAULTS["lr"], late_day=None, snow_day=None,
        objective_day=None, model_name=registry.model_name, experiment=registry.experiment, fresh=False, mode=mode,
        method=method, ood_prompt=ood_prompt, folder="demo", timeout_s=timeout,
    )  # fmt: skip
    day_parameters(config, 1, Folders(Path(".")), [])  # a training parameter out of range fails here
    return config


class _Progress:
    """Prints each task and subflow of a flow run once it reaches a final state."""

    def __init__(self, console: Any, flow_run_id: Any, start: float) -> None:
        self.console = console
        self.root = flow_run_id  # None: the flow run polled first
        self.start = start
        self.done: set[Any] = set()
        self.flows: dict[Any, str] = {}
        self.last_state = ""

    def __call__(self, run: Any) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterId,
            FlowRunFilterParentFlowRunId,
            TaskRunFilter,
            TaskRunFilterFlowRunId,
        )

        self.root = self.root or run.id
        state = run.state.name if run.state else "?"
        if state != self.last_state:
            self.console.print(f"[dim]{self._t()}[/] vecaf-pipeline run [bold]{run.name}[/]: {state}")
            self.last_state = state
        with get_client(sync_client=True) as client:
            subflows = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[self.root]))
            )
            for sub in subflows:
                if sub.id not in self.flows:
                    name = client.read_flow(sub.flow_id).name
                    self.flows[sub.id] = name
                    self.console.print(f"[dim]{self._t()}[/] [cyan]{name}[/] started")
            ids = [self.root, *self.flows]
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)),
                task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=ids)),
                limit=200,
            )
        for tr in sorted(tasks, key=lambda t: t.start_time or t.expected_start_time or 0):
            if tr.id in self.done or tr.state is None or not tr.state.is_final() or tr.flow_run_id == self.root:
                continue
            self.done.add(tr.id)
            took = f"{tr.total_run_time.total_seconds():.1f} s" if tr.total_run_time else ""
            colour = "green" if tr.state.is_completed() else "red"
            flow = self.flows.get(tr.flow_run_id, "")
            self.console.print(f"[dim]{self._t()}[/]   {flow} › {tr.name} [{colour}]{tr.state.name}[/] {took}")

    def _t(self) -> str:
        return f"{time.monotonic() - self.start:6.1f} s"


def collect_summary(settings: Settings, flow_run: Any) -> dict[str, Any]:
    """What the pipeline run produced, read back from MLflow, the registry and the bucket.

    Args:
        settings: the settings (stack URLs, bucket).
        flow_run: the ``vecaf-pipeline`` Prefect flow run.

    Returns:
        ``{"flow_run_url", "mlflow_run_url", "run_id", "loops": [{"loop", "selected", "top1"}], "final_top1",
        "model": {"name", "version", "aliases", "decision"}, "s3": {"model", "run_artifacts", "objects"}}``.
    """
    from flows.runtime import flow_run_url
    from infra.stack import s3_client, stack_urls
    from tasks.tracking import (
        mlflow_client,
        mlflow_logged_model_url,
        mlflow_model_version_url,
        mlflow_run_url,
        mlflow_ui_url,
        s3_location,
    )

    urls = stack_urls(settings)
    client = mlflow_client(urls["mlflow_url"])
    runs = client.search_runs(
        experiment_ids=[e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.prefect_pipeline_run_id = '{flow_run.id}'",
    )
    if not runs:
        raise RuntimeError(f"no MLflow run is tagged with the Prefect flow run {flow_run.id}")
    run = runs[0]
    run_id = run.info.run_id
    top1 = {int(m.step): m.value for m in client.get_metric_history(run_id, "loop_top1")}
    selected = {int(m.step): m.value for m in client.get_metric_history(run_id, "loop_selected")}
    loops = [{"loop": k, "selected": int(selected.get(k, 0)), "top1": top1[k]} for k in sorted(top1)]
    name = run.data.tags.get("registered_model")
    version = run.data.tags.get("registered_version")
    model: dict[str, Any] = {"name": name, "version": version, "aliases": [], "decision": None}
    if name and version:
        mv = client.get_model_version(name, version)
        model["aliases"] = sorted(mv.aliases)
        model["decision"] = mv.tags.get("promotion.decision")
        model["reason"] = mv.tags.get("promotion.reason")
        model["heldout_top1"] = mv.tags.get("promotion.challenger_top1")
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id='{run_id}'")
    model_id = models[0].model_id if models else None
    model_artifacts = run.data.tags.get("model_artifact_uri")
    model_s3 = s3_location(model_artifacts, settings.stack.bucket) if model_artifacts else None
    run_s3 = s3_location(run.info.artifact_uri, settings.stack.bucket)
    counts: dict[str, int] = {}
    s3 = s3_client(settings)
    for label, uri in (("model", model_s3), ("run_artifacts", run_s3)):
        if not uri:
            continue
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
        counts[label] = sum(len(p.get("Contents", [])) for p in pages)
    return {
        "flow_run_id": str(flow_run.id),
        "flow_run_url": flow_run_url(urls["prefect_ui_url"], str(flow_run.id)),
        "flow_run_state": flow_run.state.name if flow_run.state else None,
        "run_id": run_id,
        "mlflow_run_url": mlflow_run_url(urls["mlflow_url"], run.info.experiment_id, run_id),
        "mlflow_figures_url": mlflow_ui_url(
            urls["mlflow_url"], f"experiments/{run.info.experiment_id}/runs/{run_id}/artifacts"
        ),
        "mlflow_model_url": (
            mlflow_logged_model_url(urls["mlflow_url"], run.info.experiment_id, model_id) if model_id else None
        ),
        "mlflow_version_url": mlflow_model_version_url(urls["mlflow_url"], name, version) if name and version else None,
        "flow_run_summary_url": flow_run_url(urls["prefect_ui_url"], str(flow_run.id)) + "?tab=Artifacts",
        "loops": loops,
        "final_top1": run.data.metrics.get("final_test_top1"),
        "model": model,
        "s3": {"model": model_s3, "run_artifacts": run_s3, "objects": counts},
    }


def print_summary(console: Any, summary: dict[str, Any]) -> None:
    """The summary as rich tables."""
    from rich.table import Table

    loops = Table(title="Test accuracy per loop", title_justify="left")
    loops.add_column("loop", justify="right")
    loops.add_column("selected", justify="right")
    loops.add_column("test top-1", justify="right")
    for row in summary["loops"]:
        loops.add_row(str(row["loop"]), str(row["selected"]), f"{row['top1']:.4f}")
    console.print(loops)
    m = summary["model"]
    where = Table(show_header=False, title="Where to look", title_justify="left")
    where.add_column(style="bold")
    where.add_column(overflow="fold")
    aliases = ", ".join(f"@{a}" for a in m["aliases"]) or "none"
    where.add_row("registered model", f"{m['name']} version {m['version']} ({aliases})")
    if m.get("decision"):
        where.add_row("promotion", f"{m['decision']}: {m.get('reason')}")
    if summary.get("final_top1") is not None:
        where.add_row("final held-out top-1", f"{summary['final_top1']:.4f}")
    where.add_row("MLflow run", summary["mlflow_run_url"])
    if summary.get("mlflow_figures_url"):
        where.add_row("figures and model card", summary["mlflow_figures_url"])
    if summary.get("mlflow_version_url"):
        where.add_row("registered version", summary["mlflow_version_url"])
    if summary.get("mlflow_model_url"):
        where.add_row("logged model", summary["mlflow_model_url"])
    where.add_row("Prefect flow run", summary["flow_run_url"])
    if summary.get("flow_run_summary_url"):
        where.add_row("pipeline summary", summary["flow_run_summary_url"])
    objects = summary["s3"]["objects"]
    where.add_row("model files (S3)", f"{summary['s3']['model']}  ({objects.get('model', 0)} objects)")
    run_artifacts = f"{summary['s3']['run_artifacts']}  ({objects.get('run_artifacts', 0)} objects)"
    where.add_row("run artifacts (S3)", run_artifacts)
    console.print(where)


def run_demo(
    settings: Settings,
    *,
    pool_size: int = DEMO_DEFAULTS["pool_size"],
    ratio: float = DEMO_DEFAULTS["ratio"],
    test_size: int = DEMO_DEFAULTS["test_size"],
    loops: int = DEMO_DEFAULTS["loops"],
    batch_budget: int = DEMO_DEFAULTS["batch_budget"],
    mode: str = DEMO_DEFAULTS["mode"],
    method: str = DEMO_DEFAULTS["method"],
    image_size: int = DEMO_DEFAULTS["image_size"],
    ood_prompt: str | None = None,
    timeout: float = 3600.0,
    console: Any = None,
) -> dict[str, Any]:
    """Stack up, deploy, two simulated days through the pipeline deployment; print and return the summary.

    Returns:
        The last day's :func:`collect_summary`, with ``"days"`` (each day's pool, loops, decision, champion)
        and ``"seconds"``.

    Raises:
        pydantic.ValidationError: a parameter out of range (before anything starts).
        ValueError: sizes that do not fit (before anything starts).
        RuntimeError: a pipeline run did not complete (its state is named; see the worker's log).
    """
    from rich.table import Table

    from flows.deploy import PIPELINE_DEPLOYMENT, deploy
    from infra.simulate import Folders, day_parameters, run_days, wide_console
    from infra.stack import stack_urls, state_dir, up

    console = console or wide_console()
    config = demo_config(
        pool_size=pool_size, test_size=test_size, image_size=image_size, ratio=ratio, loops=loops,
        batch_budget=batch_budget, mode=mode, method=method, ood_prompt=ood_prompt, timeout=timeout,
    )  # fmt: skip
    t0 = time.monotonic()
    console.rule("[bold]VeCAF pipeline demo: two days of recurring finetuning")
    console.print(
        f"Fashion-MNIST arrives in {DEMO_DAYS} daily drops of {config.per_day} images (held-out {test_size}); "
        f"EfficientNet-Lite0 at {image_size} px ({mode} mode), ImageNet-label captions, MiniLM text embeddings; "
        f"each day {method} selects {ratio:.1%} of the pool in each of {loops} loops, {batch_budget} training "
        "batches, starting from the champion when there is one."
    )
    console.print("[bold]1.[/] Starting the stack (S3, MLflow, Prefect server, worker)...")
    statuses = up(settings)
    table = Table(show_header=True)
    for col in ("server", "url", "state"):
        table.add_column(col)
    for s in statuses:
        table.add_row(s.name, s.url, s.detail)
    console.print(table)
    console.print(
        "[bold]2.[/] Deploying the flows (production pipeline on a cron schedule over the demo's folder, "
        "vecaf-pipeline/experiment for one-off runs, promote on demand)..."
    )
    folders = Folders(state_dir(settings) / config.folder)
    scheduled = day_parameters(config, DEMO_DAYS, folders, [])
    for name in deploy(settings, pipeline_parameters=scheduled.flow_parameters()):
        console.print(f"   deployed {name}")
    console.print(f"[bold]3.[/] Two days, each a run of vecaf-pipeline/{PIPELINE_DEPLOYMENT} on the worker:")
    start = time.monotonic()

    def progress(day: int, lane: str) -> Any:
        return _Progress(console, None, start)

    try:
        result = run_days(settings, config, console=console, on_poll=progress)
    except TimeoutError as exc:
        raise RuntimeError(str(exc)) from exc
    except RuntimeError as exc:
        log = state_dir(settings) / "logs" / "worker.log"
        raise RuntimeError(f"{exc}; see the Prefect UI and {log}") from exc
    console.print(f"[bold]4.[/] Done in {time.monotonic() - start:.0f} s.")
    days = [demo_day(d) for d in result["days"]]
    print_days(console, days)
    summary = dict(result["days"][-1]["vecaf"]["summary"])
    summary["days"] = days
    summary["seconds"] = {"pipeline": round(time.monotonic() - start, 1), "total": round(time.monotonic() - t0, 1)}
    print_summary(console, summary)
    out = state_dir(settings) / "demo" / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1, default=str))
    console.print(f"Summary written to {out}.")
    urls = stack_urls(settings)
    console.print(
        f"The stack stays up: Prefect UI {urls['prefect_ui_url']} (log in with PREFECT_API_AUTH_STRING of `vecaf stack "
        f"env`), MLflow UI {urls['mlflow_url']}/#/?workflowType=machine_learning. "
        "Stop it with `make stop` (or `vecaf stack down`)."
    )
    return summary


def demo_day(day: dict[str, Any]) -> dict[str, Any]:
    """What the demo keeps of a simulated day: pool, start, per-loop top-1, decision, champion."""
    run = day["vecaf"]
    top1 = [r["top1"] for r in run.get("loops") or []]
    return {
        "day": day["day"], "pool": run["pool"], "init_used": run.get("init_used"),
        "init_reason": run.get("init_reason"),
        "loops": run.get("loops") or [], "loop_top1_non_decreasing": all(b >= a for a, b in zip(top1, top1[1:])),
        "version": run.get("version"), "decision": run.get("decision"), "reason": run.get("reason"),
        "champion_version": run.get("champion_version"), "champion_top1": run.get("top1"), "seconds": day["seconds"],
        "flow_run_url": run.get("flow_run_url"), "mlflow_run_url": run.get("mlflow_run_url"),
    }  # fmt: skip


def print_days(console: Any, days: list[dict[str, Any]]) -> None:
    """The days as a rich table: pool, new images, start, top-1 per loop, the decision and the champion."""
    from rich.table import Table

    table = Table(title="Days", title_justify="left")
    for col in ("day", "pool", "new", "start", "test top-1 per loop", "version", "promotion", "champion", "seconds"):
        table.add_column(col, justify="right")
    for d in days:
        loops = " -> ".join(f"{r['top1']:.4f}" for r in d["loops"])
        champion = "-" if d["champion_version"] is None else f"v{d['champion_version']}"
        if d["champion_top1"] is not None:
            champion += f" ({d['champion_top1']:.4f})"
        table.add_row(str(d["day"]), str(d["pool"]["size"]), str(d["pool"]["new"]), str(d["init_used"]), loops,
                      str(d["version"]), str(d["decision"]), champion, f"{d['seconds']:.0f}")  # fmt: skip
    console.print(table)
    for d in days:
        rises = "rises loop to loop" if d["loop_top1_non_decreasing"] else "does NOT rise every loop"
        console.print(f"Day {d['day']}: per-loop top-1 {rises}; start: {d['init_reason']}")
        console.print(f"Day {d['day']} promotion: {d['decision']}: {d['reason']}")
