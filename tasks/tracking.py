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
    """A server (MLflow, or S3 behind it or called directly) did not answer; the message names it and its URL."""


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


MLFLOW_SERVER = "MLflow tracking server"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""The experiment tag MLflow 3's UI reads to open an experiment in its model-training view (not GenAI)."""
EXPERIMENT_KIND = "custom_model_development"
UI_WORKFLOW_QUERY = "workflowType=machine_learning"
"""The query that makes a printed MLflow UI link open in the model-training view, sidebar with the registry."""
_ARTIFACT_PROXY_PATH = "/mlflow-artifacts/"
"""Requests under this path go through MLflow's artifact proxy, which forwards them to the S3 store."""


def artifact_store_endpoint() -> str | None:
    """The S3 endpoint behind MLflow's artifact proxy, as this process knows it (None when it does not).

    From the settings' ``services.s3_endpoint_url`` when that exists, else ``MLFLOW_S3_ENDPOINT_URL``,
    ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (the stack's client environment sets the first two).
    """
    try:
        from vecaf.settings import load_settings

        services = getattr(load_settings(), "services", None)
        url = getattr(services, "s3_endpoint_url", None)
        if url:
            return str(url)
    except Exception:  # noqa: BLE001 - naming the store is a courtesy; the error being raised matters more
        pass
    for key in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(key):
            return os.environ[key]
    return None


def _http_status(url: str, *, timeout: float = 5.0) -> int | None:
    """The HTTP status a GET of ``url`` answers (None when nothing answers)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


def _server_error(exc: BaseException) -> bool:
    text = str(exc)
    return any(marker in text for marker in ("500 error responses", "502 error", "503 error", "504 error")) or (
        getattr(exc, "error_code", "") in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE")
    )


def blame(exc: BaseException, tracking_uri: str) -> EndpointUnreachableError | None:
    """Which part failed when a call to the MLflow server did: MLflow itself, or S3 behind its artifact proxy.

    MLflow's artifact proxy answers HTTP 500 with no detail when its S3 store is down, and MLflow's client
    reports that as "Max retries exceeded". So: when MLflow's ``/health`` answers 200 and the failing request
    went through the proxy (``/mlflow-artifacts/``), a listing of the proxy's root is tried; when that fails
    too (5xx), the S3 store is named, with its endpoint when known (:func:`artifact_store_endpoint`).

    Returns:
        The error to raise instead of ``exc``, or None when ``exc`` is not a connection or server failure.
    """
    if not (_looks_like_connection_error(exc) or _server_error(exc)):
        return None
    root = tracking_uri.rstrip("/")
    detail = f"{type(exc).__name__}: {str(exc)[:300]}"
    if _http_status(f"{root}/health") != 200:
        return EndpointUnreachableError(
            f"{MLFLOW_SERVER} at {tracking_uri} is unreachable ({detail}); "
            "is the stack up (`vecaf stack up`, `vecaf stack status`)?"
        )
    if _ARTIFACT_PROXY_PATH in str(exc):
        status = _http_status(f"{root}/api/2.0/mlflow-artifacts/artifacts?path=")
        if status is None or status >= 500:
            store = artifact_store_endpoint()
            where = f"S3 endpoint {store}" if store else "the S3 store"
            return EndpointUnreachableError(
                f"{where} (behind MLflow's artifact proxy at {tracking_uri}) is unreachable: MLflow answers "
                f"/health, but its artifact proxy answers HTTP {status} ({detail}); is the S3 server up "
                "(`vecaf stack status`)?"
            )
    return EndpointUnreachableError(
        f"{MLFLOW_SERVER} at {tracking_uri} failed ({detail}); it answers /health now, so retry, or see its log"
    )


@contextlib.contextmanager
def talking_to(what: str, endpoint: str) -> Iterator[None]:
    """Turn a connection failure inside the block into :class:`EndpointUnreachableError` naming the failing part.

    For the MLflow tracking server, :func:`blame` decides whether MLflow or the S3 store behind its artifact
    proxy failed; for any other endpoint (a direct S3 call) the endpoint itself is named.
    """
    try:
        yield
    except EndpointUnreachableError:
        raise
    except Exception as exc:
        if what == MLFLOW_SERVER:
            error = blame(exc, endpoint)
            if error is not None:
                raise error from exc
            raise
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


def mlflow_ui_url(tracking_uri: str, route: str = "") -> str:
    """A page of the MLflow UI that opens in its model-training view (``route`` like ``experiments/1/runs/<id>``)."""
    return f"{tracking_uri.rstrip('/')}/#/{route.strip('/')}?{UI_WORKFLOW_QUERY}"


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of a run (model-training view)."""
    return mlflow_ui_url(tracking_uri, f"experiments/{experiment_id}/runs/{run_id}")


def mlflow_model_version_url(tracking_uri: str, name: str, version: str | int) -> str:
    """The MLflow UI page of a registered model version (model-training view)."""
    return mlflow_ui_url(tracking_uri, f"models/{name}/versions/{version}")


def mlflow_logged_model_url(tracking_uri: str, experiment_id: str, model_id: str) -> str:
    """The MLflow UI page of a logged model (its metrics, parameters and files)."""
    return mlflow_ui_url(tracking_uri, f"experiments/{experiment_id}/models/{model_id}")


def ensure_training_experiment(client: Any, experiment: str) -> str:
    """The experiment's id (created when missing), tagged so MLflow's UI opens it in the model-training view."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return str(client.create_experiment(experiment, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}))
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return str(exp.experiment_id)


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

    from tasks.storage import local_copy

    df = pd.read_parquet(local_copy(manifest), columns=["image_id", "label", "class_name", "content_hash"])
    return _pandas_dataset(df, source=manifest, name=name)


def _metric(key: str, value: float, step: int, ts: int, model_id: str | None = None) -> Any:
    from mlflow.entities import Metric

    return Metric(key=key, value=float(value), timestamp=ts, step=int(step), model_id=model_id)


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

    with talking_to(MLFLOW_SERVER, tracking_uri):
        client = mlflow_client(tracking_uri)
        experiment_id = ensure_training_experiment(client, experiment)
        run_tags = {"mlflow.source.type": "JOB", "mlflow.source.name": "vecaf-pipeline (Prefect flow finetune)"}
        run = client.create_run(experiment_id, run_name=run_name, tags={**run_tags, **dict(tags)})
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

    from tasks.storage import local_copy

    record_path, picks_path = local_copy(record_path), local_copy(picks_path)  # s3:// run state: via the cache
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
        seconds = sum(float(v) for v in record.get("seconds", {}).values())
        started = ts - int(seconds * 1000)
        tags["mlflow.note.content"] = (
            f"Loop {loop + 1}: {record['budget']} images selected, {record['batches']} training batches "
            f"(up to batch {record['end_batches']}); held-out top-1 {record['top1']:.4f}."
        )
        if earlier:
            child = earlier[0]
        else:
            child = client.create_run(
                parent.info.experiment_id, run_name=f"loop-{loop + 1}", tags=tags, start_time=started
            )
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
        client.set_terminated(cid, RunStatus.to_string(RunStatus.FINISHED), end_time=max(ts, started + 1))
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


MODEL_FLAVOR = "vecaf_classifier"
"""The MLmodel flavor of a classifier stored by ``vecaf.models.classifier`` (JSON config + safetensors)."""
MODEL_FILES = ("MLmodel", "config.json", "model.safetensors")
"""The files a logged model of this pipeline has, all of them: no other file is ever read or accepted."""


def _model_dir_config(model_dir: str) -> dict[str, Any]:
    from vecaf.models.classifier import CONFIG_FILE, WEIGHTS_FILE, check_classifier_config

    root = Path(model_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root / name} is missing: {model_dir} is not a folder written by save_classifier")
    config = json.loads((root / CONFIG_FILE).read_text())
    check_classifier_config(config)
    return config


def _mlmodel(
    model_id: str, run_id: str, artifact_location: str, config: Mapping[str, Any], metadata: Mapping[str, Any]
) -> Any:
    """The MLmodel description: flavor ``vecaf_classifier`` only (no python_function: nothing to unpickle)."""
    import safetensors
    import timm
    import torch
    from mlflow.models import Model

    from vecaf.models.classifier import CLASSIFIER_FORMAT, CLASSIFIER_FORMAT_VERSION, CONFIG_FILE, WEIGHTS_FILE

    mlmodel = Model(
        artifact_path=artifact_location, run_id=run_id, model_uuid=model_id, model_id=model_id,
        metadata=dict(metadata),
    )  # fmt: skip
    mlmodel.add_flavor(
        MODEL_FLAVOR,
        format=CLASSIFIER_FORMAT,
        format_version=CLASSIFIER_FORMAT_VERSION,
        config=CONFIG_FILE,
        weights=WEIGHTS_FILE,
        weights_sha256=config.get("weights_sha256"),
        arch=config["arch"],
        torch_version=torch.__version__.split("+")[0],
        timm_version=timm.__version__,
        safetensors_version=safetensors.__version__,
        loader="vecaf.models.classifier.load_classifier",
    )
    return mlmodel


def log_model(
    tracking_uri: str,
    run_id: str,
    model_dir: str,
    *,
    metadata: Mapping[str, Any],
    final_metrics: Mapping[str, float],
    result_path: str | None = None,
    final_step: int | None = None,
) -> dict[str, str]:
    """Log the trained network to the parent run as an MLflow logged model, without pickle (artifacts go to S3).

    The model's artifacts are ``MLmodel`` (flavor ``vecaf_classifier``; its metadata holds the preprocessing,
    the class names and the PVM), ``config.json`` (the architecture) and ``model.safetensors`` (the weights),
    as ``vecaf.models.classifier.save_classifier`` wrote them: promotion rebuilds the network from the config
    and loads the weights with strict checks, so a stored model can never run code.

    The logged model is created PENDING, its files uploaded, then finalized READY; when anything fails
    midway it is finalized FAILED before the error is raised, so no half-logged model stays PENDING.

    Args:
        tracking_uri: the MLflow server.
        run_id: the parent run.
        model_dir: the folder written by ``save_classifier`` (``config.json`` + ``model.safetensors``).
        metadata: MLmodel metadata (JSON-ready).
        final_metrics: metrics of the final model (``test_top1``...), logged as ``final_*``.
        result_path: the engine's full result JSON, logged as ``training/result.json``.
        final_step: the global batch of the final model (the model is the run's output at this step; its
            final metrics are logged at it). None: read from the run's ``test_top1`` history (its last step).

    The final metrics are logged twice, both WITH the logged model's id: as ``final_<name>`` and as
    ``<name>`` at the final step, so the logged-model page (and the registered version's) shows the final
    numbers, never the untrained model's step-0 values.

    Returns:
        ``{"model_id", "model_uri", "artifact_uri"}`` (``models:/<model_id>`` and where its files are).
    """
    import shutil
    import tempfile

    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    from vecaf.models.classifier import CONFIG_FILE, WEIGHTS_FILE

    from tasks.storage import local_copy

    model_dir = local_copy(model_dir)  # s3:// run state: via the cache
    result_path = local_copy(result_path) if result_path else None
    config = _model_dir_config(model_dir)
    ts = int(time.time() * 1000)
    final_step = int(final_step or 0)
    with talking_to(MLFLOW_SERVER, tracking_uri):
        client = mlflow_client(tracking_uri)
        experiment_id = client.get_run(run_id).info.experiment_id
        if final_step is None or final_step <= 0:
            history = client.get_metric_history(run_id, "test_top1")
            final_step = max((int(m.step) for m in history), default=0)
        logged = client.create_logged_model(
            experiment_id, name="model", source_run_id=run_id, model_type=MODEL_FLAVOR,
            tags={"vecaf.format": f"{config['format']}/{config['format_version']}"},
        )  # fmt: skip
        try:
            client.log_outputs(run_id=run_id, models=[LoggedModelOutput(logged.model_id, step=final_step)])
            with tempfile.TemporaryDirectory(prefix="vecaf-model-") as tmp:
                for name in (CONFIG_FILE, WEIGHTS_FILE):
                    shutil.copyfile(Path(model_dir) / name, Path(tmp) / name)
                _mlmodel(logged.model_id, run_id, logged.artifact_location, config, metadata).save(
                    str(Path(tmp) / "MLmodel")
                )
                client.log_model_artifacts(logged.model_id, tmp)
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        except BaseException:
            _fail_logged_model(client, logged.model_id)
            raise
        if result_path:
            client.log_artifact(run_id, result_path, "training")
        final = [_metric(f"final_{k}", v, final_step, ts, logged.model_id) for k, v in final_metrics.items()]
        final += [_metric(k, v, final_step, ts, logged.model_id) for k, v in final_metrics.items()]
        _log_metrics(client, run_id, final)
    return {
        "model_id": logged.model_id,
        "model_uri": f"models:/{logged.model_id}",
        "artifact_uri": logged.artifact_location,
    }


def _fail_logged_model(client: Any, model_id: str) -> None:
    """Finalize a half-logged model FAILED (best effort: the original error is the one to report)."""
    from mlflow.entities import LoggedModelStatus

    try:
        client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
    except Exception:  # noqa: BLE001 - a dead server cannot be told; reconciliation fails it later
        pass


def list_model_files(tracking_uri: str, model_id: str) -> list[tuple[str, int]]:
    """Every file of a logged model, as MLflow lists them: ``[(relative path, size in bytes)]``."""
    with talking_to(MLFLOW_SERVER, tracking_uri):
        client = mlflow_client(tracking_uri)
        files: list[tuple[str, int]] = []
        pending: list[str | None] = [None]
        while pending:
            folder = pending.pop()
            for info in client.list_logged_model_artifacts(model_id, folder):
                if info.is_dir:
                    pending.append(info.path)
                else:
                    files.append((info.path, int(info.file_size or 0)))
    return sorted(files)


class UnsafeModelError(ValueError):
    """A stored model is not in the ``vecaf_classifier`` format (config + safetensors): it is never loaded."""


def resolve_model_id(tracking_uri: str, model_uri: str) -> str:
    """The logged model behind ``models:/<name>/<version>`` or ``models:/<model_id>``.

    Raises:
        UnsafeModelError: the version has no logged model (registered from a run's files, not by this pipeline).
    """
    prefix = "models:/"
    if not model_uri.startswith(prefix):
        raise ValueError(f"model URI {model_uri!r} is not models:/<name>/<version> or models:/<model_id>")
    parts = model_uri[len(prefix) :].strip("/").split("/")
    if len(parts) == 1:
        return parts[0]
    if len(parts) != 2:
        raise ValueError(f"model URI {model_uri!r} is not models:/<name>/<version> or models:/<model_id>")
    with talking_to(MLFLOW_SERVER, tracking_uri):
        version = mlflow_client(tracking_uri).get_model_version(parts[0], parts[1])
    model_id = getattr(version, "model_id", None)
    source = str(version.source or "")
    if not model_id and source.startswith(prefix) and "/" not in source[len(prefix) :]:
        model_id = source[len(prefix) :]  # the REST API gives the logged model as the source, not always model_id
    if not model_id:
        raise UnsafeModelError(
            f"{model_uri} has no logged model (source {source!r}): not stored by this pipeline, not loaded"
        )
    return str(model_id)


def check_stored_model(tracking_uri: str, model_id: str) -> dict[str, Any]:
    """Check, before anything is deserialized, that a logged model is a ``vecaf_classifier`` (no pickle).

    Only MLflow's file listing and the ``MLmodel`` YAML (read with ``yaml.safe_load``) are looked at: the
    files must be exactly :data:`MODEL_FILES` and ``MLmodel`` must declare the ``vecaf_classifier`` flavor of
    this format version. Anything else (a ``pytorch`` flavor, a ``.pth``/``.pkl`` file, a python_function
    loader) is refused.

    Returns:
        ``{"model_id", "artifact_uri", "metadata", "flavor"}``.

    Raises:
        UnsafeModelError: the model is in another format; the message says what was found.
    """
    import tempfile

    import yaml

    from vecaf.models.classifier import CLASSIFIER_FORMAT, CLASSIFIER_FORMAT_VERSION

    files = {path for path, _ in list_model_files(tracking_uri, model_id)}
    if files != set(MODEL_FILES):
        raise UnsafeModelError(
            f"logged model {model_id} holds {sorted(files)}, not exactly {list(MODEL_FILES)} (the {MODEL_FLAVOR} "
            "format: JSON config + safetensors weights); it is not loaded (a pickled model could run code)"
        )
    with talking_to(MLFLOW_SERVER, tracking_uri):
        client = mlflow_client(tracking_uri)
        logged = client.get_logged_model(model_id)
        import mlflow.artifacts

        with tempfile.TemporaryDirectory(prefix="vecaf-mlmodel-") as tmp:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{logged.artifact_location.rstrip('/')}/MLmodel", dst_path=tmp, tracking_uri=tracking_uri
            )
            text = Path(path).read_text()
    try:
        mlmodel = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UnsafeModelError(f"logged model {model_id}: its MLmodel is not valid YAML ({exc})") from exc
    flavors = mlmodel.get("flavors") if isinstance(mlmodel, dict) else None
    flavor = flavors.get(MODEL_FLAVOR) if isinstance(flavors, dict) else None
    if not isinstance(flavor, dict):
        found = sorted(flavors) if isinstance(flavors, dict) else flavors
        raise UnsafeModelError(
            f"logged model {model_id} has flavors {found}, not {MODEL_FLAVOR}: it is not loaded (only models stored "
            "as JSON config + safetensors weights are, never pickles)"
        )
    if flavor.get("format") != CLASSIFIER_FORMAT or flavor.get("format_version") != CLASSIFIER_FORMAT_VERSION:
        raise UnsafeModelError(
            f"logged model {model_id} is {flavor.get('format')!r} version {flavor.get('format_version')!r}, not "
            f"{CLASSIFIER_FORMAT!r} version {CLASSIFIER_FORMAT_VERSION}: it is not loaded"
        )
    metadata = mlmodel.get("metadata") if isinstance(mlmodel.get("metadata"), dict) else {}
    return {"model_id": model_id, "artifact_uri": logged.artifact_location, "metadata": metadata, "flavor": flavor}


def load_stored_model(tracking_uri: str, model_uri: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Check a logged model (:func:`check_stored_model`), then download its config and weights and rebuild it.

    Returns:
        ``(model, config, metadata)``: the network on the CPU in eval mode (``vecaf.models.classifier``
        rebuilt it from the JSON config and loaded the safetensors weights with strict checks).
    """
    import tempfile

    import mlflow.artifacts

    from vecaf.models.classifier import CONFIG_FILE, WEIGHTS_FILE, load_classifier

    stored = check_stored_model(tracking_uri, resolve_model_id(tracking_uri, model_uri))
    with tempfile.TemporaryDirectory(prefix="vecaf-model-") as tmp:
        with talking_to(MLFLOW_SERVER, tracking_uri):
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{stored['artifact_uri'].rstrip('/')}/{name}", dst_path=tmp, tracking_uri=tracking_uri
                )
        model, config = load_classifier(tmp)
    return model, config, stored["metadata"]


def verify_model_artifacts(
    tracking_uri: str, model_id: str, *, required: tuple[str, ...] = MODEL_FILES
) -> dict[str, Any]:
    """Check with MLflow's own listing that the logged model's files are stored (registration only after this).

    Args:
        tracking_uri: the MLflow server (its artifact proxy lists the files from the store behind it).
        model_id: the logged model.
        required: file names that must be among its files.

    Returns:
        ``{"artifact_uri", "files": [paths], "bytes": total size}``.

    Raises:
        EndpointUnreachableError: MLflow, or the S3 store behind its proxy, does not answer (named).
        FileNotFoundError: a required file is missing, or a file is empty.
    """
    files = list_model_files(tracking_uri, model_id)
    with talking_to(MLFLOW_SERVER, tracking_uri):
        logged = mlflow_client(tracking_uri).get_logged_model(model_id)
    names = {path for path, _ in files}
    missing = [r for r in required if r not in names]
    if missing:
        raise FileNotFoundError(
            f"logged model {model_id} lacks {missing} in {logged.artifact_location} (MLflow lists {sorted(names)})"
        )
    empty = [path for path, size in files if path in required and size <= 0]
    if empty:
        raise FileNotFoundError(f"logged model {model_id} has empty files {empty} in {logged.artifact_location}")
    return {"artifact_uri": logged.artifact_location, "files": [p for p, _ in files], "bytes": sum(s for _, s in files)}


def end_run(tracking_uri: str, run_id: str, *, status: str = "FINISHED", tags: Mapping[str, str] | None = None) -> None:
    """Mark the run FINISHED (or FAILED/KILLED) and add final tags."""
    from mlflow.entities import RunTag

    with talking_to(MLFLOW_SERVER, tracking_uri):
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
    model_dir: str,
    metadata: dict[str, Any],
    final_metrics: dict[str, float],
    result_path: str | None = None,
    final_step: int | None = None,
) -> dict[str, str]:
    """Prefect task around :func:`log_model`."""
    out = log_model(
        tracking_uri, run_id, model_dir, metadata=metadata, final_metrics=final_metrics, result_path=result_path,
        final_step=final_step,
    )  # fmt: skip
    get_run_logger().info("logged model %s (%s)", out["model_id"], out["artifact_uri"])
    return out


@task(name="verify-model-artifacts", **SERVER_TASK)
def verify_model_artifacts_task(tracking_uri: str, model_id: str) -> dict[str, Any]:
    """Prefect task around :func:`verify_model_artifacts` (small result: the file list is dropped)."""
    out = verify_model_artifacts(tracking_uri, model_id)
    get_run_logger().info("model files in %s: %d files, %d bytes", out["artifact_uri"], len(out["files"]), out["bytes"])
    return {"artifact_uri": out["artifact_uri"], "count": len(out["files"]), "bytes": out["bytes"]}


@task(name="mlflow-end-run", **SERVER_TASK)
def end_run_task(tracking_uri: str, run_id: str, status: str = "FINISHED", tags: dict[str, str] | None = None) -> None:
    """Prefect task around :func:`end_run`."""
    end_run(tracking_uri, run_id, status=status, tags=tags)


# --------------------------------------------------------------------------------------------------
# The pool version of a run, and runs with nothing new to learn

POOL_TAG_PREFIX = "pool."
COMPARED_GROUPS = ("data", "models", "ood_prompt", "objective", "training")
"""The parameter groups that change what a run learns (the registry group only says where it lands)."""


def pool_version_tags(version: Mapping[str, Any]) -> dict[str, str]:
    """The MLflow tags of a pool version (``tasks.data.pool_version``): ``pool.size``, ``pool.digest``,
    ``pool.new``, ``pool.cached``, ``pool.classes`` and ``pool.class_counts`` (JSON, class name -> images)."""
    counts = dict(version["class_counts"])
    return {
        f"{POOL_TAG_PREFIX}size": str(version["size"]),
        f"{POOL_TAG_PREFIX}digest": str(version["digest"]),
        f"{POOL_TAG_PREFIX}new": str(version["new"]),
        f"{POOL_TAG_PREFIX}cached": str(version["cached"]),
        f"{POOL_TAG_PREFIX}classes": str(len(counts)),
        f"{POOL_TAG_PREFIX}class_counts": json.dumps(counts)[:5000],
    }


def log_pool_version(tracking_uri: str, run_id: str, version: Mapping[str, Any]) -> None:
    """Record the pool version on a finetuning run: :func:`pool_version_tags` and ``data/pool-version.json``."""
    from mlflow.entities import RunTag

    with talking_to(MLFLOW_SERVER, tracking_uri):
        client = mlflow_client(tracking_uri)
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in pool_version_tags(version).items()])
        client.log_dict(run_id, dict(version), "data/pool-version.json")


def latest_version(tracking_uri: str, name: str) -> dict[str, Any] | None:
    """The newest version of a registered model and what it was trained on (None: no version, or no model).

    Returns:
        ``{"version", "run_id", "dataset_digest", "params"}``: the version's ``dataset_digest`` tag and its
        training run's params (flattened, as logged).
    """
    from mlflow.exceptions import MlflowException

    with talking_to(MLFLOW_SERVER, tracking_uri):
        client = mlflow_client(tracking_uri)
        try:
            versions = client.search_model_versions(f"name = '{name}'")
        except MlflowException as exc:
            if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        if not versions:
            return None
        newest = max(versions, key=lambda mv: int(mv.version))
        params = dict(client.get_run(newest.run_id).data.params) if newest.run_id else {}
    return {
        "version": str(newest.version),
        "run_id": newest.run_id,
        "dataset_digest": newest.tags.get("dataset_digest"),
        "params": params,
    }


def nothing_new(latest: Mapping[str, Any] | None, pool_digest: str, params: Mapping[str, Any]) -> str | None:
    """Why this run has nothing to learn, or None when it has.

    Nothing is new when the newest registered version was trained on this very pool (its ``dataset_digest``
    equals the pool's digest D: the same images and labels, no image added or removed) with the same
    parameters in the groups :data:`COMPARED_GROUPS` (a changed objective, prompt or training setting on the
    same images is worth a run).

    Args:
        latest: :func:`latest_version`'s answer.
        pool_digest: the pool's digest D now.
        params: this run's parameters by group (``{"data": {...}, "training": {...}, ...}``).

    Returns:
        A sentence for the log and the run's summary, or None.
    """
    if latest is None or latest.get("dataset_digest") != pool_digest:
        return None
    ours = flatten_params({k: params[k] for k in COMPARED_GROUPS if k in params})
    theirs = latest.get("params") or {}
    changed = sorted(k for k, v in ours.items() if theirs.get(k) != v)
    if changed:
        return None
    return (
        f"no new images since version {latest['version']} (pool digest {pool_digest[:12]}, trained with the same "
        "parameters): nothing trained, nothing registered, the champion stays"
    )


@task(name="mlflow-log-pool-version", **SERVER_TASK)
def log_pool_version_task(tracking_uri: str, run_id: str, version: dict[str, Any]) -> None:
    """Prefect task around :func:`log_pool_version`."""
    log_pool_version(tracking_uri, run_id, version)


@task(name="check-for-news", **SERVER_TASK)
def nothing_new_task(tracking_uri: str, name: str, pool_digest: str, params: dict[str, Any]) -> str | None:
    """:func:`nothing_new` against the newest version of ``name`` (:func:`latest_version`); logs the outcome."""
    reason = nothing_new(latest_version(tracking_uri, name), pool_digest, params)
    logger = get_run_logger()
    if reason:
        logger.warning("%s: %s", name, reason)
    else:
        logger.info("%s: the pool or the parameters changed since its newest version; training", name)
    return reason
