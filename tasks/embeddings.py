"""Embedding tasks: PVM image embeddings e_i (Eq. 7) and caption text embeddings t_i (CEA, Eq. 8-9).

Each task handles one shard [start, stop) of a split and writes one Parquet file to the Feast offline
store (``tasks.features``). Before any model runs, the shard's rerun cache is looked up: an image whose row
already carries the key K = H(h_i, model key, prompt) (``tasks.features.content_key``; h_i the image's
content hash, or the caption text's for t_i) is skipped, so a rerun with the same images, models and prompt
computes nothing and reports ``new = 0``.

Model keys name everything that changes the output (:class:`FeatureKeys`): the PVM key adds the checkpoint
file's hash and the input side S (``efficientnet_lite0@64px``); the ImageNet-label captioner's key adds the
PVM key (its captions come from that PVM's predictions); the prompt is the OOD suffix (Sec. 3.3).

Model-running tasks carry the ``gpu`` tag: a tag concurrency limit (``vecaf deploy`` sets 1) keeps two of
them off one accelerator. Models are loaded once per process (memoised).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task

from flows.params import DataParams, ModelParams
from tasks.data import LOCAL_TASK, image_content_hashes, load_split

GPU_TASK: dict[str, Any] = {**LOCAL_TASK, "tags": ["gpu"]}
"""Options of a task that runs a model (tag ``gpu``, limited by a tag concurrency limit)."""


@dataclass(frozen=True)
class FeatureKeys:
    """The names under which features are stored and looked up in Feast.

    Attributes:
        pvm: value of ``image_embeddings.pvm`` (PVM name, checkpoint hash, input side).
        captioner: value of ``captions.captioner``.
        encoder: value of ``text_embeddings.encoder``.
        prompt: the OOD caption suffix ("" for none), ``prompt_suffix`` of captions and text embeddings.
    """

    pvm: str
    captioner: str
    encoder: str
    prompt: str

    def to_dict(self) -> dict[str, str]:
        """JSON-ready view."""
        return {"pvm": self.pvm, "captioner": self.captioner, "encoder": self.encoder, "prompt": self.prompt}


@lru_cache(maxsize=8)
def _file_sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def feature_keys(models: ModelParams, data: DataParams, ood_prompt: str | None) -> FeatureKeys:
    """The :class:`FeatureKeys` of a model choice and input size."""
    pvm = models.pvm
    if models.pvm_checkpoint:
        path = Path(models.pvm_checkpoint).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"PVM checkpoint {path} does not exist")
        pvm += f"+{path.name}:{_file_sha(str(path))[:12]}"
    if data.image_size is not None:
        pvm += f"@{data.image_size}px"
    captioner = models.captioner
    if captioner in ("imagenet-labels", "imagenet"):
        captioner += f"@{pvm}"
    return FeatureKeys(pvm=pvm, captioner=captioner, encoder=models.text_encoder, prompt=ood_prompt or "")


@lru_cache(maxsize=2)
def get_pvm(name: str, checkpoint: str | None, allow_hub: bool) -> Any:
    """``vecaf.models.load_pvm``, memoised per process."""
    from vecaf.models import load_pvm

    return load_pvm(name, checkpoint=checkpoint, allow_hub=allow_hub)


@lru_cache(maxsize=2)
def get_text_encoder(name: str, allow_hub: bool, device: str) -> Any:
    """``vecaf.models.load_text_encoder``, memoised per process."""
    from vecaf.models import load_text_encoder

    return load_text_encoder(name, allow_hub=allow_hub, device=device)


def embed_image_shard(
    data: DataParams,
    models: ModelParams,
    split: str,
    start: int,
    stop: int,
    store: dict[str, Any] | str,
    *,
    allow_hub: bool = False,
) -> dict[str, Any]:
    """Embed images [start, stop) of a split with the PVM and append the new rows to ``image_embeddings``.

    Returns:
        ``{"split", "start", "stop", "new", "cached", "path"}``; ``path`` is None when nothing was new.
    """
    from tasks.features import cached_ids, write_image_embeddings

    keys = feature_keys(models, data, None)
    ds = load_split(data, split)
    ids = ds.ids[start:stop]
    hashes = image_content_hashes(ds)[start:stop]
    done = cached_ids(store, "image_embeddings", ids, hashes, model_name=keys.pvm)
    todo = np.flatnonzero(~done)
    out: dict[str, Any] = {
        "split": split, "start": start, "stop": stop, "new": int(todo.size), "cached": int(done.sum()),
    }  # fmt: skip
    if todo.size == 0:
        return {**out, "path": None}
    from vecaf.models import embed

    pvm = get_pvm(models.pvm, models.pvm_checkpoint, allow_hub)
    images = [ds.load_image(start + int(i)) for i in todo]
    vectors = embed(
        pvm, images, batch_size=models.batch_size, device=models.device, image_size=data.image_size, progress=False
    )
    path = write_image_embeddings(
        store,
        [ids[i] for i in todo],
        vectors,
        labels=ds.labels[start:stop][todo],
        split=split,
        pvm=keys.pvm,
        content_hashes=[hashes[i] for i in todo],
    )
    return {**out, "path": path}


def embed_text_shard(
    data: DataParams,
    models: ModelParams,
    ood_prompt: str | None,
    start: int,
    stop: int,
    store: dict[str, Any] | str,
    *,
    allow_hub: bool = False,
) -> dict[str, Any]:
    """Encode the captions of pool images [start, stop) and append the new rows to ``text_embeddings``.

    The captions are read from the ``captions`` view (written by the caption flow); the cache key of t_i
    hashes the caption text, so a changed caption is re-encoded.

    Returns:
        ``{"start", "stop", "new", "cached", "path"}``.
    """
    from tasks.features import cached_ids, content_hash, read_captions, write_text_embeddings

    keys = feature_keys(models, data, ood_prompt)
    ds = load_split(data, data.train_split)
    ids = ds.ids[start:stop]
    _, captions = read_captions(store, captioner=keys.captioner, prompt_suffix=keys.prompt, ids=ids)
    hashes = [content_hash(c) for c in captions]
    done = cached_ids(store, "text_embeddings", ids, hashes, model_name=keys.encoder, prompt=keys.prompt)
    todo = np.flatnonzero(~done)
    out: dict[str, Any] = {"start": start, "stop": stop, "new": int(todo.size), "cached": int(done.sum())}
    if todo.size == 0:
        return {**out, "path": None}
    encoder = get_text_encoder(models.text_encoder, allow_hub, models.device)
    vectors = encoder.encode([captions[i] for i in todo], batch_size=models.batch_size)
    path = write_text_embeddings(
        store,
        [ids[i] for i in todo],
        vectors,
        encoder=keys.encoder,
        prompt_suffix=keys.prompt,
        content_hashes=[hashes[i] for i in todo],
    )
    return {**out, "path": path}


@task(name="embed-image-shard", **GPU_TASK)
def embed_image_shard_task(
    data: DataParams,
    models: ModelParams,
    split: str,
    start: int,
    stop: int,
    store: dict[str, Any] | str,
    allow_hub: bool = False,
) -> dict[str, Any]:
    """Prefect task around :func:`embed_image_shard` (writes one Parquet file, or nothing when cached)."""
    result = embed_image_shard(data, models, split, start, stop, store, allow_hub=allow_hub)
    get_run_logger().info(
        "image embeddings %s[%d:%d]: %d new, %d cached", split, start, stop, result["new"], result["cached"]
    )
    return result


@task(name="embed-text-shard", **GPU_TASK)
def embed_text_shard_task(
    data: DataParams,
    models: ModelParams,
    ood_prompt: str | None,
    start: int,
    stop: int,
    store: dict[str, Any] | str,
    allow_hub: bool = False,
) -> dict[str, Any]:
    """Prefect task around :func:`embed_text_shard` (writes one Parquet file, or nothing when cached)."""
    result = embed_text_shard(data, models, ood_prompt, start, stop, store, allow_hub=allow_hub)
    get_run_logger().info("text embeddings [%d:%d]: %d new, %d cached", start, stop, result["new"], result["cached"])
    return result
