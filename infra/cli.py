"""The `vecaf` command line: the local stack, the demo, data helpers.

    vecaf stack up|down|status     the local Prefect, MLflow and S3 servers (infra/stack.py)
    vecaf demo                     the end-to-end demo the README's first command runs
    vecaf deploy                   register the flows' deployments (pipeline on a cron schedule, promote...)
    vecaf run                      trigger vecaf-pipeline through its deployment, with parameters
    vecaf promote                  trigger the promote flow through its deployment (--rollback, --to-version N)
    vecaf simulate --days N        daily drops of Fashion-MNIST replayed against the stack (infra/simulate.py)
    vecaf gc                       retention: old runs and versions, failed runs' work files, logs, Parquet
    vecaf data fetch               obtain Fashion-MNIST when Debian's package is not installed
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import typer

from infra.stack_cli import stack_app

app = typer.Typer(help="The VeCAF pipeline.", no_args_is_help=True, add_completion=False)
app.add_typer(stack_app, name="stack", help="Start, stop and inspect the local servers.")
data_app = typer.Typer(help="Datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

ConfigOption = typer.Option(None, "--config", "-c", help="YAML settings file (VECAF_* env vars override it).")


@app.command()
def demo(
    config: Optional[Path] = ConfigOption,
    pool_size: int = typer.Option(3000, help="Images of the Fashion-MNIST training split in the pool (half a day)."),
    test_size: int = typer.Option(1000, help="Images of the test split (evaluation and promotion)."),
    ratio: float = typer.Option(0.01, help="Fraction of the pool selected per loop."),
    loops: int = typer.Option(3, help="Selection + training loops."),
    batch_budget: int = typer.Option(300, help="Training batches over all loops."),
    mode: str = typer.Option("head", help="'head' (frozen PVM) or 'full' (whole network trains)."),
    method: str = typer.Option("vecaf", help="Selection method (vecaf, activeft, coreset, topk_loss, random, full)."),
    image_size: int = typer.Option(64, help="PVM input side in pixels."),
    ood_prompt: Optional[str] = typer.Option(
        None, help="Caption suffix steering selection, e.g. \"It's a snowy day!\"."
    ),
) -> None:
    """Run the demo on the embedded defaults and print what it did (the stack stays up)."""
    from pydantic import ValidationError

    from infra.demo import run_demo
    from vecaf.settings import load_settings

    try:
        run_demo(
            load_settings(config), pool_size=pool_size, test_size=test_size, ratio=ratio, loops=loops,
            batch_budget=batch_budget, mode=mode, method=method, image_size=image_size, ood_prompt=ood_prompt,
        )  # fmt: skip
    except ValidationError as exc:
        typer.echo(f"invalid demo parameters:\n{exc}", err=True)
        raise typer.Exit(2) from exc
    except ValueError as exc:
        typer.echo(f"invalid demo parameters: {exc}", err=True)
        raise typer.Exit(2) from exc
    except RuntimeError as exc:
        typer.echo(f"demo failed: {exc}", err=True)
        raise typer.Exit(1) from exc


class ParamsFileError(ValueError):
    """A parameters file that cannot be read or parsed (the message is one line, with the file's name)."""


def _read_params_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML/JSON parameters file.

    Raises:
        ParamsFileError: missing or unreadable file, malformed YAML/JSON, or a top level that is not a mapping.
    """
    import json

    import yaml

    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamsFileError(f"cannot read parameters file {path}: {exc}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ParamsFileError(f"parameters file {path} is not valid JSON: {exc}") from exc
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamsFileError(f"parameters file {path} is not valid YAML{at}: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsFileError(
            f"parameters file {path} must hold a mapping of parameter groups (data, training...), "
            f"not a {type(data).__name__}"
        )
    return data


def _load_params(path: Optional[Path], overrides: dict[str, Any]) -> Any:
    """``PipelineParams`` from a YAML/JSON file (or defaults) with ``{"group.field": value}`` overrides.

    Raises:
        ParamsFileError: the file cannot be read or parsed.
        pydantic.ValidationError: the parameters are invalid.
    """
    from flows.params import PipelineParams

    data: dict = {} if path is None else _read_params_file(path)
    for dotted, value in overrides.items():
        if value is None:
            continue
        head, _, leaf = dotted.partition(".")
        group = data.setdefault(head, {})
        if not isinstance(group, dict):
            raise ParamsFileError(f"parameter {head!r} must be a mapping to take --{leaf.replace('_', '-')}")
        group[leaf] = value
    return PipelineParams(**data)


def _params_or_exit(path: Optional[Path], overrides: dict[str, Any]) -> Any:
    """:func:`_load_params`, or exit 2 with the reason (one line for a file error, one line per invalid field)."""
    from pydantic import ValidationError

    try:
        return _load_params(path, overrides)
    except ParamsFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except ValidationError as exc:
        typer.echo(f"invalid parameters: {_one_line_errors(exc)}", err=True)
        raise typer.Exit(2) from exc


def _one_line_errors(exc: Any) -> str:
    """A pydantic ValidationError as ``loc: message; loc: message`` (``flows.params.one_line_errors``)."""
    from flows.params import one_line_errors

    return one_line_errors(exc)


def _check_cron(cron: str, timezone: str = "UTC") -> None:
    """Exit 2 with one line when ``cron`` is not a valid cron string."""
    from pydantic import ValidationError

    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        reason = "; ".join(str(e.get("msg", "")).removeprefix("Value error, ") for e in exc.errors())
        hint = "five fields: minute hour day-of-month month day-of-week"
        typer.echo(f"invalid --cron {cron!r}: {reason} ({hint})", err=True)
        raise typer.Exit(2) from exc


def _trigger_or_exit(settings: Any, deployment: str, parameters: dict[str, Any]) -> Any:
    """``flows.deploy.trigger``; a refusal by the server exits 2 with its reason (no flow run exists then)."""
    from flows.deploy import trigger

    try:
        return trigger(settings, deployment, parameters)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def describe_failure(
    flow_run_id: Any, *, max_depth: int = 4, error_logs: int = 3, log_wait_s: float = 10.0
) -> list[str]:
    """Why a flow run did not complete: its state message, the failed subflows and task runs with theirs.

    Reads, through the current Prefect API, the flow run's state; its child flow runs (subflows) and task
    runs that ended FAILED or CRASHED, recursively; and, for a run with no failed child (e.g. a crash of
    its process), its last ERROR log lines. A flow-run process sends its last log lines when it exits,
    after it has set the final state: for a run that ended less than ``log_wait_s`` ago, an empty answer
    is asked again until that much time has passed since the end, so they are not missed.

    Args:
        flow_run_id: the flow run.
        max_depth: how deep subflows are followed.
        error_logs: how many ERROR log messages to show for a run without a failed child.
        log_wait_s: how long after a run's end its ERROR log lines are waited for (0: read once).

    Returns:
        Indented lines, the first one for the run itself.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
        LogFilterLevel,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import LogSort

    bad = [StateType.FAILED, StateType.CRASHED]

    def message(state: Any) -> str:
        if state is None:
            return "no state"
        text = " ".join((state.message or "").split())
        return f"{state.name}: {text}" if text else state.name

    lines: list[str] = []
    with get_client(sync_client=True) as client:

        def error_log_lines(run: Any) -> list[Any]:
            """The run's last ``error_logs`` ERROR lines, newest first; waited for while its end is recent."""
            ended = run.state.timestamp if run.state is not None else None
            wait = 0.0 if ended is None else log_wait_s - (datetime.now(timezone.utc) - ended).total_seconds()
            deadline = time.monotonic() + min(max(wait, 0.0), log_wait_s)
            while True:
                logs = client.read_logs(
                    log_filter=LogFilter(
                        flow_run_id=LogFilterFlowRunId(any_=[run.id]), level=LogFilterLevel(ge_=40)
                    ),
                    sort=LogSort.TIMESTAMP_DESC,
                    limit=error_logs,
                )
                if logs or time.monotonic() >= deadline:
                    return logs
                time.sleep(0.5)

        def walk(run: Any, depth: int, label: str) -> None:
            pad = "  " * depth
            lines.append(f"{pad}{label} {run.name!r}: {message(run.state)}")
            if depth >= max_depth:
                return
            subflows = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id]))
            )
            wrappers = {s.parent_task_run_id for s in subflows}
            failed_subflows = [s for s in subflows if s.state is not None and s.state.type in bad]
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=bad))),
            )
            failed_tasks = [t for t in tasks if t.id not in wrappers]
            for sub in failed_subflows:
                flow = client.read_flow(sub.flow_id)
                walk(sub, depth + 1, f"subflow {flow.name}")
            for task_run in failed_tasks:
                lines.append(f"{pad}  task {task_run.name}: {message(task_run.state)}")
            if not failed_subflows and not failed_tasks and error_logs:
                for log in reversed(error_log_lines(run)):
                    text = [ln for ln in log.message.strip().splitlines() if ln.strip()]
                    if text:
                        lines.append(f"{pad}  log: {text[-1].strip()[:500]}")

        root = client.read_flow_run(flow_run_id)
        walk(root, 0, f"flow {client.read_flow(root.flow_id).name}")
    return lines


def _report_end(settings: Any, flow_run: Any) -> None:
    """Print the run's final state; when it did not complete, why (see :func:`describe_failure`), and exit 1."""
    from flows.deploy import prefect_api

    typer.echo(f"{flow_run.name}: {flow_run.state.name}")
    if flow_run.state.is_completed():
        return
    try:
        with prefect_api(settings):
            lines = describe_failure(flow_run.id)
    except Exception as exc:  # noqa: BLE001 - the state message is still worth printing
        lines = [f"{flow_run.state.message or flow_run.state.name} (details unavailable: {exc})"]
    for line in lines:
        typer.echo(line, err=True)
    raise typer.Exit(1)


@app.command()
def deploy(
    config: Optional[Path] = ConfigOption,
    params: Optional[Path] = typer.Option(
        None, "--params", "-p", help="YAML/JSON file of pipeline parameters (defaults of the schedule)."
    ),
    cron: str = typer.Option("0 3 * * *", help="Cron schedule of the recurring pipeline (UTC)."),
    paused: bool = typer.Option(False, help="Create the schedule paused."),
    gpu_limit: int = typer.Option(1, help="Concurrency limit of tasks tagged 'gpu'."),
    write_prefect_yaml: Optional[Path] = typer.Option(
        None, "--write-prefect-yaml", help="Write the deployments as a prefect.yaml to this path; register nothing."
    ),
    prefect_file: Optional[Path] = typer.Option(
        None, "--prefect-file", help="Register the deployments a prefect.yaml (as written above) describes."
    ),
) -> None:
    """Register the deployments on the work pools of the settings (run `vecaf stack up` first)."""
    if write_prefect_yaml is not None or prefect_file is not None:
        return _deploy_with_prefect_yaml(config, params, cron, paused, gpu_limit, write_prefect_yaml, prefect_file)
    from flows.deploy import deploy as deploy_flows
    from vecaf.settings import load_settings

    _check_cron(cron)
    pipeline = _params_or_exit(params, {}) if params is not None else None
    ids = deploy_flows(
        load_settings(config), pipeline_parameters=None if pipeline is None else pipeline.flow_parameters(),
        cron=cron, paused=paused, gpu_limit=gpu_limit,
    )  # fmt: skip
    for name, dep_id in ids.items():
        typer.echo(f"{name}\t{dep_id}")


def _deploy_with_prefect_yaml(
    config: Optional[Path], params: Optional[Path], cron: str, paused: bool, gpu_limit: int,
    write_to: Optional[Path], read_from: Optional[Path],
) -> None:  # fmt: skip
    """``vecaf deploy --write-prefect-yaml`` (write the deployments, register nothing) / ``--prefect-file``."""
    from flows.deploy import deploy as deploy_flows
    from flows.deploy import prefect_yaml, read_prefect_yaml
    from vecaf.settings import load_settings

    pipeline = _load_params(params, {}) if params is not None else None
    settings = load_settings(config)
    options: dict[str, Any] = {
        "pipeline_parameters": None if pipeline is None else pipeline.flow_parameters(), "cron": cron, "paused": paused,
    }
    if write_to is not None:
        write_to.write_text(prefect_yaml(settings, **options))
        typer.echo(f"wrote {write_to}")
        return
    settings, options = read_prefect_yaml(settings, read_from.read_text())
    for name, dep_id in deploy_flows(settings, gpu_limit=gpu_limit, **options).items():
        typer.echo(f"{name}\t{dep_id}")


@app.command()
def run(
    config: Optional[Path] = ConfigOption,
    params: Optional[Path] = typer.Option(None, "--params", "-p", help="YAML/JSON file of pipeline parameters."),
    dataset: Optional[str] = typer.Option(None, help="data.dataset"),
    pool_size: Optional[int] = typer.Option(None, help="data.pool_size"),
    method: Optional[str] = typer.Option(None, help="training.method"),
    mode: Optional[str] = typer.Option(None, help="training.mode"),
    ratio: Optional[float] = typer.Option(None, help="training.ratio"),
    loops: Optional[int] = typer.Option(None, help="training.loops"),
    batch_budget: Optional[int] = typer.Option(None, help="training.batch_budget"),
    seed: Optional[int] = typer.Option(None, help="training.seed"),
    wait: bool = typer.Option(True, help="Wait for the run to finish."),
) -> None:
    """Trigger vecaf-pipeline through its deployment (parameters validated here and by the server)."""
    from flows.deploy import PIPELINE_DEPLOYMENT
    from flows.runtime import flow_run_url
    from infra.stack import stack_urls
    from vecaf.settings import load_settings

    overrides = {
        "data.dataset": dataset, "data.pool_size": pool_size, "training.method": method, "training.mode": mode,
        "training.ratio": ratio, "training.loops": loops, "training.batch_budget": batch_budget, "training.seed": seed,
    }  # fmt: skip
    pipeline = _params_or_exit(params, overrides)
    settings = load_settings(config)
    ui = stack_urls(settings)["prefect_ui_url"]
    flow_run = _trigger_or_exit(settings, f"vecaf-pipeline/{PIPELINE_DEPLOYMENT}", pipeline.flow_parameters())
    typer.echo(f"flow run {flow_run.name}: {flow_run_url(ui, str(flow_run.id))}")
    if wait:
        from rich.console import Console

        from infra.progress import wait_with_progress

        flow_run = wait_with_progress(settings, flow_run.id, Console())
        _report_end(settings, flow_run)
        from infra.demo import collect_summary, print_summary
        from infra.simulate import pipeline_noop

        noop = pipeline_noop(settings, flow_run.id)
        if noop is not None:
            typer.echo(f"nothing to do: {noop}")
            return
        print_summary(Console(), collect_summary(settings, flow_run))


@app.command()
def promote(
    config: Optional[Path] = ConfigOption,
    model_name: str = typer.Option("vecaf-classifier", help="Registered model name."),
    margin: float = typer.Option(0.0, help="Held-out top-1 gain the challenger needs over the champion."),
    rollback: bool = typer.Option(False, "--rollback", help="Point champion back at the previous champion."),
    to_version: Optional[int] = typer.Option(None, "--to-version", min=1, help="Point champion at version N."),
    wait: bool = typer.Option(True, help="Wait for the run to finish."),
) -> None:
    """Trigger the promote flow through its deployment (challenger vs champion on the held-out split).

    ``--rollback`` / ``--to-version N`` move ``champion`` instead (nothing evaluated), under the same lock,
    recorded like a promotion.
    """
    from pydantic import ValidationError

    from flows.deploy import PROMOTE_DEPLOYMENT, wait_for_run
    from flows.params import PromotionParams
    from flows.runtime import flow_run_url
    from infra.stack import stack_urls
    from vecaf.settings import load_settings

    try:
        registry = PromotionParams(model_name=model_name, promotion_margin=margin)
    except ValidationError as exc:
        typer.echo(f"invalid parameters: {_one_line_errors(exc)}", err=True)
        raise typer.Exit(2) from exc
    if rollback and to_version is not None:
        typer.echo("pass either --rollback or --to-version N, not both", err=True)
        raise typer.Exit(2)
    parameters: dict = {"registry": registry.model_dump(mode="json")}
    if rollback:
        parameters["rollback"] = True
    if to_version is not None:
        parameters["to_version"] = to_version
    settings = load_settings(config)
    if rollback or to_version is not None:  # early, clear refusal; the flow checks again under the lock
        from tasks.registry import read_history, rollback_target

        try:
            history = read_history(stack_urls(settings)["mlflow_url"], model_name)["history"]
            rollback_target(history, to_version=None if to_version is None else str(to_version))
        except ValueError as exc:
            typer.echo(f"cannot move {model_name}@champion: {exc}", err=True)
            raise typer.Exit(2) from exc
    flow_run = _trigger_or_exit(settings, f"promote/{PROMOTE_DEPLOYMENT}", parameters)
    typer.echo(f"flow run {flow_run.name}: {flow_run_url(stack_urls(settings)['prefect_ui_url'], str(flow_run.id))}")
    if wait:
        flow_run = wait_for_run(settings, flow_run.id)
        _report_end(settings, flow_run)
        from tasks.registry import read_aliases

        aliases = read_aliases(stack_urls(settings)["mlflow_url"], model_name)
        for alias in ("champion", "challenger"):
            mv = aliases[alias]
            detail = "none" if mv is None else f"version {mv['version']} ({mv['tags'].get('promotion.decision', '-')})"
            typer.echo(f"{model_name}@{alias}: {detail}")


@app.command()
def simulate(
    config: Optional[Path] = ConfigOption,
    days: int = typer.Option(5, help="Days simulated (1-30): one drop of images and one pipeline run each."),
    quick: bool = typer.Option(False, "--quick", help="Tiny drops and few batches (CI)."),
    shadow: bool = typer.Option(True, help="Also run the random-selection shadow each day."),
) -> None:
    """Replay Fashion-MNIST arriving in daily drops against the stack's deployments (VeCAF vs random shadow)."""
    from infra.simulate import run_simulation, simulation_config
    from vecaf.settings import load_settings

    try:
        plan = simulation_config(days, quick=quick, shadow=shadow)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    try:
        run_simulation(load_settings(config), plan)
    except (RuntimeError, FileNotFoundError) as exc:
        typer.echo(f"simulation failed: {exc}", err=True)
        raise typer.Exit(1) from exc


@app.command()
def gc(
    config: Optional[Path] = ConfigOption,
    keep_runs: int = typer.Option(20, min=0, help="Top-level MLflow runs kept per experiment, newest first."),
    keep_versions: int = typer.Option(5, min=0, help="Model versions kept per registered model, newest first."),
    older_than_days: float = typer.Option(30.0, min=0.0, help="Only runs and versions older than this go."),
    experiment: Optional[list[str]] = typer.Option(None, help="Experiment to prune (repeatable; default: all)."),
    model: Optional[list[str]] = typer.Option(None, help="Registered model to prune (repeatable; default: all)."),
    log_max_mb: float = typer.Option(10.0, min=0.0, help="Rotate a server log larger than this many MB."),
    log_keep: int = typer.Option(3, min=1, help="Rotated copies kept per log (name.log.1 .. name.log.N)."),
    skip_mlflow: bool = typer.Option(False, help="Leave MLflow and the work folders alone (logs and Parquet only)."),
    apply: bool = typer.Option(False, "--apply", help="Delete, rotate and compact; without it, only list."),
) -> None:
    """Retention: list (or, with --apply, delete) old runs, unaliased model versions, failed runs' work files;
    old runs' state in the bucket; rotate large logs; compact Feast Parquet. A version holding an alias is never
    deleted."""
    from flows.runtime import runtime
    from tasks.retention import apply_gc, plan_gc
    from tasks.storage import store_uri
    from tasks.tracking import EndpointUnreachableError
    from vecaf.settings import load_settings

    rt = runtime(load_settings(config))
    tracking_uri = None if skip_mlflow else rt.tracking_uri
    try:
        plan = plan_gc(
            tracking_uri=tracking_uri, state_dir=rt.state_dir, store_dir=rt.store_dir, keep_runs=keep_runs,
            keep_versions=keep_versions, older_than_days=older_than_days, log_max_bytes=int(log_max_mb * 1e6),
            experiments=experiment or None, models=model or None, runs_uri=store_uri(rt.bucket, rt.prefix, "runs"),
            s3=rt.s3_client(),
        )  # fmt: skip
    except (EndpointUnreachableError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2 if isinstance(exc, ValueError) else 1) from exc
    except Exception as exc:  # noqa: BLE001 - an MLflow client error names the server; say so in one line
        typer.echo(f"error: cannot plan against MLflow at {tracking_uri}: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from exc
    for line in plan.lines():
        typer.echo(line)
    counts = ", ".join(f"{k} {v}" for k, v in plan.counts().items())
    if not apply:
        typer.echo(f"dry run: would handle {counts}; nothing changed (add --apply)")
        return
    done = apply_gc(plan, tracking_uri=tracking_uri, log_keep=log_keep, s3=rt.s3_client())
    typer.echo("applied: " + ", ".join(f"{k} {v}" for k, v in done.items()))


@data_app.command("fetch")
def data_fetch(
    root: Path = typer.Option(Path("data/fashion-mnist"), help="Folder to download the idx files into."),
) -> None:
    """Download Fashion-MNIST with torchvision (needs the network); prefer Debian's dataset-fashion-mnist."""
    from vecaf.data import load_dataset

    ds = load_dataset("fashion-mnist", root=root, split="train", download=True)
    typer.echo(f"Fashion-MNIST: {len(ds)} training images under {root}")


if __name__ == "__main__":  # pragma: no cover
    app()
