"""``vecaf-pipeline`` end to end on the real stack (Prefect server + worker, MLflow, S3, Feast).

The flows are deployed on the session stack's work pool and the pipeline is run through its deployment (the
stack's worker executes it) on scikit-learn's digits: a 500-image pool and 200 held-out images at 32 px,
``head`` mode, 2 loops of VeCAF selection. Then, from this process: MLflow holds per-loop metrics, the
subsets as datasets and a registered version with aliases; the bucket holds the model's files; Feast serves
online features of the selected images; rerunning caption/featurize computes nothing; an out-of-range
parameter is refused before any run; a worse challenger leaves the champion where it was.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from flows.params import DataParams, PipelineParams, RegistryParams, TrainingParams

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "vecaf-test-digits"
DATA = DataParams(dataset="digits", pool_size=500, test_size=200, image_size=32, shard_size=250)


def pipeline_params() -> PipelineParams:
    return PipelineParams(
        data=DATA,
        training=TrainingParams(ratio=0.04, loops=2, batch_budget=20, batch_size=16, lr=0.05),
        registry=RegistryParams(experiment="vecaf-test", model_name=MODEL),
    )


@pytest.fixture(scope="module")
def pipeline(env) -> SimpleNamespace:
    """Deploy, run ``vecaf-pipeline`` through its deployment, and find what it wrote."""
    from flows.deploy import PIPELINE_DEPLOYMENT, deploy, trigger
    from tasks.tracking import mlflow_client
    from vecaf.settings import load_settings

    settings = load_settings()
    params = pipeline_params().flow_parameters()
    ids = deploy(settings, pipeline_parameters=params)
    run = trigger(settings, f"vecaf-pipeline/{PIPELINE_DEPLOYMENT}", params, wait=True, timeout=900, poll_s=2.0)
    client = mlflow_client(env.mlflow_url)
    runs = client.search_runs(
        experiment_ids=[client.get_experiment_by_name("vecaf-test").experiment_id],
        filter_string=f"tags.prefect_pipeline_run_id = '{run.id}'",
    )
    return SimpleNamespace(settings=settings, ids=ids, run=run, client=client, mlflow_run=runs[0] if runs else None)


def _subflows(parent_id: Any) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))
        )
        return {client.read_flow(r.flow_id).name: r for r in runs}


def test_pipeline_run_completes_through_its_deployment(pipeline):
    run = pipeline.run
    assert run.state.is_completed(), run.state.message
    assert str(run.deployment_id) == pipeline.ids["vecaf-pipeline/production"]
    subflows = _subflows(run.id)
    assert set(subflows) == {"caption", "featurize", "finetune", "promote"}
    assert all(r.state.is_completed() for r in subflows.values())


def test_the_pipeline_run_shows_each_step_finished_as_progress(pipeline):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[pipeline.run.id]), type=ArtifactFilterType(any_=["progress"])
            )
        )
    progress = {a.key: (float(a.data), a.description) for a in found}
    assert {k: v for k, (v, _) in progress.items()} == {
        "pipeline-progress": 100.0, "caption-progress": 100.0, "embed-progress": 100.0, "select-progress": 100.0,
        "train-progress": 100.0,
    }  # fmt: skip
    # 500 pool + 200 held-out images in shards of 250: 2 + 1 image shards and 2 caption-text shards
    assert progress["caption-progress"][1] == "caption: 2/2 shards"
    assert progress["embed-progress"][1] == "embed: 5/5 shards"
    assert progress["select-progress"][1] == "select: 2/2 loops"
    assert progress["train-progress"][1] == "train: 20/20 batches"


def test_the_deployment_runs_on_a_cron_schedule(pipeline):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        dep = client.read_deployment(pipeline.ids["vecaf-pipeline/production"])
        promote = client.read_deployment_by_name("promote/manual")
        limit = client.read_concurrency_limit_by_tag("gpu")
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
    assert dep.work_pool_name == pipeline.settings.stack.work_pool
    assert dep.parameters["training"]["loops"] == 2
    assert promote.schedules == []
    assert limit.concurrency_limit == 1


def test_mlflow_run_has_loops_datasets_config_and_registered_version(pipeline):
    client, run = pipeline.client, pipeline.mlflow_run
    assert run is not None and run.info.status == "FINISHED"
    run_id = run.info.run_id
    tags = run.data.tags
    for key in ("dataset_digest", "method", "pvm", "code_version"):
        assert tags[key], key
    assert tags["method"] == "vecaf" and tags["pvm"] == "efficientnet_lite0@32px"
    # the first run of this model name: no champion to warm-start from (training.init), and it says so
    assert tags["training.init_used"] == "base" and "no champion yet" in tags["training.init_reason"]
    assert run.data.params["training.ratio"] == "0.04" and run.data.params["data.dataset"] == "digits"
    top1 = client.get_metric_history(run_id, "loop_top1")
    assert sorted(m.step for m in top1) == [1, 2]
    assert all(0.0 <= m.value <= 1.0 for m in top1)
    curve = client.get_metric_history(run_id, "test_top1")
    assert max(m.step for m in curve) == 20
    artifacts = {a.path for a in client.list_artifacts(run_id, "config")}
    assert {"config/settings.yaml", "config/params.yaml", "config/resolved.yaml"} <= artifacts
    settings_yaml = Path(client.download_artifacts(run_id, "config/settings.yaml"))
    assert "work_pool" in settings_yaml.read_text()

    children = client.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    assert sorted(c.data.tags["loop"] for c in children) == ["1", "2"]
    for child in children:
        loop = child.data.tags["loop"]
        inputs = child.inputs.dataset_inputs
        training = [d for d in inputs if {t.key: t.value for t in d.tags}.get("mlflow.data.context") == "training"]
        assert [d.dataset.name for d in training] == [f"digits-loop{loop}-subset"]
        assert child.data.metrics["selected"] == 20  # K = round(0.04 * 500)
        assert "train_loss" in child.data.metrics and "test_top1" in child.data.metrics
        picks = client.download_artifacts(child.info.run_id, f"selection/picks-loop-{loop}.parquet")
        import pandas as pd

        table = pd.read_parquet(picks)
        assert len(table) == 20 and table["image_id"].is_unique
        assert {"loss", "centroid", "caption"} <= set(table.columns) and table["loss"].notna().all()
    contexts = [{t.key: t.value for t in d.tags}.get("mlflow.data.context") for d in run.inputs.dataset_inputs]
    assert sorted(contexts) == ["evaluation", "pool"]

    versions = client.search_model_versions(f"name = '{MODEL}' and run_id = '{run_id}'")
    assert len(versions) == 1
    version = client.get_model_version(MODEL, versions[0].version)
    assert "challenger" in version.aliases
    assert "champion" in version.aliases  # the first model becomes champion
    assert version.tags["promotion.decision"] == "promoted"
    assert tags["registered_version"] == version.version


def test_bucket_holds_the_model_files(pipeline, env):
    from tasks.tracking import s3_location

    uri = s3_location(pipeline.mlflow_run.data.tags["model_artifact_uri"], env.bucket)
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    assert bucket == env.bucket
    s3 = env.s3_client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])]
    names = {k[len(prefix) + 1 :] for k in keys}
    assert names == {"MLmodel", "config.json", "model.safetensors"}  # no pickle anywhere
    body = s3.get_object(Bucket=bucket, Key=f"{prefix}/MLmodel")["Body"].read().decode()
    assert "vecaf_classifier" in body and "class_names" in body and "pytorch" not in body
    run = pipeline.mlflow_run
    run_prefix = f"mlflow/{run.info.experiment_id}/{run.info.run_id}/artifacts/config/"
    assert s3.list_objects_v2(Bucket=bucket, Prefix=run_prefix)["KeyCount"] == 3


def test_feast_serves_online_features_for_selected_ids(pipeline):
    import pandas as pd

    from flows.runtime import runtime
    from tasks.features import online_features

    rt = runtime(pipeline.settings)
    run_id = pipeline.mlflow_run.info.run_id
    from tasks.storage import join, local_copy

    state_uri = pipeline.mlflow_run.data.tags["run_state_uri"]  # run state lives in the bucket, not on a disk
    picks = pd.read_parquet(local_copy(join(state_uri, "picks-loop-1.parquet")))
    ids = picks["image_id"].tolist()[:5]
    features = ["image_embeddings:embedding", "image_embeddings:label", "captions:caption", "sample_losses:loss",
                "sample_losses:model_version"]  # fmt: skip
    online = online_features(rt.feature_store, ids, features=features)
    assert online["image_id"] == ids
    assert all(len(e) == 1280 for e in online["image_embeddings__embedding"])
    assert online["image_embeddings__label"] == picks["label"].tolist()[:5]
    assert all("digit" in c for c in online["captions__caption"])
    assert all(v for v in online["sample_losses__model_version"])  # this run's id, or a later run's on this pool
    from tasks.features import read_losses

    _, losses = read_losses(rt.feature_store, model_version=run_id, loop=1, ids=ids)  # the offline history
    assert losses.shape == (5,) and np.isfinite(losses).all()
    assert all(np.isfinite(v) for v in online["sample_losses__loss"])


def test_rerun_skips_cached_captioning_and_embedding(pipeline):
    from flows.caption import caption
    from flows.featurize import featurize

    captions = caption(data=DATA)
    assert (captions["new"], captions["cached"]) == (0, 500)
    features = featurize(data=DATA)
    assert features["image"] == {"new": 0, "cached": 700}
    assert features["text"] == {"new": 0, "cached": 500}


def test_out_of_range_parameters_are_refused_before_any_work(pipeline):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from flows.deploy import trigger
    from flows.pipeline import vecaf_pipeline

    dep_id = pipeline.ids["vecaf-pipeline/production"]

    def ratios() -> list[float]:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep_id])))
        return [r.parameters.get("training", {}).get("ratio") for r in runs]

    bad = pipeline_params().flow_parameters()
    bad["training"]["ratio"] = 0.9
    with pytest.raises(ValueError, match=r"training\.ratio.*0\.9 is greater than the maximum of 0\.5"):
        trigger(pipeline.settings, "vecaf-pipeline/production", bad)
    assert 0.04 in ratios() and 0.9 not in ratios()  # the good run exists, the refused one was never created

    state = vecaf_pipeline(data=DATA, training={"loops": 5, "batch_budget": 2}, return_state=True)
    assert state.is_failed()
    assert "batch_budget (2) must be at least loops (5)" in state.message
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        failed_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        tasks = client.read_task_runs(flow_run_filter=failed_run)
    assert tasks == []


def test_worse_challenger_leaves_the_champion(pipeline, env, tmp_path):
    import torch

    from flows.promote import promote
    from tasks.registry import read_aliases, register_model
    from tasks.tracking import load_stored_model, log_model
    from vecaf.models.classifier import save_classifier

    client = pipeline.client
    before = read_aliases(env.mlflow_url, MODEL)
    champion = before["champion"]
    assert champion is not None and champion["format_error"] is None
    model, config, meta = load_stored_model(env.mlflow_url, f"models:/{MODEL}/{champion['version']}")
    classifier = model.get_classifier()
    with torch.no_grad():
        classifier.weight.zero_()
        classifier.bias.zero_()
        classifier.bias[0] = 1.0  # always predicts class 0: about 1/10 of the held-out images
    save_classifier(model, {k: v for k, v in config.items() if k != "weights_sha256"}, tmp_path / "worse")
    info = client.get_model_version(MODEL, champion["version"])
    run = client.create_run(client.get_experiment_by_name("vecaf-test").experiment_id, run_name="worse-challenger")
    logged = log_model(env.mlflow_url, run.info.run_id, str(tmp_path / "worse"), metadata=meta, final_metrics={})
    client.set_terminated(run.info.run_id)
    worse = register_model(env.mlflow_url, MODEL, model_uri=logged["model_uri"], model_id=logged["model_id"],
                           run_id=run.info.run_id, tags={"note": "deliberately worse"})  # fmt: skip
    assert worse["version"] != info.version

    decision = promote(data=DATA, registry=RegistryParams(experiment="vecaf-test", model_name=MODEL))
    assert decision["promoted"] is False
    assert decision["challenger_eval"]["top1"] < decision["champion_eval"]["top1"]
    # The champion is re-evaluated from images: it matches what the engine measured on stored features
    # (to one image of 200: the two forward passes batch differently).
    assert decision["champion_eval"]["top1"] == pytest.approx(float(info.tags["test_top1"]), abs=0.0051)
    after = read_aliases(env.mlflow_url, MODEL)
    assert after["champion"]["version"] == champion["version"]
    assert after["challenger"]["version"] == worse["version"]
    tags = client.get_model_version(MODEL, worse["version"]).tags
    assert tags["promotion.decision"] == "kept-champion"
    assert tags["promotion.champion_version"] == champion["version"]
    assert tags["promotion.challenger_version"] == worse["version"]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as prefect:
        [artifact] = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["promotion-decision"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[decision["flow_run_id"]])),
        )
    assert "**not promoted**" in artifact.data and f"version {champion['version']}" in artifact.data
