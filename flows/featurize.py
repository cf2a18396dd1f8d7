"""Flow ``featurize``: PVM embeddings of the pool and the held-out split, caption text embeddings, Feast.

1. ``feast-apply``: register the entity and feature views in the store.
2. ``load-dataset`` for the pool and for the held-out split (manifests, corrupt images reported).
3. ``embed-image-shard`` per shard of each split: e_i = f(x_i) with the PVM (Eq. 7), cached images skipped.
4. ``embed-text-shard`` per pool shard: t_i = the text encoder on the caption (CEA, Eq. 8-9); needs the
   ``caption`` flow's captions.
5. ``feast-materialize-incremental``: load the new rows into the online store.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.params import DataParams, ModelParams
from flows.runtime import runtime
from tasks.data import load_dataset_task, shard_bounds
from tasks.embeddings import embed_image_shard_task, embed_text_shard_task, feature_keys
from tasks.features import feast_apply_task, feast_materialize_task


@flow(name="featurize", description="PVM image embeddings and caption text embeddings into Feast, then materialize.")
def featurize(
    data: DataParams = DataParams(),
    models: ModelParams = ModelParams(),
    ood_prompt: str | None = None,
    text: bool = True,
) -> dict[str, Any]:
    """Embed the pool and the held-out split, and the pool's captions.

    Args:
        data: the image pool and held-out split.
        models: the PVM and the text encoder.
        ood_prompt: the caption suffix the captions were made with (selects which captions to embed).
        text: also embed the captions (CEA needs them).

    Returns:
        ``{"keys": FeatureKeys dict, "pool": ..., "test": ..., "image": {"new", "cached"}, "text": {...},
        "materialized": [views]}``.
    """
    rt = runtime()
    prompt = (ood_prompt or "").strip() or None
    keys = feature_keys(models, data, prompt)
    feast_apply_task(rt.store_dir)
    pool = load_dataset_task(data, data.train_split, rt.work_dir)
    test = load_dataset_task(data, data.test_split, rt.work_dir)
    image = [
        embed_image_shard_task(data, models, ref["split"], start, stop, rt.store_dir, rt.allow_hub)
        for ref in (pool, test)
        for start, stop in shard_bounds(ref["size"], data.shard_size)
    ]
    texts = []
    if text:
        texts = [
            embed_text_shard_task(data, models, prompt, start, stop, rt.store_dir, rt.allow_hub)
            for start, stop in shard_bounds(pool["size"], data.shard_size)
        ]
    views = feast_materialize_task(rt.store_dir)
    return {
        "keys": keys.to_dict(),
        "pool": pool,
        "test": test,
        "image": {"new": sum(r["new"] for r in image), "cached": sum(r["cached"] for r in image)},
        "text": {"new": sum(r["new"] for r in texts), "cached": sum(r["cached"] for r in texts)},
        "materialized": list(views),
    }
