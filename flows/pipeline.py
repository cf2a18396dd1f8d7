"""Flow ``vecaf-pipeline``: caption -> featurize -> finetune -> promote, as subflows.

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
    RegistryParams,
    TrainingParams,
    check_training_fits,
)
from flows.promote import promote


@flow(
    name="vecaf-pipeline",
    description="Caption, featurize, finetune with VeCAF active selection (MLflow), then promote by held-out accuracy.",
)
def vecaf_pipeline(
    data: DataParams = DataParams(),
    models: ModelParams = ModelParams(),
    ood_prompt: str | None = None,
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
    use_text = training.cea and training.method != "full"
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
