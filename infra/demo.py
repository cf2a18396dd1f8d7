"""``make demo`` / ``vecaf demo``: the whole product on the embedded defaults, through the real servers.

1. Start the stack (S3, MLflow, Prefect server, worker) unless it is already up.
2. Deploy the flows (``flows/deploy.py``); the scheduled pipeline deployment gets the demo's parameters.
3. Trigger ``vecaf-pipeline/production`` through Prefect (the run is visible in the UI and runs in
   the stack's worker): Fashion-MNIST, EfficientNet-Lite0 (frozen, ``head`` mode), the ImageNet-label
   captioner and MiniLM, VeCAF selection with CEA; each task is printed as it finishes, and the run's
   progress artifacts as bars (``infra/progress.py``).
4. Print the summary: test accuracy per loop, the registered model version and its aliases, the MLflow run
   URL, the Prefect flow-run URL, where the artifacts are in S3; write it to ``<state_dir>/demo/summary.json``.

The stack stays up for exploring (``vecaf stack down`` / ``make stop`` stops it).
"""

from __future__ import annotations

import json
import time
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


def demo_parameters(
    *,
    pool_size: int = DEMO_DEFAULTS["pool_size"],
    test_size: int = DEMO_DEFAULTS["test_size"],
    image_size: int = DEMO_DEFAULTS["image_size"],
    ratio: float = DEMO_DEFAULTS["ratio"],
    loops: int = DEMO_DEFAULTS["loops"],
    batch_budget: int = DEMO_DEFAULTS["batch_budget"],
    batch_size: int = DEMO_DEFAULTS["batch_size"],
    lr: float = DEMO_DEFAULTS["lr"],
    mode: str = DEMO_DEFAULTS["mode"],
    method: str = DEMO_DEFAULTS["method"],
    ood_prompt: str | None = None,
) -> Any:
    """The demo's ``PipelineParams`` (validated: an out-of-range value raises ``ValidationError``)."""
    from flows.params import DataParams, PipelineParams, RegistryParams, TrainingParams

    return PipelineParams(
        data=DataParams(dataset="fashion-mnist", pool_size=pool_size, test_size=test_size, image_size=image_size),
        ood_prompt=ood_prompt,
        training=TrainingParams(
            mode=mode, method=method, ratio=ratio, loops=loops, batch_budget=batch_budget, batch_size=batch_size, lr=lr
        ),
        registry=RegistryParams(),
    )


class _Progress:
    """Prints each task and subflow of a flow run once it reaches a final state."""

    def __init__(self, console: Any, flow_run_id: Any, start: float) -> None:
        self.console = console
        self.root = flow_run_id
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
    """Stack up, deploy, run ``vecaf-pipeline`` through its deployment, print and return the summary.

    Raises:
        pydantic.ValidationError: a parameter out of range (before anything starts).
        RuntimeError: the pipeline run did not complete (its state and the worker's log are named).
    """
    from rich.console import Console
    from rich.table import Table

    from flows.deploy import PIPELINE_DEPLOYMENT, deploy, trigger
    from flows.runtime import flow_run_url
    from infra.progress import wait_with_progress
    from infra.stack import stack_urls, state_dir, up

    console = console or Console()
    params = demo_parameters(
        pool_size=pool_size, test_size=test_size, image_size=image_size, ratio=ratio, loops=loops,
        batch_budget=batch_budget, mode=mode, method=method, ood_prompt=ood_prompt,
    )  # fmt: skip
    t0 = time.monotonic()
    console.rule("[bold]VeCAF pipeline demo")
    console.print(
        f"Fashion-MNIST: pool {pool_size} images, held-out {test_size}; EfficientNet-Lite0 at {image_size} px "
        f"({mode} mode), ImageNet-label captions, MiniLM text embeddings; {method} selects {ratio:.1%} of the pool "
        f"in each of {loops} loops, {batch_budget} training batches in all."
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
        "[bold]2.[/] Deploying the flows (production pipeline on a cron schedule, vecaf-pipeline/experiment for "
        "one-off runs, promote on demand)..."
    )
    ids = deploy(settings, pipeline_parameters=params.flow_parameters())
    for name in ids:
        console.print(f"   deployed {name}")
    console.print(f"[bold]3.[/] Triggering vecaf-pipeline/{PIPELINE_DEPLOYMENT}; the worker runs it:")
    start = time.monotonic()
    run = trigger(settings, f"vecaf-pipeline/{PIPELINE_DEPLOYMENT}", params.flow_parameters())
    urls = stack_urls(settings)
    console.print(f"   flow run {run.name}: {flow_run_url(urls['prefect_ui_url'], str(run.id))}")
    progress = _Progress(console, run.id, start)
    try:
        run = wait_with_progress(settings, run.id, console, timeout=timeout, on_poll=progress, show_state=False)
    except TimeoutError as exc:
        raise RuntimeError(str(exc)) from exc
    if not run.state.is_completed():
        log = state_dir(settings) / "logs" / "worker.log"
        raise RuntimeError(
            f"the pipeline run ended {run.state.name}: {run.state.message}; see the Prefect UI and {log}"
        )
    console.print(f"[bold]4.[/] Done in {time.monotonic() - start:.0f} s. Reading back MLflow, the registry and S3...")
    summary = collect_summary(settings, run)
    summary["seconds"] = {"pipeline": round(time.monotonic() - start, 1), "total": round(time.monotonic() - t0, 1)}
    print_summary(console, summary)
    out = state_dir(settings) / "demo" / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    console.print(f"Summary written to {out}.")
    console.print(
        f"The stack stays up: Prefect UI {urls['prefect_ui_url']} (log in with PREFECT_API_AUTH_STRING of `vecaf stack "
        f"env`), MLflow UI {urls['mlflow_url']}/#/?workflowType=machine_learning. "
        "Stop it with `make stop` (or `vecaf stack down`)."
    )
    return summary
