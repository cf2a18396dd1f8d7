"""Flow ``vecaf-pipeline``: caption -> featurize -> finetune -> promote, as subflows.

0. ``reconcile``: what earlier runs left behind after a kill or a server restart is put right first
   (slots nobody holds freed; flow runs whose process is gone CRASHED; their MLflow runs FAILED; see
   ``tasks/reconcile.py``). While the steps run, a task run that waits for a concurrency slot is named in
   the log every 30 s with the tag and who holds the slot.
   Then ``pool-version``: the pool's size, images per class, digest, and how many of its images are new
   (never featurized; a folder that grows between runs shows the images dropped in since), published as the
   table artifact ``pool-version``; and ``check-for-news``: when the newest registered version was trained on
   this very pool with the same parameters, the run stops here and says so (nothing trained or registered).
1. ``caption`` (when CEA is on): captions of the pool with the OOD suffix (Sec. 3.2-3.3).
2. ``featurize``: PVM embeddings of pool and held-out split, caption text embeddings; Feast materialized.
3. ``finetune``: the VeCAF loops in one MLflow run (nested run per loop); the model registered as
   ``challenger``; ``mlflow-log-pool-version`` adds the pool version to that run (``pool.*`` tags).
4. ``promote`` (when ``registry.promote``): challenger vs champion on the held-out split.
5. ``publish-run-report``: figures (accuracy vs batches, classes picked, selected images) and the model card
   on the MLflow run; the card is the registered version's description; a tag links back to this run.
6. ``publish-pipeline-summary``: this run's summary artifact (links to the MLflow run, logged model and
   version, per-loop table, promotion decision, accuracy figure) and link artifacts.

Progress artifacts on this run (``tasks/progress.py``): ``pipeline-progress`` moves as the steps finish;
``caption-progress`` and ``embed-progress`` per shard, ``select-progress`` per loop, ``train-progress`` per
evaluation (batches of the budget B).

The parameters are validated, and checked against each other, before step 1 (``flows.params.checked``): a
misfit fails the run with one line naming the field and the rule. Reruns skip the captions and
embeddings already stored for the same images, models and prompt.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.caption import caption
from flows.featurize import featurize
from flows.finetune import finetune
from flows.params import (
    DataParams,
    ModelParams,
    ObjectiveParams,
    OodPrompt,
    PipelineParams,
    RegistryParams,
    TrainingParams,
    checked,
)
from flows.promote import promote
from flows.runtime import flow_run_info, flow_run_url, runtime
from tasks.progress import StepProgress
from tasks.data import pool_version_task
from tasks.reconcile import reconcile_task, watch_slot_waits
from tasks.reports import publish_noop_summary_task, publish_pipeline_summary_task, publish_run_report_task
from tasks.tracking import log_pool_version_task, nothing_new_task

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@flow(
    name="vecaf-pipeline",
    description="Caption, featurize, finetune with VeCAF active selection (MLflow), then promote by held-out accuracy.",
    validate_parameters=False,  # checked() below: a misfit fails the run with a one-line state message
)
def vecaf_pipeline(
    data: DataParams = DataParams(),
    models: ModelParams = ModelParams(),
    ood_prompt: OodPrompt = None,
    objective: ObjectiveParams = ObjectiveParams(),
    training: TrainingParams = TrainingParams(),
    registry: RegistryParams = RegistryParams(),
) -> dict[str, Any]:
    """The whole pipeline on one pool.

    Args:
        data: dataset, pool and held-out sizes, input size, shard size.
        models: PVM, captioner, text encoder, inference batch, device.
        ood_prompt: caption suffix steering selection (Sec. 3.3).
        objective: CE, one-vs-all (target class) or class-weighted CE.
        training: mode, method, ratio per loop, loops, batch budget, CEA, seed.
        registry: experiment, registered model, promotion margin, whether to promote.

    Returns:
        ``{"pool", "noop", "caption", "featurize", "finetune", "promote", "report"}``: the pool version, why
        nothing was done (None when the run trained) and each step's summary (``caption``/``promote`` None when
        skipped, all steps None for a run with nothing new; ``report``: figures and MLflow links).
    """
    params = checked(PipelineParams, {
        "data": data, "models": models, "ood_prompt": ood_prompt, "objective": objective, "training": training,
        "registry": registry,
    })  # fmt: skip
    data, models, ood_prompt = params.data, params.models, params.ood_prompt
    objective, training, registry = params.objective, params.training, params.registry
    rt = runtime()
    local_pool = rt.settings.stack.work_pool if rt.settings.stack.host in _LOOPBACK else None
    reconcile_task(rt.tracking_uri, local_pool)
    pool = pool_version_task(data, models, rt.feature_store)
    learned = {"data": data.model_dump(mode="json"), "models": models.model_dump(mode="json"),
               "ood_prompt": (ood_prompt or "").strip() or None, "objective": objective.model_dump(mode="json"),
               "training": training.model_dump(mode="json")}  # fmt: skip
    noop = None if pool is None else nothing_new_task(rt.tracking_uri, registry.model_name, pool["digest"], learned)
    if noop:
        publish_noop_summary_task(noop, pool, registry.model_name)
        return {"pool": pool, "noop": noop, "caption": None, "featurize": None, "finetune": None, "promote": None,
                "report": None}  # fmt: skip
    use_text = training.cea and training.method != "full"
    steps = ["caption"] * use_text + ["featurize", "finetune"] + ["promote"] * registry.promote + ["report"]
    progress = StepProgress("pipeline", len(steps), f"steps ({', '.join(steps)})")
    with watch_slot_waits():
        captions = caption(data=data, models=models, ood_prompt=ood_prompt) if use_text else None
        progress.advance() if use_text else None
        features = featurize(data=data, models=models, ood_prompt=ood_prompt, text=use_text)
        progress.advance()
        tuned = finetune(
            data=data, models=models, ood_prompt=ood_prompt, objective=objective, training=training, registry=registry
        )
        progress.advance()
        log_pool_version_task(rt.tracking_uri, tuned["run_id"], pool) if pool is not None else None
        decision = promote(data=data.held_out(), registry=registry.promotion(), device=models.device) if registry.promote else None
        progress.advance() if registry.promote else None
    info = flow_run_info()
    version = str(tuned["model"]["version"])
    report = publish_run_report_task(
        rt.tracking_uri, tuned["run_id"], data, registry.model_name, version,
        flow_run_url(rt.prefect_ui, info["id"]) if info["id"] else None,
    )  # fmt: skip
    publish_pipeline_summary_task(
        rt.tracking_uri, tuned["run_id"], report, decision, registry.model_name, version, pool
    )
    progress.advance()
    return {
        "pool": pool,
        "noop": None,
        "caption": None if captions is None else {k: captions[k] for k in ("new", "cached")},
        "featurize": {k: features[k] for k in ("keys", "image", "text")},
        "finetune": tuned,
        "promote": decision,
        "report": report,
    }

