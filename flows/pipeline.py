"""Flow ``vecaf-pipeline``: caption -> featurize -> finetune -> promote, as subflows.

0. ``reconcile``: what earlier runs left behind after a kill or a server restart is put right first
   (slots nobody holds freed; flow runs whose process is gone CRASHED; their MLflow runs FAILED; see
   ``tasks/reconcile.py``). While the steps run, a task run that waits for a concurrency slot is named in
   the log every 30 s with the tag and who holds the slot.
1. ``caption`` (when CEA is on): captions of the pool with the OOD suffix (Sec. 3.2-3.3).
2. ``featurize``: PVM embeddings of pool and held-out split, caption text embeddings; Feast materialized.
3. ``finetune``: the VeCAF loops in one MLflow run (nested run per loop); the model registered as
   ``challenger``.
4. ``promote`` (when ``registry.promote``): challenger vs champion on the held-out split.

The parameters are validated, and checked against each other, before step 1. Reruns skip the captions and
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
    RegistryParams,
    TrainingParams,
    check_training_fits,
)
from flows.promote import promote
from flows.runtime import runtime
from tasks.reconcile import reconcile_task, watch_slot_waits

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@flow(
    name="vecaf-pipeline",
    description="Caption, featurize, finetune with VeCAF active selection (MLflow), then promote by held-out accuracy.",
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
        ``{"caption", "featurize", "finetune", "promote"}``: each step's summary (``caption``/``promote``
        None when skipped).
    """
    check_training_fits(data, training, objective)
    rt = runtime()
    local_pool = rt.settings.stack.work_pool if rt.settings.stack.host in _LOOPBACK else None
    reconcile_task(rt.tracking_uri, local_pool)
    use_text = training.cea and training.method != "full"
    with watch_slot_waits():
        captions = caption(data=data, models=models, ood_prompt=ood_prompt) if use_text else None
        features = featurize(data=data, models=models, ood_prompt=ood_prompt, text=use_text)
        tuned = finetune(
            data=data, models=models, ood_prompt=ood_prompt, objective=objective, training=training, registry=registry
        )
        decision = promote(data=data, registry=registry, device=models.device) if registry.promote else None
    return {
        "caption": None if captions is None else {k: captions[k] for k in ("new", "cached")},
        "featurize": {k: features[k] for k in ("keys", "image", "text")},
        "finetune": tuned,
        "promote": decision,
    }
