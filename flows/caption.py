"""Flow ``caption``: one caption per pool image (Sec. 3.2), with the OOD suffix (Sec. 3.3), into Feast.

1. ``load-dataset``: load the pool, hash its images, write its manifest, report corrupt images.
2. ``caption-shard`` per shard of ``data.shard_size`` images: skip images already captioned with the same
   captioner and suffix (rerun cache), caption the rest, append them to the ``captions`` view. In a deployed
   run where ``deploy.fan_out_shards`` says so, ``run-shard-flows`` instead starts one ``caption-shard`` flow
   run per shard on the pool (``tasks/fanout.py``), so the pool's workers caption shards at once.

Flow ``caption-shard``: one shard alone (the unit of the fan-out), with its summary as a table artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.params import DataParams, ModelParams, OodPrompt
from flows.runtime import runtime
from tasks.captions import caption_shard_task
from tasks.data import load_dataset_task, shard_bounds
from tasks.fanout import CAPTION_SHARD_DEPLOYMENT, fan_out_deployment, publish_shard_summary_task, run_shard_flows_task
from tasks.progress import track_shards


@flow(name="caption", description="Caption every pool image (captioner + OOD suffix) into the Feast captions view.")
def caption(
    data: DataParams = DataParams(),
    models: ModelParams = ModelParams(),
    ood_prompt: OodPrompt = None,
) -> dict[str, Any]:
    """Caption the pool.

    Args:
        data: the image pool.
        models: the captioner (and, for the ImageNet-label captioner, the PVM).
        ood_prompt: caption suffix steering selection (Sec. 3.3), e.g. "It's a snowy day!".

    Returns:
        ``{"pool": DatasetRef dict, "new": captions written, "cached": captions reused, "shards": [...]}``.
    """
    rt = runtime()
    prompt = (ood_prompt or "").strip() or None
    pool = load_dataset_task(data, data.train_split, rt.work_dir)
    bounds = shard_bounds(pool["size"], data.shard_size)
    fan_out = fan_out_deployment(rt.settings.deploy.fan_out_shards, CAPTION_SHARD_DEPLOYMENT)
    if fan_out:
        shards = run_shard_flows_task(
            fan_out,
            [
                {"data": data.model_dump(mode="json"), "models": models.model_dump(mode="json"),
                 "ood_prompt": prompt, "start": start, "stop": stop}
                for start, stop in bounds
            ],
        )  # fmt: skip
    else:
        (bounds,) = track_shards("caption", bounds)
        shards = [
            caption_shard_task(data, models, prompt, start, stop, rt.feature_store, rt.allow_hub) for start, stop in bounds
        ]
    return {
        "pool": pool,
        "new": sum(s["new"] for s in shards),
        "cached": sum(s["cached"] for s in shards),
        "shards": [{k: s[k] for k in ("start", "stop", "new", "cached")} for s in shards],
    }


@flow(name="caption-shard", description="Caption pool images [start, stop) into the Feast captions view (one shard).")
def caption_shard_flow(
    data: DataParams = DataParams(),
    models: ModelParams = ModelParams(),
    ood_prompt: OodPrompt = None,
    start: int = 0,
    stop: int = 0,
) -> dict[str, Any]:
    """Caption one shard of the pool on whichever worker takes this run.

    Args:
        data: the image pool.
        models: the captioner.
        ood_prompt: the caption suffix.
        start: first pool index of the shard.
        stop: one past the last pool index.

    Returns:
        The shard's summary ``{"kind", "start", "stop", "new", "cached", "worker"}``.
    """
    rt = runtime()
    result = caption_shard_task(data, models, ood_prompt, start, stop, rt.feature_store, rt.allow_hub)
    return publish_shard_summary_task({**result, "kind": "caption"})
