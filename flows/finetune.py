"""Flow ``finetune``: the VeCAF loops (Sec. 3.1, Appendix C) as one MLflow run with a nested run per loop.

0. Check the parameters against each other (fresh samples fit the pool; objective fits the classes).
1. ``load-dataset`` for the pool and the held-out split (manifests; corrupt images reported); then
   ``tasks.data.check_splits``: every class on both sides, no image shared by pool and held-out split
   (unless ``data.allow_overlap``), the loops fit the pool actually loaded, and a warning when a split holds
   fewer images than asked (MLflow records the sizes used: ``data.pool_size_used``, ``data.test_size_used``).
2. ``resolve-init`` (``training.init``): the champion when its classes and architecture fit (downloaded; loop
   1's losses come from it and training warm-starts from it), else the base PVM; then ``mlflow-start-run``:
   params, tags (dataset digest, method, PVM, code version, ``training.init_used`` and its reason), resolved
   configuration, the pool and held-out datasets.
3. For each loop l = 1..L:
   a. ``train-loop``: per-sample losses and embeddings under the current model, selection of K samples,
      B/L training batches with CEA (Eq. 8-10), evaluation (checkpoint, picks, loop record stored in the bucket
      under ``runs/<run key>/``, ``tasks.storage``; a loop already stored there is not trained again, so a
      rerun of the same parameters on the same images resumes after the last stored loop);
   b. ``compute-losses``: L_i of the pool under the loop's model into Feast (``sample_losses``);
   c. ``mlflow-log-loop``: nested run with the loop's metrics, the subset as an ``mlflow.data`` dataset
      (context "training") and the picks Parquet (why each image was picked).
4. ``feast-materialize-incremental``: the losses reach the online store.
5. ``mlflow-log-model``: the whole network, stored without pickle (JSON config + safetensors weights), with
   its preprocessing; finalized READY, or FAILED when the upload breaks.
6. ``verify-model-artifacts``: MLflow lists the model's files (through its artifact proxy: they are stored).
7. ``register-model``: a new version of the registered model, alias ``challenger``.
8. ``mlflow-end-run``: the run is FINISHED (FAILED, if any step above failed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger

from flows.params import (
    DataParams,
    ModelParams,
    ObjectiveParams,
    OodPrompt,
    RegistryParams,
    TrainingParams,
    check_objective_classes,
    check_training_fits,
)
from flows.runtime import flow_run_info, flow_run_url, runtime
from tasks.data import check_splits, load_dataset_task, warn_smaller_than_asked
from tasks.embeddings import feature_keys
from tasks.features import feast_materialize_task
from tasks.registry import register_model_task, resolve_init_task
from tasks.storage import run_key, run_uri
from tasks.tracking import (
    code_version,
    end_run,
    end_run_task,
    log_loop_task,
    log_model_task,
    mlflow_run_url,
    start_run_task,
    verify_model_artifacts_task,
)
from tasks.training import TrainSpec, compute_losses_task, preprocessing, train_loop_task


@flow(
    name="finetune",
    description="VeCAF active finetuning loops, tracked in MLflow; registers the model as challenger.",
)
def finetune(
    data: DataParams = DataParams(),
    models: ModelParams = ModelParams(),
    ood_prompt: OodPrompt = None,
    objective: ObjectiveParams = ObjectiveParams(),
    training: TrainingParams = TrainingParams(),
    registry: RegistryParams = RegistryParams(),
) -> dict[str, Any]:
    """Finetune in L loops on actively selected subsets; log everything; register the model as challenger.

    Args:
        data: the pool and the held-out split (features must exist: run ``caption`` and ``featurize``).
        models: the PVM (and the captioner/text encoder whose features CEA uses).
        ood_prompt: the caption suffix of the text embeddings used (Sec. 3.3).
        objective: the per-sample loss L_i.
        training: method, ratio, loops, batch budget, CEA, seed.
        registry: experiment and registered-model name.

    Returns:
        ``{"run_id", "experiment_id", "run_url", "loops": [...], "final_top1", "model": {...},
        "model_artifact_uri", "model_files", "flow_run_id"}``.
    """
    check_training_fits(data, training, objective)
    prompt = (ood_prompt or "").strip() or None
    rt = runtime()
    info = flow_run_info()
    pool = load_dataset_task(data, data.train_split, rt.work_dir)
    test = load_dataset_task(data, data.test_split, rt.work_dir)
    check_objective_classes(objective, pool["num_classes"])
    checked = check_splits(data, pool, test)
    check_training_fits(data.model_copy(update={"pool_size": checked["pool_size_used"]}), training, objective)
    warn_smaller_than_asked(get_run_logger(), checked)
    keys = feature_keys(models, data, prompt)
    params = {
        "data": data.model_dump(mode="json"),
        "models": models.model_dump(mode="json"),
        "ood_prompt": prompt,
        "objective": objective.model_dump(mode="json"),
        "training": training.model_dump(mode="json"),
        "registry": registry.model_dump(mode="json"),
    }
    version = code_version()
    tags = {
        "dataset": data.dataset,
        "dataset_digest": pool["digest"],
        "test_digest": test["digest"],
        "method": training.method,
        "mode": training.mode,
        "pvm": keys.pvm,
        "captioner": keys.captioner,
        "text_encoder": keys.encoder,
        "objective": objective.kind,
        "ood_prompt": keys.prompt,
        "code_version": version,
        "prefect_flow_run_id": str(info["id"]),
        "prefect_pipeline_run_id": str(info["root_id"]),
    }
    if info["id"]:
        tags["prefect_flow_run_url"] = flow_run_url(rt.prefect_ui, info["id"])
    from vecaf.settings import dump_settings

    resolved = {"params": params, "feature_keys": keys.to_dict(), "pool": pool, "test": test, "code_version": version,
                "prefect_flow_run": info, "data_checks": checked}  # fmt: skip
    config = {
        "settings.yaml": dump_settings(rt.settings),
        "params.yaml": yaml.safe_dump(params, sort_keys=False),
        "resolved.yaml": yaml.safe_dump(resolved, sort_keys=False),
    }
    run_name = f"{training.method}-{data.dataset}-{info['name'] or 'local'}"
    used = {k: checked[k] for k in ("pool_size_used", "test_size_used")}
    logged_params = {**params, "data": {**params["data"], **used}}
    tags.update({k: str(v) for k, v in used.items()})
    init = resolve_init_task(rt.tracking_uri, registry.model_name, training.init, training.mode, pool["class_names"],
                             models, data, str(Path(rt.cache_dir) / "champions"))  # fmt: skip
    tags.update({"training.init_used": init["used"], "training.init_reason": init["reason"][:5000],
                 "training.init_champion_version": str(init["version"])})  # fmt: skip
    # The start is part of the key: a rerun after a new champion trains anew instead of resuming.
    start = "base" if init["model_dir"] is None else f"champion:{init['model_id']}"
    key = run_key(params, pool["digest"], test["digest"], start=start)
    state_uri = run_uri(rt, key)
    tags.update({"run_key": key, "run_state_uri": state_uri})
    run = start_run_task(
        rt.tracking_uri, registry.experiment, run_name, logged_params, tags, config, pool["manifest"], test["manifest"],
        pool["skipped"] or None,
    )  # fmt: skip
    run_id = run["run_id"]
    spec = TrainSpec(
        data=data, models=models, objective=objective, training=training, ood_prompt=prompt,
        store=rt.feature_store, run_uri=state_uri, pool_manifest=pool["manifest"],
        test_manifest=test["manifest"], num_classes=pool["num_classes"], class_names=tuple(pool["class_names"]),
        allow_hub=rt.allow_hub, init_model=init["model_dir"], init_artifact_uri=init["artifact_uri"],
    )  # fmt: skip
    try:
        loops = []
        for loop in range(training.loops):
            out = train_loop_task(spec, loop)
            losses = compute_losses_task(spec, loop, run_id)
            log_loop_task(rt.tracking_uri, run_id, out["record"], out["picks"], rt.bucket, data.dataset, losses)
            loops.append(out)
        feast_materialize_task(rt.feature_store)
        final = loops[-1]
        pre = preprocessing(spec)
        metadata = {
            "data_config": pre,
            "class_names": list(pool["class_names"]),
            "pvm": keys.pvm,
            "dataset": data.dataset,
            "dataset_digest": pool["digest"],
            "mode": training.mode,
            "method": training.method,
            "input": "float32 (B, 3, S, S) images normalised with data_config (mean, std); output: class logits",
        }
        logged = log_model_task(
            rt.tracking_uri, run_id, final["model"], metadata,
            {"test_top1": final["final_top1"], "test_loss": final["test_loss"]}, final["result"],
        )  # fmt: skip
        stored = verify_model_artifacts_task(rt.tracking_uri, logged["model_id"])
        version_tags = {
            "dataset": data.dataset, "dataset_digest": pool["digest"], "method": training.method, "mode": training.mode,
            "pvm": keys.pvm, "code_version": version, "test_top1": f"{final['final_top1']:.6f}",
            "model_artifact_uri": stored["artifact_uri"],
        }  # fmt: skip
        registered = register_model_task(
            rt.tracking_uri, registry.model_name, logged["model_uri"], logged["model_id"], run_id, version_tags
        )
        end_run_task(
            rt.tracking_uri, run_id, "FINISHED",
            {
                "registered_model": registry.model_name,
                "registered_version": registered["version"],
                "model_artifact_uri": stored["artifact_uri"],
            },
        )  # fmt: skip
    except BaseException:
        try:
            end_run(rt.tracking_uri, run_id, status="FAILED")
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass
        raise
    return {
        "run_id": run_id,
        "experiment_id": run["experiment_id"],
        "run_url": mlflow_run_url(rt.tracking_uri, run["experiment_id"], run_id),
        "artifact_uri": run["artifact_uri"],
        "loops": [{k: o[k] for k in ("loop", "top1", "test_loss", "budget", "batches")} for o in loops],
        "final_top1": final["final_top1"],
        "model": {**registered, "model_id": logged["model_id"], "model_uri": logged["model_uri"]},
        "model_artifact_uri": stored["artifact_uri"],
        "model_files": stored["count"],
        "flow_run_id": info["id"],
    }
