"""Flow ``caption``: one caption per pool image (Sec. 3.2), with the OOD suffix (Sec. 3.3), into Feast.

1. ``load-dataset``: load the pool, hash its images, write its manifest, report corrupt images.
2. ``caption-shard`` per shard of ``data.shard_size`` images: skip images already captioned with the same
   captioner and suffix (rerun cache), caption the rest, append them to the ``captions`` view.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.params import DataParams, ModelParams
from flows.runtime import runtime
from tasks.captions import caption_shard_task
from tasks.data import load_dataset_task, shard_bounds


@flow(name="caption", description="Caption every pool image (captioner + OOD suffix) into the Feast captions view.")
def caption(
    data: DataParams = DataParams(),
    models: ModelParams = ModelParams(),
    ood_prompt: str | None = None,
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
    shards = [
        caption_shard_task(data, models, prompt, start, stop, rt.store_dir, rt.allow_hub)
        for start, stop in shard_bounds(pool["size"], data.shard_size)
    ]
    return {
        "pool": pool,
        "new": sum(s["new"] for s in shards),
        "cached": sum(s["cached"] for s in shards),
        "shards": [{k: s[k] for k in ("start", "stop", "new", "cached")} for s in shards],
    }
