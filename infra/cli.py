"""The `vecaf` command line: the local stack, the demo, data helpers.

    vecaf stack up|down|status     the local Prefect, MLflow and S3 servers (infra/stack.py)
    vecaf demo                     the end-to-end demo the README's first command runs
    vecaf data fetch               obtain Fashion-MNIST when Debian's package is not installed
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

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
    pool_size: int = typer.Option(4000, help="Images of the Fashion-MNIST training split to use."),
    ratio: float = typer.Option(0.01, help="Fraction of the pool selected."),
) -> None:
    """Run the demo on the embedded defaults and print what it did."""
    from infra.demo import run_demo
    from vecaf.settings import load_settings

    run_demo(load_settings(config), pool_size=pool_size, ratio=ratio)


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
