"""MLflow tasks: one parent run per finetuning, one nested run per loop, the model, and S3 checks.

What a finetuning run holds (the tracking server proxies artifacts to ``s3://<bucket>/mlflow``):

- parent run: params (every flow parameter, flattened), tags ``dataset_digest``, ``method``, ``pvm``,
  ``code_version``, ``mode``, ``prefect_flow_run_id``/``_url``; the resolved configuration
  (``config/settings.yaml``, ``config/params.yaml``, ``config/resolved.json``); the pool and the held-out split as
  ``mlflow.data`` datasets (contexts ``pool`` and ``evaluation``); corrupt images skipped
  (``data/skipped-images.json``, tag ``skipped_images``); per-loop metrics (step = loop) and the test curve
  (step = global batch); the model (``name="model"``, with an input example and the preprocessing in its
  metadata).
- nested run ``loop-<l>`` (tag ``mlflow.parentRunId``): that loop's per-batch training loss and per-n-batch
  test metrics, its summary, the selected subset as an ``mlflow.data`` dataset (context ``training``) and
  ``selection/picks-loop-<l>.parquet`` (image ids and why each was picked: loss under the model at the loop
  start, the centroid it matched, its caption).

Every task that talks to a server first checks the endpoint, retries (Prefect ``retries``), and fails with
:class:`EndpointUnreachableError`, whose message names the endpoint. MLflow's own HTTP retries are cut to
a few quick ones (unless ``MLFLOW_HTTP_REQUEST_*`` variables say otherwise), so Prefect's retries decide.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from tasks.data import LOCAL_TASK

SERVER_TASK: dict[str, Any] = {**LOCAL_TASK, "retries": 2, "retry_delay_seconds": [2, 10]}
"""Options of a task that talks to a server: two retries, 2 s then 10 s apart."""

_MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "120",
}
_CONNECTION_MARKERS = (
    "Max retries exceeded",
    "Connection refused",
    "Failed to establish a new connection",
    "Could not connect to the endpoint",
    "Connection aborted",
    "Read timed out",
    "RemoteDisconnected",
)


class EndpointUnreachableError(ConnectionError):
    """A server of the stack (MLflow, S3) did not answer; the message names its endpoint."""


def _looks_like_connection_error(exc: BaseException) -> bool:
    import requests
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import EndpointConnectionError

    if isinstance(exc, (requests.exceptions.ConnectionError, EndpointConnectionError, BotoConnectionError)):
        return True
    if isinstance(exc, (ConnectionError, urllib.error.URLError, TimeoutError)):
        return True
    text = str(exc)
    return any(marker in text for marker in _CONNECTION_MARKERS)


@contextlib.contextmanager
def talking_to(what: str, endpoint: str) -> Iterator[None]:
    """Turn a connection failure inside the block into :class:`EndpointUnreachableError` naming ``endpoint``."""
    try:
        yield
    except EndpointUnreachableError:
        raise
    except Exception as exc:
        if _looks_like_connection_error(exc):
            raise EndpointUnreachableError(
                f"{what} at {endpoint} is unreachable ({type(exc).__name__}: {str(exc)[:300]}); "
                "is the stack up (`vecaf stack up`, `vecaf stack status`)?"
            ) from exc
        raise


def check_mlflow(tracking_uri: str, *, timeout: float = 5.0) -> None:
    """GET ``<tracking_uri>/health``; raise :class:`EndpointUnreachableError` unless it answers 200."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    url = f"{tracking_uri.rstrip('/')}/health"
    try:
        with opener.open(url, timeout=timeout) as response:
            if response.status == 200:
                return
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        raise EndpointUnreachableError(
            f"MLflow tracking server at {tracking_uri} is unreachable ({exc}); is the stack up (`vecaf stack up`)?"
        ) from exc
    raise EndpointUnreachableError(f"MLflow tracking server at {tracking_uri} answered {url} with HTTP {status}")


def mlflow_client(tracking_uri: str) -> Any:
    """Check the server, point the fluent API at it and return an ``MlflowClient`` for it."""
    for key, value in _MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    check_mlflow(tracking_uri)
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def s3_location(artifact_uri: str, bucket: str) -> str:
    """Where an ``mlflow-artifacts:`` URI lands in the bucket: ``s3://<bucket>/mlflow/<path>``.

    The stack's MLflow server runs with ``--artifacts-destination s3://<bucket>/mlflow``; an ``s3://`` URI is
    returned as is.
    """
    if artifact_uri.startswith("s3://"):
        return artifact_uri
    prefix = "mlflow-artifacts:"
    if not artifact_uri.startswith(prefix):
        raise ValueError(f"artifact URI {artifact_uri!r} is neither mlflow-artifacts: nor s3://")
    path = artifact_uri[len(prefix) :]
    if path.startswith("//"):
        path = path[2:].split("/", 1)[1] if "/" in path[2:] else ""
    return f"s3://{bucket}/mlflow/{path.lstrip('/')}"


def code_version() -> str:
    """The git commit of the project (``+dirty`` when the tree has changes), else the package version."""
    import vecaf

    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if rev.returncode == 0 and rev.stdout.strip():
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return f"vecaf-{vecaf.__version__}"


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested parameters as MLflow params: ``{"training.ratio": "0.01", ...}`` (None as "None")."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value))[:6000]
        else:
            out[name] = str(value)[:6000]
    return out


def _pandas_dataset(df: Any, *, source: str, name: str) -> Any:
    """``mlflow.data.from_pandas`` with target column "label" (its hint about integer columns silenced)."""
    import mlflow.data

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column", category=UserWarning)
        return mlflow.data.from_pandas(df, source=source, name=name, targets="label")


def _dataset_from_manifest(manifest: str, name: str) -> Any:
    import pandas as pd

    df = pd.read_parquet(manifest, columns=["image_id", "label", "class_name", "content_hash"])
    return _pandas_dataset(df, source=manifest, name=name)


def _metric(key: str, value: float, step: int, ts: int) -> Any:
    from mlflow.entities import Metric

    return Metric(key=key, value=float(value), timestamp=ts, step=int(step))


def _log_metrics(client: Any, run_id: str, metrics: list[Any]) -> None:
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def start_run(
    tracking_uri: str,
    experiment: str,
    *,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    config: Mapping[str, str],
    pool_manifest: str,
    test_manifest: str,
    skipped: list[list[str]] | None = None,
) -> dict[str, str]:
    """Create the parent run: params, tags, the resolved configuration, the pool and held-out datasets.

    Args:
        tracking_uri: the MLflow server.
        experiment: experiment name (created when missing).
        run_name: the run's name.
        params: the flow parameters (nested; flattened here).
        tags: tags of the run.
        config: artifact path under ``config/`` -> text (the resolved settings and parameters).
        pool_manifest: the pool's manifest Parquet (logged as dataset, context "pool").
        test_manifest: the held-out manifest (context "evaluation").
        skipped: corrupt images left out of the pool, reported as ``data/skipped-images.json``.

    Returns:
        ``{"run_id", "experiment_id", "artifact_uri"}``.
    """
    from mlflow.entities import DatasetInput, InputTag, Param, RunTag

    with talking_to("MLflow tracking server", tracking_uri):
        client = mlflow_client(tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        experiment_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
        run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
        run_id = run.info.run_id
        flat = flatten_params(params)
        items = [Param(k, v) for k, v in flat.items()]
        for start in range(0, len(items), 100):
            client.log_batch(run_id, params=items[start : start + 100])
        for name, text in config.items():
            client.log_text(run_id, text, f"config/{name}")
        if skipped:
            report = {"skipped": [{"image": p, "reason": r} for p, r in skipped]}
            client.log_dict(run_id, report, "data/skipped-images.json")
        client.log_batch(run_id, tags=[RunTag("skipped_images", str(len(skipped or [])))])
        inputs = []
        for manifest, context in ((pool_manifest, "pool"), (test_manifest, "evaluation")):
            ds = _dataset_from_manifest(manifest, Path(manifest).stem)
            inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
        client.log_inputs(run_id, datasets=inputs)
    return {"run_id": run_id, "experiment_id": experiment_id, "artifact_uri": run.info.artifact_uri}


def log_loop(
    tracking_uri: str,
    parent_run_id: str,
    record_path: str,
    picks_path: str,
    *,
    bucket: str,
    dataset_name: str,
    losses: Mapping[str, Any] | None = None,
) -> str:
    """Log one loop: a nested run with its metrics, subset dataset and picks; per-loop metrics on the parent.

    Args:
        tracking_uri: the MLflow server.
        parent_run_id: the finetuning run.
        record_path: the loop's JSON record written by ``tasks.training.train_loop``.
        picks_path: the loop's picks Parquet.
        bucket: the S3 bucket behind the server (names the subset's source).
        dataset_name: the pool's name (the subset is called ``<name>-loop<l>-subset``).
        losses: the ``compute-losses`` summary of the loop (mean pool loss after the loop), if any.

    Returns:
        The nested run's id.

    A retry is idempotent: the nested run of this parent and loop made by an earlier attempt (found by the
    tags ``mlflow.parentRunId`` and ``loop``) is reused, and metrics carry the record file's time, so
    logging them again adds no duplicate points.
    """
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag, Param, RunStatus

    record = json.loads(Path(record_path).read_text())
    loop = int(record["loop"]) - 1
    ts = int(Path(record_path).stat().st_mtime * 1000)
    with talking_to("MLflow tracking server", tracking_uri):
        client = mlflow_client(tracking_uri)
        parent = client.get_run(parent_run_id)
        tags = {
            "mlflow.parentRunId": parent_run_id,
            "loop": str(loop + 1),
            **{k: v for k, v in parent.data.tags.items() if k in ("method", "pvm", "dataset_digest", "code_version")},
        }
        earlier = client.search_runs(
            [parent.info.experiment_id],
            f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.loop = '{loop + 1}'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        if earlier:
            child = earlier[0]
        else:
            child = client.create_run(parent.info.experiment_id, run_name=f"loop-{loop + 1}", tags=tags)
        cid = child.info.run_id
        params = [
            Param("loop", str(loop + 1)),
            Param("budget", str(record["budget"])),
            Param("batches", str(record["batches"])),
            Param("end_batches", str(record["end_batches"])),
        ]
        summary = {
            "top1": record["top1"],
            "test_loss": record["test_loss"],
            "train_loss_mean": record["train_loss"],
            "selected": record["budget"],
            "mean_pick_loss": record.get("mean_pick_loss"),
            **{f"seconds_{k}": v for k, v in record.get("seconds", {}).items()},
        }
        if losses:
            summary["pool_loss_after"] = losses.get("mean")
        metrics = [_metric(k, v, loop + 1, ts) for k, v in summary.items() if v is not None]
        metrics += [_metric("train_loss", v, b, ts) for b, v in record["train_curve"]]
        for point in record["evals"]:
            metrics += [_metric("test_top1", point["top1"], point["batches"], ts)]
            metrics += [_metric("test_loss", point["loss"], point["batches"], ts)]
        client.log_batch(cid, params=params)
        _log_metrics(client, cid, metrics)
        client.log_artifact(cid, picks_path, "selection")
        client.log_artifact(cid, record_path, "selection")
        picks = pd.read_parquet(picks_path)
        source = s3_location(f"{child.info.artifact_uri}/selection/{Path(picks_path).name}", bucket)
        subset = _pandas_dataset(
            picks[["image_id", "label", "class_name", "loss", "centroid"]],
            source=source,
            name=f"{dataset_name}-loop{loop + 1}-subset",
        )
        client.log_inputs(
            cid, datasets=[DatasetInput(subset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])]
        )
        client.set_terminated(cid, RunStatus.to_string(RunStatus.FINISHED))
        parent_metrics = [
            _metric("loop_top1", record["top1"], loop + 1, ts),
            _metric("loop_test_loss", record["test_loss"], loop + 1, ts),
            _metric("loop_train_loss", record["train_loss"], loop + 1, ts),
            _metric("loop_selected", record["budget"], loop + 1, ts),
        ]
        parent_metrics += [_metric("test_top1", p["top1"], p["batches"], ts) for p in record["evals"]]
        parent_metrics += [_metric("test_loss", p["loss"], p["batches"], ts) for p in record["evals"]]
        _log_metrics(client, parent_run_id, parent_metrics)
    return cid


def log_model(
    tracking_uri: str,
    run_id: str,
    model_path: str,
    *,
    metadata: Mapping[str, Any],
    input_shape: tuple[int, ...],
    final_metrics: Mapping[str, float],
    result_path: str | None = None,
) -> dict[str, str]:
    """Log the trained network to the parent run as an MLflow PyTorch model (artifacts go to S3).

    The whole network is logged (backbone + trained head in ``head`` mode), so promotion can re-evaluate it
    on images. Its MLmodel metadata holds the preprocessing (timm data config), the class names and the PVM.

    Args:
        tracking_uri: the MLflow server.
        run_id: the parent run.
        model_path: the pickled ``torch.nn.Module`` written by the last ``train-loop``.
        metadata: MLmodel metadata (JSON-ready).
        input_shape: (3, S, S): one normalised image; the input example is a batch of one zero image.
        final_metrics: metrics of the final model (``test_top1``...), logged as ``final_*``.
        result_path: the engine's full result JSON, logged as ``training/result.json``.

    Returns:
        ``{"model_id", "model_uri", "artifact_uri"}`` (``models:/<model_id>`` and where its files are).
    """
    import numpy as np
    import torch

    model = torch.load(model_path, map_location="cpu", weights_only=False)
    model.eval()
    example = np.zeros((1, *input_shape), dtype=np.float32)
    ts = int(time.time() * 1000)
    with talking_to("MLflow tracking server", tracking_uri):
        client = mlflow_client(tracking_uri)
        import mlflow
        import mlflow.pytorch
        import timm

        mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"]
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=example,
            pip_requirements=requirements,
            metadata=dict(metadata),
            serialization_format="pickle",
            run_id=run_id,
        )
        if result_path:
            client.log_artifact(run_id, result_path, "training")
        _log_metrics(client, run_id, [_metric(f"final_{k}", v, 0, ts) for k, v in final_metrics.items()])
        logged = client.get_logged_model(info.model_id)
    return {
        "model_id": info.model_id,
        "model_uri": info.model_uri,
        "artifact_uri": logged.artifact_location,
    }


def verify_model_artifacts(
    stack: Any, artifact_uri: str, *, required: tuple[str, ...] = ("MLmodel",)
) -> dict[str, Any]:
    """Check with boto3 that the model's files are in the bucket (registration happens only after this).

    Args:
        stack: the ``StackSettings`` (S3 endpoint, keys, bucket).
        artifact_uri: the model's artifact location (``mlflow-artifacts:/...``).
        required: file names that must be among the objects.

    Returns:
        ``{"s3_uri", "objects": [keys], "bytes": total size}``.

    Raises:
        EndpointUnreachableError: the S3 endpoint does not answer (named in the message).
        FileNotFoundError: a required file is missing.
    """
    from infra.stack import s3_client, stack_urls

    uri = s3_location(artifact_uri, stack.bucket)
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    endpoint = stack_urls(stack)["s3_endpoint_url"]
    keys: list[str] = []
    size = 0
    with talking_to("S3 endpoint", endpoint):
        client = s3_client(stack, timeout=5.0)
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
            for obj in page.get("Contents", []):
                keys.append(obj["Key"])
                size += int(obj["Size"])
    names = {k.rsplit("/", 1)[-1] for k in keys}
    missing = [r for r in required if r not in names]
    if missing:
        raise FileNotFoundError(f"the model's files {missing} are not in {uri} (found {len(keys)} objects)")
    if not any(k.endswith((".pth", ".pt", ".pt2")) for k in keys):
        raise FileNotFoundError(f"no model weights (.pth/.pt/.pt2) under {uri} (found {sorted(names)})")
    return {"s3_uri": uri, "objects": keys, "bytes": size}


def end_run(tracking_uri: str, run_id: str, *, status: str = "FINISHED", tags: Mapping[str, str] | None = None) -> None:
    """Mark the run FINISHED (or FAILED/KILLED) and add final tags."""
    from mlflow.entities import RunTag

    with talking_to("MLflow tracking server", tracking_uri):
        client = mlflow_client(tracking_uri)
        if tags:
            client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        client.set_terminated(run_id, status)


@task(name="mlflow-start-run", **SERVER_TASK)
def start_run_task(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    config: dict[str, str],
    pool_manifest: str,
    test_manifest: str,
    skipped: list[list[str]] | None = None,
) -> dict[str, str]:
    """Prefect task around :func:`start_run`."""
    out = start_run(
        tracking_uri, experiment, run_name=run_name, params=params, tags=tags, config=config,
        pool_manifest=pool_manifest, test_manifest=test_manifest, skipped=skipped,
    )  # fmt: skip
    get_run_logger().info("MLflow run %s in experiment %s", out["run_id"], experiment)
    return out


@task(name="mlflow-log-loop", **SERVER_TASK)
def log_loop_task(
    tracking_uri: str,
    parent_run_id: str,
    record_path: str,
    picks_path: str,
    bucket: str,
    dataset_name: str,
    losses: dict[str, Any] | None = None,
) -> str:
    """Prefect task around :func:`log_loop`."""
    return log_loop(
        tracking_uri, parent_run_id, record_path, picks_path, bucket=bucket, dataset_name=dataset_name, losses=losses
    )


@task(name="mlflow-log-model", **SERVER_TASK)
def log_model_task(
    tracking_uri: str,
    run_id: str,
    model_path: str,
    metadata: dict[str, Any],
    input_shape: tuple[int, ...],
    final_metrics: dict[str, float],
    result_path: str | None = None,
) -> dict[str, str]:
    """Prefect task around :func:`log_model`."""
    out = log_model(
        tracking_uri, run_id, model_path, metadata=metadata, input_shape=tuple(input_shape),
        final_metrics=final_metrics, result_path=result_path,
    )  # fmt: skip
    get_run_logger().info("logged model %s (%s)", out["model_id"], out["artifact_uri"])
    return out


@task(name="verify-model-artifacts", **SERVER_TASK)
def verify_model_artifacts_task(stack: Any, artifact_uri: str) -> dict[str, Any]:
    """Prefect task around :func:`verify_model_artifacts` (small result: the key list is dropped)."""
    out = verify_model_artifacts(stack, artifact_uri)
    get_run_logger().info("model files in %s: %d objects, %d bytes", out["s3_uri"], len(out["objects"]), out["bytes"])
    return {"s3_uri": out["s3_uri"], "count": len(out["objects"]), "bytes": out["bytes"]}


@task(name="mlflow-end-run", **SERVER_TASK)
def end_run_task(tracking_uri: str, run_id: str, status: str = "FINISHED", tags: dict[str, str] | None = None) -> None:
    """Prefect task around :func:`end_run`."""
    end_run(tracking_uri, run_id, status=status, tags=tags)
