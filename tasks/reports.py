"""What a user reads after a pipeline run: figures and a model card in MLflow, a summary in Prefect.

``publish-run-report`` (one MLflow side effect: the run's report):
- figures under ``figures/`` of the finetuning run (``tasks/figures.py``): ``accuracy.png`` (held-out top-1 vs
  training batches, loop boundaries dashed), ``class-histogram.png`` (classes each loop picked),
  ``selection-loop-<l>.png`` (the first images each loop picked, with class and caption), and
  ``b2a.png`` when accuracy targets are given;
- ``model_card.md`` on the run, also its description (``mlflow.note.content``) and the registered
  version's description: data and pool version, objective, method, budget, per-loop table, final metrics,
  how to load the model;
- tags ``prefect_pipeline_run_url`` (a link back to the Prefect run) and ``mlflow_model_version_url``.

``publish-pipeline-summary`` (one Prefect side effect: the top-level run's artifacts): a markdown summary
(links to the MLflow run, the logged model and the registered version, per-loop table, promotion decision,
the accuracy figure), link artifacts to the MLflow pages, and the accuracy figure as an image artifact.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from tasks.tracking import (
    MLFLOW_SERVER,
    SERVER_TASK,
    mlflow_client,
    mlflow_logged_model_url,
    mlflow_model_version_url,
    mlflow_run_url,
    talking_to,
)

GRID_IMAGES_PER_LOOP = 16
"""How many of a loop's picks its selection grid shows (in pick order)."""


def artifact_download_url(tracking_uri: str, run_id: str, path: str) -> str:
    """A URL the browser (and Prefect's UI) can load a run's artifact from, through MLflow's server."""
    return f"{tracking_uri.rstrip('/')}/get-artifact?path={path}&run_uuid={run_id}"


def _loop_runs(client: Any, run: Any) -> list[Any]:
    children = client.search_runs(
        [run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'", max_results=1000
    )
    return sorted(children, key=lambda r: int(r.data.tags.get("loop", "0")))


def read_run(tracking_uri: str, run_id: str) -> dict[str, Any]:
    """The run's numbers and each loop's record and picks, read back from MLflow.

    Returns:
        ``{"run", "curve": [(batch, top1)], "loops": [{"loop", "record", "picks" (DataFrame)}], "final",
        "resolved" (config/resolved.yaml), "model_id"}``.
    """
    import pandas as pd
    import yaml

    with talking_to(MLFLOW_SERVER, tracking_uri):
        client = mlflow_client(tracking_uri)
        run = client.get_run(run_id)
        curve = [(int(m.step), float(m.value)) for m in client.get_metric_history(run_id, "test_top1")]
        loops = []
        with tempfile.TemporaryDirectory(prefix="vecaf-report-") as tmp:
            for child in _loop_runs(client, run):
                loop = int(child.data.tags["loop"])
                cid = child.info.run_id
                record = json.loads(
                    Path(client.download_artifacts(cid, f"selection/loop-{loop}.json", tmp)).read_text()
                )
                picks = pd.read_parquet(client.download_artifacts(cid, f"selection/picks-loop-{loop}.parquet", tmp))
                loops.append({"loop": loop, "record": record, "picks": picks, "run_id": cid})
            resolved = yaml.safe_load(Path(client.download_artifacts(run_id, "config/resolved.yaml", tmp)).read_text())
        outputs = getattr(run, "outputs", None)
        model_ids = [o.model_id for o in (getattr(outputs, "model_outputs", None) or [])]
        if not model_ids:
            found = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id='{run_id}'")
            model_ids = [m.model_id for m in found]
    final = {k[len("final_") :]: v for k, v in run.data.metrics.items() if k.startswith("final_")}
    return {
        "run": run,
        "curve": sorted(set(curve)),
        "loops": loops,
        "final": final,
        "resolved": resolved or {},
        "model_id": model_ids[-1] if model_ids else None,
    }


def loop_table_markdown(loops: list[dict[str, Any]]) -> str:
    """The per-loop table (loop, images selected, training batches, held-out top-1, test loss) as markdown."""
    rows = ["| loop | images selected | training batches | up to batch | held-out top-1 | held-out loss |",
            "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for item in loops:
        r = item["record"]
        rows.append(
            f"| {r['loop']} | {r['budget']} | {r['batches']} | {r['end_batches']} | {r['top1']:.4f} | "
            f"{r['test_loss']:.4f} |"
        )
    return "\n".join(rows)


def model_card_markdown(
    report: dict[str, Any], *, tracking_uri: str, model_name: str | None, version: str | None
) -> str:
    """The model card: data and pool version, objective, method, budget, per-loop table, final metrics, loading."""
    run = report["run"]
    params, tags = run.data.params, run.data.tags
    final = report["final"]
    top1 = final.get("test_top1")
    uri = f"models:/{model_name}/{version}" if model_name and version else f"models:/{report['model_id']}"
    lines = [
        f"# Model card: {model_name or 'vecaf classifier'}" + (f" version {version}" if version else ""),
        "",
        f"Finetuned by the VeCAF pipeline (MLflow run `{run.info.run_id}`, code `{tags.get('code_version', '?')}`).",
        "",
        "## Data",
        f"- dataset **{tags.get('dataset', params.get('data.dataset', '?'))}**, pool of "
        f"{params.get('data.pool_size_used', params.get('data.pool_size', '?'))} images "
        f"(pool version `{tags.get('dataset_digest', '?')[:16]}`), held-out split of "
        f"{params.get('data.test_size_used', params.get('data.test_size', '?'))} images "
        f"(version `{tags.get('test_digest', '?')[:16]}`)",
        f"- input {params.get('data.image_size', '?')} px, pretrained vision model `{tags.get('pvm', '?')}`",
        "",
        "## Method",
        f"- selection **{tags.get('method', '?')}**, training mode `{tags.get('mode', '?')}`, objective "
        f"`{tags.get('objective', params.get('objective.kind', '?'))}`",
        f"- budget: {params.get('training.loops', '?')} loops x ratio {params.get('training.ratio', '?')} of the pool, "
        f"{params.get('training.batch_budget', '?')} training batches of {params.get('training.batch_size', '?')} "
        f"(lr {params.get('training.lr', '?')}, CEA {params.get('training.cea', '?')}, "
        f"seed {params.get('training.seed', '?')})",
        f"- captions: `{tags.get('captioner', '-')}`, text encoder `{tags.get('text_encoder', '-')}`, OOD prompt "
        f"`{tags.get('ood_prompt', '') or '-'}`",
        "",
        "## Loops",
        loop_table_markdown(report["loops"]),
        "",
        "## Final metrics (held-out split)",
        f"- top-1 **{top1:.4f}**" if top1 is not None else "- top-1: not logged",
        f"- loss {final['test_loss']:.4f}" if "test_loss" in final else "",
        "",
        "## How to load it",
        "```python",
        "from tasks.tracking import load_stored_model",
        f"model, config, metadata = load_stored_model({tracking_uri!r}, {uri!r})",
        "# model: torch module in eval mode; metadata['data_config']: resize/normalisation of the input",
        "```",
        "The stored model is a JSON config plus safetensors weights (flavor `vecaf_classifier`): no pickle.",
    ]
    return "\n".join(line for line in lines if line is not None)


def _grid_images(data: Any, picks: Any, limit: int) -> tuple[list[Any], list[str]]:
    from tasks.data import load_split

    ds = load_split(data, data.train_split)
    index = {image_id: i for i, image_id in enumerate(ds.ids)}
    images, titles = [], []
    for row in picks.head(limit).itertuples():
        i = index.get(row.image_id)
        if i is None:
            continue
        _, image, _ = ds[i]
        caption = getattr(row, "caption", None)
        titles.append(f"{row.class_name}: {caption}" if isinstance(caption, str) and caption else str(row.class_name))
        images.append(image)
    return images, titles


def publish_run_report(
    tracking_uri: str,
    run_id: str,
    *,
    data: Any = None,
    model_name: str | None = None,
    version: str | None = None,
    pipeline_run_url: str | None = None,
    b2a_targets: tuple[float, ...] = (),
) -> dict[str, Any]:
    """Log the figures and the model card to the finetuning run; describe the run and the registered version.

    Args:
        tracking_uri: the MLflow server.
        run_id: the finetuning run.
        data: the ``DataParams`` of the run (for the selection grids; None: no grids).
        model_name: the registered model (with ``version``: its description becomes the model card).
        version: the registered version.
        pipeline_run_url: the Prefect page of the pipeline run (tag ``prefect_pipeline_run_url``).
        b2a_targets: target accuracies of the B2A figure (empty: no B2A figure).

    Returns:
        ``{"figures": [artifact paths], "model_card": str, "final_top1", "loops": [...], "run_url",
        "model_url", "version_url", "experiment_id", "model_id"}``.
    """
    import matplotlib.pyplot as plt

    from tasks import figures

    report = read_run(tracking_uri, run_id)
    run = report["run"]
    loop_ends = [int(item["record"]["end_batches"]) for item in report["loops"]]
    class_names = list(report["resolved"].get("pool", {}).get("class_names", []))
    made: dict[str, Any] = {
        "figures/accuracy.png": figures.accuracy_figure(
            report["curve"] or [(0, 0.0)], loop_ends, title=f"Held-out top-1 ({run.info.run_name})"
        ),
        "figures/class-histogram.png": figures.class_histogram_figure(
            {item["loop"]: list(item["picks"]["class_name"]) for item in report["loops"]}, class_names
        ),
    }
    if b2a_targets and report["curve"]:
        b2a = figures.batches_to_accuracy(report["curve"], b2a_targets)
        made["figures/b2a.png"] = figures.batches_to_accuracy_figure(b2a)
    if data is not None:
        for item in report["loops"]:
            images, titles = _grid_images(data, item["picks"], GRID_IMAGES_PER_LOOP)
            if images:
                made[f"figures/selection-loop-{item['loop']}.png"] = figures.selection_grid_figure(
                    images, titles, title=f"Loop {item['loop']}: first {len(images)} of {len(item['picks'])} picks"
                )
    card = model_card_markdown(report, tracking_uri=tracking_uri, model_name=model_name, version=version)
    experiment_id = run.info.experiment_id
    urls = {
        "run_url": mlflow_run_url(tracking_uri, experiment_id, run_id),
        "model_url": mlflow_logged_model_url(tracking_uri, experiment_id, report["model_id"])
        if report["model_id"] else None,
        "version_url": mlflow_model_version_url(tracking_uri, model_name, version) if model_name and version else None,
    }  # fmt: skip
    with talking_to(MLFLOW_SERVER, tracking_uri):
        client = mlflow_client(tracking_uri)
        try:
            for path, fig in made.items():
                client.log_figure(run_id, fig, path, save_kwargs={"dpi": 100})
        finally:
            for fig in made.values():
                plt.close(fig)
        client.log_text(run_id, card, "model_card.md")
        client.set_tag(run_id, "mlflow.note.content", card)
        if pipeline_run_url:
            client.set_tag(run_id, "prefect_pipeline_run_url", pipeline_run_url)
        if urls["version_url"]:
            client.set_tag(run_id, "mlflow_model_version_url", urls["version_url"])
            client.update_model_version(model_name, version, description=card)
            if "test_top1" in report["final"]:
                top1 = f"{report['final']['test_top1']:.6f}"
                client.set_model_version_tag(model_name, version, "final_test_top1", top1)
    return {
        "figures": sorted(made),
        "model_card": card,
        "final_top1": report["final"].get("test_top1"),
        "loops": [
            {k: item["record"][k] for k in ("loop", "budget", "batches", "end_batches", "top1", "test_loss")}
            for item in report["loops"]
        ],
        "experiment_id": experiment_id,
        "model_id": report["model_id"],
        **urls,
    }


@task(name="publish-run-report", **SERVER_TASK)
def publish_run_report_task(
    tracking_uri: str,
    run_id: str,
    data: Any = None,
    model_name: str | None = None,
    version: str | None = None,
    pipeline_run_url: str | None = None,
) -> dict[str, Any]:
    """Prefect task around :func:`publish_run_report` (the model card is left out of the result)."""
    out = publish_run_report(
        tracking_uri, run_id, data=data, model_name=model_name, version=version, pipeline_run_url=pipeline_run_url
    )
    get_run_logger().info("MLflow run %s: %d figures and a model card logged (%s)", run_id, len(out["figures"]),
                          out["run_url"])  # fmt: skip
    return {k: v for k, v in out.items() if k != "model_card"}


def pool_line(pool: dict[str, Any]) -> str:
    """One markdown line on a pool version (``tasks.data.pool_version``): size, classes, new vs seen before."""
    return (
        f"Pool: {pool['size']} images in {len(pool['class_counts'])} classes; **{pool['new']} new** (captioned and "
        f"embedded by this run), {pool['cached']} seen before (features cached); digest `{pool['digest'][:12]}`"
    )


def pipeline_summary_markdown(report: dict[str, Any], decision: dict[str, Any] | None, *, tracking_uri: str,
                              run_id: str, model_name: str | None, version: str | None,
                              pool: dict[str, Any] | None = None) -> str:  # fmt: skip
    """The top-level run's summary: links, final top-1, the pool, per-loop table, promotion decision, the figure."""
    lines = ["# VeCAF pipeline run", ""]
    top1 = report.get("final_top1")
    lines.append(f"**Final held-out top-1: {top1:.4f}**" if top1 is not None else "Final held-out top-1: not logged")
    if pool is not None:
        lines += ["", pool_line(pool)]
    lines += ["", "## Where to look", f"- MLflow run: [{run_id}]({report['run_url']})"]
    if report.get("model_url"):
        lines.append(f"- logged model: [{report['model_id']}]({report['model_url']})")
    if report.get("version_url"):
        lines.append(f"- registered model: [{model_name} version {version}]({report['version_url']})")
    lines += ["", "## Loops", "| loop | images selected | training batches | held-out top-1 | held-out loss |",
              "|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in report["loops"]:
        lines.append(f"| {r['loop']} | {r['budget']} | {r['batches']} | {r['top1']:.4f} | {r['test_loss']:.4f} |")
    lines += ["", "## Promotion"]
    if decision is None:
        lines.append("Promotion was off for this run (`registry.promote = false`): no alias moved.")
    else:
        outcome = decision.get("outcome") or ("promoted" if decision.get("promoted") else "not promoted")
        lines.append(f"**{outcome}**: {decision.get('reason', '')}")
        if decision.get("champion_after") is not None:
            lines.append(f"- champion after the decision: version {decision['champion_after']}")
    figure = artifact_download_url(tracking_uri, run_id, "figures/accuracy.png")
    lines += ["", "## Held-out accuracy", f"![accuracy]({figure})"]
    return "\n".join(lines)


@task(name="publish-pipeline-summary", **SERVER_TASK)
def publish_pipeline_summary_task(
    tracking_uri: str,
    run_id: str,
    report: dict[str, Any],
    decision: dict[str, Any] | None,
    model_name: str | None,
    version: str | None,
    pool: dict[str, Any] | None = None,
) -> str:
    """Create the summary, link and image artifacts of the pipeline run (Prefect); return the summary text."""
    from prefect.artifacts import create_image_artifact, create_link_artifact, create_markdown_artifact

    text = pipeline_summary_markdown(report, decision, tracking_uri=tracking_uri, run_id=run_id, model_name=model_name,
                                     version=version, pool=pool)  # fmt: skip
    create_markdown_artifact(markdown=text, key="vecaf-pipeline-summary", description="What this pipeline run produced")
    create_link_artifact(link=report["run_url"], link_text=f"MLflow run {run_id}", key="mlflow-run",
                         description="The finetuning run in MLflow (metrics, figures, model card)")  # fmt: skip
    if report.get("version_url"):
        create_link_artifact(link=report["version_url"], link_text=f"{model_name} version {version}",
                             key="mlflow-model-version", description="The registered model version")  # fmt: skip
    if "figures/accuracy.png" in report.get("figures", []):
        create_image_artifact(image_url=artifact_download_url(tracking_uri, run_id, "figures/accuracy.png"),
                              key="accuracy-curve", description="Held-out top-1 vs training batches")  # fmt: skip
    return text


def noop_summary_markdown(reason: str, pool: dict[str, Any], model_name: str) -> str:
    """The summary of a pipeline run that had nothing new to learn: the title says so, then why, then the pool."""
    return "\n".join(["# VeCAF pipeline run: nothing to do", "", f"**{model_name}: {reason}.**", "", pool_line(pool)])


@task(name="publish-pipeline-summary", **SERVER_TASK)
def publish_noop_summary_task(reason: str, pool: dict[str, Any], model_name: str) -> str:
    """The summary artifact of a pipeline run that had nothing new to learn (nothing trained or registered)."""
    from prefect.artifacts import create_markdown_artifact

    text = noop_summary_markdown(reason, pool, model_name)
    create_markdown_artifact(markdown=text, key="vecaf-pipeline-summary", description="What this pipeline run produced")
    return text
