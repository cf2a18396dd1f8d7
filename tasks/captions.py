"""Caption task: one caption per pool image, with the OOD suffix (Sec. 3.2-3.3), into the ``captions`` view.

A shard [start, stop) of the pool is captioned by the chosen captioner (default: the ImageNet-label
captioner built on the PVM's own top-k predictions plus the class name; any transformers image-to-text
model or CoCa with the paper's prompt). Images whose row already carries the cache key
K = H(h_i, captioner key, suffix) are skipped before the model loads (see ``tasks.embeddings``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from prefect import get_run_logger, task

from flows.params import DataParams, ModelParams
from tasks.data import image_content_hashes, load_split
from tasks.embeddings import GPU_TASK, feature_keys, get_pvm


@lru_cache(maxsize=2)
def get_captioner(models: ModelParams, ood_prompt: str | None, image_size: int | None, allow_hub: bool) -> Any:
    """``vecaf.models.load_captioner`` for these models and suffix, memoised per process."""
    from vecaf.models import load_captioner

    pvm = None
    if models.captioner in ("imagenet-labels", "imagenet"):
        pvm = get_pvm(models.pvm, models.pvm_checkpoint, allow_hub)
    return load_captioner(
        models.captioner, pvm=pvm, ood_suffix=ood_prompt, allow_hub=allow_hub, device=models.device,
        image_size=image_size,
    )


def caption_shard(
    data: DataParams,
    models: ModelParams,
    ood_prompt: str | None,
    start: int,
    stop: int,
    store: dict[str, Any] | str,
    *,
    allow_hub: bool = False,
) -> dict[str, Any]:
    """Caption pool images [start, stop) and append the new captions to the ``captions`` view.

    Returns:
        ``{"start", "stop", "new", "cached", "path", "example"}``: counts, the Parquet file written (None when
        everything was cached) and one caption written (None when nothing was).
    """
    from tasks.features import cached_ids, write_captions

    keys = feature_keys(models, data, ood_prompt)
    ds = load_split(data, data.train_split)
    ids = ds.ids[start:stop]
    hashes = image_content_hashes(ds)[start:stop]
    done = cached_ids(store, "captions", ids, hashes, model_name=keys.captioner, prompt=keys.prompt)
    todo = np.flatnonzero(~done)
    out: dict[str, Any] = {"start": start, "stop": stop, "new": int(todo.size), "cached": int(done.sum())}
    if todo.size == 0:
        return {**out, "path": None, "example": None}
    captioner = get_captioner(models, ood_prompt, data.image_size, allow_hub)
    images = [ds.load_image(start + int(i)) for i in todo]
    names = [ds.class_names[int(ds.labels[start + int(i)])] for i in todo]
    captions = captioner.caption(images, names, batch_size=models.batch_size)
    path = write_captions(
        store,
        [ids[i] for i in todo],
        captions,
        captioner=keys.captioner,
        prompt_suffix=keys.prompt,
        content_hashes=[hashes[i] for i in todo],
    )
    return {**out, "path": path, "example": captions[0]}


@task(name="caption-shard", **GPU_TASK)
def caption_shard_task(
    data: DataParams,
    models: ModelParams,
    ood_prompt: str | None,
    start: int,
    stop: int,
    store: dict[str, Any] | str,
    allow_hub: bool = False,
) -> dict[str, Any]:
    """Prefect task around :func:`caption_shard` (writes one Parquet file, or nothing when cached)."""
    result = caption_shard(data, models, ood_prompt, start, stop, store, allow_hub=allow_hub)
    logger = get_run_logger()
    logger.info("captions [%d:%d]: %d new, %d cached", start, stop, result["new"], result["cached"])
    if result["example"]:
        logger.info("e.g. %r", result["example"])
    return result
