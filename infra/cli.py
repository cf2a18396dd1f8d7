"""The `vecaf` command line: the local stack, the demo, data helpers.

    vecaf stack up|down|status     the local Prefect, MLflow and S3 servers (infra/stack.py)
    vecaf demo                     the end-to-end demo the README's first command runs
    vecaf deploy                   register the flows' deployments (pipeline on a cron schedule, promote...)
    vecaf run                      trigger vecaf-pipeline through its deployment, with parameters
    vecaf promote                  trigger the promote flow through its deployment
    vecaf data fetch               obtain Fashion-MNIST when Debian's package is not installed
"""

from __future__ import annotations

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
    pool_size: int = typer.Option(3000, help="Images of the Fashion-MNIST training split in the pool."),
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
    except RuntimeError as exc:
        typer.echo(f"demo failed: {exc}", err=True)
        raise typer.Exit(1) from exc


def _load_params(path: Optional[Path], overrides: dict[str, Any]) -> Any:
    """``PipelineParams`` from a YAML/JSON file (or defaults) with ``{"group.field": value}`` overrides."""
    import json

    import yaml

    from flows.params import PipelineParams

    data: dict = {}
    if path is not None:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else (yaml.safe_load(text) or {})
    for dotted, value in overrides.items():
        if value is None:
            continue
        head, _, leaf = dotted.partition(".")
        data.setdefault(head, {})[leaf] = value
    return PipelineParams(**data)


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

    pipeline = _load_params(params, {}) if params is not None else None
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
    from pydantic import ValidationError

    from flows.deploy import PIPELINE_DEPLOYMENT, trigger, wait_for_run
    from flows.runtime import flow_run_url
    from infra.stack import stack_urls
    from vecaf.settings import load_settings

    overrides = {
        "data.dataset": dataset, "data.pool_size": pool_size, "training.method": method, "training.mode": mode,
        "training.ratio": ratio, "training.loops": loops, "training.batch_budget": batch_budget, "training.seed": seed,
    }  # fmt: skip
    try:
        pipeline = _load_params(params, overrides)
    except ValidationError as exc:
        typer.echo(f"invalid parameters:\n{exc}", err=True)
        raise typer.Exit(2) from exc
    settings = load_settings(config)
    ui = stack_urls(settings)["prefect_ui_url"]
    flow_run = trigger(settings, f"vecaf-pipeline/{PIPELINE_DEPLOYMENT}", pipeline.flow_parameters())
    typer.echo(f"flow run {flow_run.name}: {flow_run_url(ui, str(flow_run.id))}")
    if wait:
        flow_run = wait_for_run(settings, flow_run.id)
        typer.echo(f"{flow_run.name}: {flow_run.state.name}")
        if not flow_run.state.is_completed():
            raise typer.Exit(1)
        from rich.console import Console

        from infra.demo import collect_summary, print_summary

        print_summary(Console(), collect_summary(settings, flow_run))


@app.command()
def promote(
    config: Optional[Path] = ConfigOption,
    model_name: str = typer.Option("vecaf-classifier", help="Registered model name."),
    margin: float = typer.Option(0.0, help="Held-out top-1 gain the challenger needs over the champion."),
    wait: bool = typer.Option(True, help="Wait for the run to finish."),
) -> None:
    """Trigger the promote flow through its deployment (challenger vs champion on the held-out split)."""
    from flows.deploy import ON_DEMAND, trigger, wait_for_run
    from flows.params import RegistryParams
    from flows.runtime import flow_run_url
    from infra.stack import stack_urls
    from vecaf.settings import load_settings

    settings = load_settings(config)
    registry = RegistryParams(model_name=model_name, promotion_margin=margin)
    flow_run = trigger(settings, f"promote/{ON_DEMAND}", {"registry": registry.model_dump(mode="json")})
    typer.echo(f"flow run {flow_run.name}: {flow_run_url(stack_urls(settings)['prefect_ui_url'], str(flow_run.id))}")
    if wait:
        flow_run = wait_for_run(settings, flow_run.id)
        typer.echo(f"{flow_run.name}: {flow_run.state.name}")
        if not flow_run.state.is_completed():
            raise typer.Exit(1)
        from tasks.registry import read_aliases

        aliases = read_aliases(stack_urls(settings)["mlflow_url"], model_name)
        for alias in ("champion", "challenger"):
            mv = aliases[alias]
            detail = "none" if mv is None else f"version {mv['version']} ({mv['tags'].get('promotion.decision', '-')})"
            typer.echo(f"{model_name}@{alias}: {detail}")


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
