"""``vecaf stack up|down|status|env``: the local servers of the pipeline (see ``infra/stack.py``).

Settings come from ``--config`` (YAML) and ``VECAF_STACK__*`` / ``VECAF_SERVICES__*`` variables, e.g.
``VECAF_STACK__MLFLOW_PORT=5001``. A service with an external URL (``VECAF_SERVICES__PREFECT_API_URL``,
``..._MLFLOW_TRACKING_URI``, ``..._S3_ENDPOINT_URL`` or the clients' usual variables) is not started here;
``status`` shows it as external, with whether it answers.
Exit codes: 0 on success; 1 when a server cannot be started, a setting is invalid, or (``status``) a server
is not running and healthy.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, Optional

import typer

if TYPE_CHECKING:
    from infra.stack import ServerStatus
    from vecaf.settings import Settings

stack_app = typer.Typer(help="Start, stop and inspect the local servers.", no_args_is_help=True, add_completion=False)

ConfigOption = typer.Option(None, "--config", "-c", help="YAML settings file (VECAF_* env vars override it).")


def _settings(config: Optional[Path]) -> Settings:
    from vecaf.settings import load_settings

    return load_settings(config)


def _fail(exc: Exception) -> NoReturn:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
    raise typer.Exit(1)


def _print_table(rows: list[ServerStatus], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in ("name", "where", "pid", "url", "healthy", "detail"):
        table.add_column(column, overflow="fold")
    for row in rows:
        healthy = "[green]yes[/]" if row.healthy else "[red]no[/]"
        pid = "-" if row.pid is None else str(row.pid)
        table.add_row(row.name, row.where, pid, row.url, healthy, row.detail)
    console = Console()
    if not console.is_terminal:  # piped or captured: keep each URL on one line
        console = Console(width=200)
    console.print(table)


@stack_app.command()
def up(
    config: Optional[Path] = ConfigOption,
    timeout: float = typer.Option(180.0, min=1.0, help="Seconds each server may take to become healthy."),
) -> None:
    """Start S3, MLflow, the Prefect server and a worker (those not external or already running); wait until healthy."""
    from infra import stack

    settings = _settings(config)
    try:
        rows = stack.up(settings, timeout=timeout)
    except (stack.StackError, ValueError) as exc:
        _fail(exc)
    _print_table(rows, f"vecaf stack ({stack.state_dir(settings)})")
    typer.echo(f"reconcile: {_reconcile(settings)}")
    typer.echo('Clients: eval "$(vecaf stack env)"   Stop: vecaf stack down')


def _reconcile(settings: Settings) -> str:
    """Free slots a restart leaked, crash runs whose process is gone, fail their MLflow runs (one line)."""
    from flows.runtime import prefect_client_settings
    from tasks.reconcile import reconcile
    from vecaf.services import resolve_services

    services = resolve_services(settings)
    with prefect_client_settings(settings):
        report = reconcile(tracking_uri=services.mlflow_tracking_uri, local_work_pool=settings.stack.work_pool)
    return report.summary()


@stack_app.command()
def down(
    config: Optional[Path] = ConfigOption,
    timeout: float = typer.Option(20.0, min=0.0, help="Seconds to wait after SIGTERM before SIGKILL."),
) -> None:
    """Stop the servers `vecaf stack up` started (and nothing else)."""
    from infra import stack

    settings = _settings(config)
    stopped = stack.down(settings, timeout=timeout)
    if stopped:
        typer.echo(f"stopped: {', '.join(stopped)}")
    else:
        typer.echo(f"nothing to stop: no server of the stack is running (state dir {stack.state_dir(settings)})")


@stack_app.command()
def status(config: Optional[Path] = ConfigOption) -> None:
    """Show each service: started here or external, pid, url, health. Exit code 1 unless all answer."""
    from infra import stack

    settings = _settings(config)
    try:
        rows = stack.status(settings)
    except ValueError as exc:
        _fail(exc)
    _print_table(rows, f"vecaf stack ({stack.state_dir(settings)})")
    if not any(row.running for row in rows):
        typer.echo("the stack is not running: start it with `vecaf stack up`")
    if not all(row.healthy for row in rows):
        raise typer.Exit(1)


@stack_app.command()
def env(config: Optional[Path] = ConfigOption) -> None:
    """Print `export` lines that point Prefect, MLflow and boto3 clients at the services (auth included)."""
    from infra import stack

    try:
        env = stack.stack_env(_settings(config))
    except ValueError as exc:
        _fail(exc)
    for key, value in env.items():
        typer.echo(f"export {key}={shlex.quote(value)}")
