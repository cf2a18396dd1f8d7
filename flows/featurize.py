"""Flow ``featurize``: PVM embeddings of the pool and the held-out split, caption text embeddings, Feast.

1. ``feast-apply``: register the entity and feature views in the store.
2. ``load-dataset`` for the pool and for the held-out split (manifests, corrupt images reported).
3. ``embed-image-shard`` per shard of each split: e_i = f(x_i) with the PVM (Eq. 7), cached images skipped.
4. ``embed-text-shard`` per pool shard: t_i = the text encoder on the caption (CEA, Eq. 8-9); needs the
   ``caption`` flow's captions.
   In a deployed run where ``deploy.fan_out_shards`` says so, steps 3-4 are one ``run-shard-flows``: an
   ``embed-shard`` flow run per shard on the pool (``tasks/fanout.py``), so the pool's workers share them.
5. ``feast-materialize-incremental``: load the new rows into the online store.

Flow ``embed-shard``: one image or text shard alone (the unit of the fan-out), its summary as an artifact.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow

from flows.params import DataParams, ModelParams, OodPrompt
from flows.runtime import runtime
from tasks.fanout import EMBED_SHARD_DEPLOYMENT, fan_out_deployment, publish_shard_summary_task, run_shard_flows_task
from tasks.data import load_dataset_task, shard_bounds
from tasks.embeddings import embed_image_shard_task, embed_text_shard_task, feature_keys
from tasks.features import feast_apply_task, feast_materialize_task
from tasks.progress import track_shards


@flow(name="featurize", description="PVM image embeddings and caption text embeddings into Feast, then materialize.")
def featurize(
    data: DataParams = DataParams(),
    models: ModelParams = ModelParams(),
    ood_prompt: OodPrompt = None,
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
    feast_apply_task(rt.feature_store)
    pool = load_dataset_task(data, data.train_split, rt.work_dir)
    test = load_dataset_task(data, data.test_split, rt.work_dir)
    image_bounds = [(ref["split"], a, b) for ref in (pool, test) for a, b in shard_bounds(ref["size"], data.shard_size)]
    text_bounds = shard_bounds(pool["size"], data.shard_size) if text else []
    fan_out = fan_out_deployment(rt.settings.deploy.fan_out_shards, EMBED_SHARD_DEPLOYMENT)
    if fan_out:
        common = {"data": data.model_dump(mode="json"), "models": models.model_dump(mode="json")}
        shards = run_shard_flows_task(
            fan_out,
            [{**common, "kind": "image", "split": split, "start": a, "stop": b} for split, a, b in image_bounds]
            + [{**common, "kind": "text", "ood_prompt": prompt, "start": a, "stop": b} for a, b in text_bounds],
        )
        image = [r for r in shards if r["kind"] == "image"]
        texts = [r for r in shards if r["kind"] == "text"]
    else:
        image_bounds, text_bounds = track_shards("embed", image_bounds, text_bounds)
        image = [
            embed_image_shard_task(data, models, split, a, b, rt.feature_store, rt.allow_hub)
            for split, a, b in image_bounds
        ]
        texts = [embed_text_shard_task(data, models, prompt, a, b, rt.feature_store, rt.allow_hub) for a, b in text_bounds]
    views = feast_materialize_task(rt.feature_store)
    return {
        "keys": keys.to_dict(),
        "pool": pool,
        "test": test,
        "image": {"new": sum(r["new"] for r in image), "cached": sum(r["cached"] for r in image)},
        "text": {"new": sum(r["new"] for r in texts), "cached": sum(r["cached"] for r in texts)},
        "materialized": list(views),
    }


@flow(name="embed-shard", description="PVM image embeddings or caption text embeddings of one shard into Feast.")
def embed_shard_flow(
    data: DataParams = DataParams(),
    models: ModelParams = ModelParams(),
    kind: Literal["image", "text"] = "image",
    split: str | None = None,
    ood_prompt: OodPrompt = None,
    start: int = 0,
    stop: int = 0,
) -> dict[str, Any]:
    """Embed one shard on whichever worker takes this run (no materialization: the parent does it once).

    Args:
        data: the dataset.
        models: the PVM and the text encoder.
        kind: ``"image"`` (PVM embeddings of ``split``) or ``"text"`` (caption embeddings of the pool).
        split: the split of an image shard (None: the pool's ``data.train_split``).
        ood_prompt: the caption suffix of a text shard.
        start: first index of the shard in its split.
        stop: one past the last index.

    Returns:
        The shard's summary ``{"kind", "split", "start", "stop", "new", "cached", "worker"}``.
    """
    rt = runtime()
    if kind == "image":
        split = split or data.train_split
        result = embed_image_shard_task(data, models, split, start, stop, rt.feature_store, rt.allow_hub)
    else:
        result = embed_text_shard_task(data, models, ood_prompt, start, stop, rt.feature_store, rt.allow_hub)
    return publish_shard_summary_task({**result, "kind": kind})
