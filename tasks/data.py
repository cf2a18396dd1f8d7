"""Data tasks: load an image pool, hash its images, write its manifest, report corrupt images.

Every image gets a content hash h_i = SHA-256 of its bytes (the file's bytes for an ImageFolder, the raw
uint8 pixels with their shape for in-memory datasets). The hashes are half of the rerun cache key
K = H(h_i, model, prompt) of ``tasks.features.content_key``; the dataset digest

    D = SHA-256 over the pool, in id order, of "id \\t h_i \\t y_i \\n"

names a pool exactly (same images, same labels), and is logged with every run.

A pool's manifest is a Parquet file (image_id, label, class_name, split, content_hash) under
``<state_dir>/work/manifests/``, named by its digest; tasks pass its path, never the images. Datasets and
hashes are memoised per process, so the shard tasks of one flow run load a pool once.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.params import DataParams

LOCAL_TASK: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}
"""Options of a task whose side effect is a local file (no Prefect result is stored)."""


@dataclass(frozen=True)
class DatasetRef:
    """What a flow knows about a loaded split (small and JSON-ready; the images stay on disk).

    Attributes:
        dataset: the dataset name.
        split: the split asked for.
        size: N, images kept.
        num_classes: C.
        class_names: the C class names.
        digest: the dataset digest D (see the module docstring).
        manifest: path of the manifest Parquet.
        skipped: (path or id, reason) of each image left out because it could not be decoded.
    """

    dataset: str
    split: str
    size: int
    num_classes: int
    class_names: list[str]
    digest: str
    manifest: str
    skipped: list[tuple[str, str]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return {
            "dataset": self.dataset,
            "split": self.split,
            "size": self.size,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "digest": self.digest,
            "manifest": self.manifest,
            "skipped": [list(s) for s in self.skipped],
        }


def split_limit(data: DataParams, split: str) -> int | None:
    """The subset size of ``split``: ``pool_size`` for the training split, ``test_size`` for the held-out one."""
    return data.test_size if split == data.test_split and split != data.train_split else data.pool_size


@lru_cache(maxsize=8)
def load_split(data: DataParams, split: str, *, strict: bool = False) -> Any:
    """The ``vecaf.data.ImageDataset`` of one split, memoised per process (``DataParams`` is frozen).

    Args:
        data: the data parameters (name, root, sizes, subset seed).
        split: ``data.train_split`` or ``data.test_split``.
        strict: fail on a corrupt image instead of skipping it.
    """
    from vecaf.data import load_dataset

    return load_dataset(
        data.dataset, root=data.root, split=split, strict=strict, limit=split_limit(data, split), seed=data.subset_seed
    )


def image_content_hashes(dataset: Any) -> list[str]:
    """h_i for every image of an ``ImageDataset`` (memoised on the dataset object).

    Args:
        dataset: a ``vecaf.data.ImageDataset``.

    Returns:
        N hex digests, in dataset order.
    """
    cached = getattr(dataset, "_vecaf_content_hashes", None)
    if cached is not None:
        return cached
    from tasks.features import content_hash

    if hasattr(dataset, "images"):
        arr = dataset.images
        shape = "x".join(str(s) for s in arr.shape[1:]).encode()
        hashes = [content_hash(shape + b"|" + np.ascontiguousarray(arr[i]).tobytes()) for i in range(len(arr))]
    elif hasattr(dataset, "paths"):
        hashes = [content_hash(Path(p).read_bytes()) for p in dataset.paths]
    else:
        hashes = []
        for i in range(len(dataset)):
            image = dataset.load_image(i)
            hashes.append(content_hash(f"{image.mode}|{image.size}".encode() + b"|" + image.tobytes()))
    dataset._vecaf_content_hashes = hashes
    return hashes


def dataset_digest(ids: list[str], hashes: list[str], labels: np.ndarray) -> str:
    """D = SHA-256 over ids in order of ``"id\\th_i\\ty_i\\n"`` (see the module docstring)."""
    if not len(ids) == len(hashes) == len(labels):
        raise ValueError(f"ids ({len(ids)}), hashes ({len(hashes)}) and labels ({len(labels)}) differ in length")
    h = hashlib.sha256()
    for i, c, y in zip(ids, hashes, np.asarray(labels).tolist()):
        h.update(f"{i}\t{c}\t{int(y)}\n".encode())
    return h.hexdigest()


def shard_bounds(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) bounds cutting n items into shards of ``shard_size`` (the last one shorter)."""
    if n < 0 or shard_size <= 0:
        raise ValueError(f"need n >= 0 and shard_size > 0, got n={n}, shard_size={shard_size}")
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def read_manifest(path: str | os.PathLike) -> pa.Table:
    """The manifest table (image_id, label, class_name, split, content_hash)."""
    return pq.read_table(str(path))


def describe_split(data: DataParams, split: str, work_dir: str | os.PathLike) -> DatasetRef:
    """Load a split, hash its images and write its manifest (no Prefect needed).

    Args:
        data: the data parameters.
        split: the split to load.
        work_dir: the folder under which ``manifests/`` is written.

    Returns:
        The :class:`DatasetRef`.
    """
    ds = load_split(data, split)
    hashes = image_content_hashes(ds)
    digest = dataset_digest(ds.ids, hashes, ds.labels)
    folder = Path(work_dir) / "manifests"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.name}-{split.replace('/', '_')}-{digest[:16]}.parquet"
    if not path.is_file():
        table = pa.table(
            {
                "image_id": pa.array(ds.ids, pa.string()),
                "label": pa.array(ds.labels, pa.int64()),
                "class_name": pa.array(ds.caption_class_names(), pa.string()),
                "split": pa.array([split] * len(ds), pa.string()),
                "content_hash": pa.array(hashes, pa.string()),
            }
        )
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, str(tmp))
        os.replace(tmp, path)
    return DatasetRef(
        dataset=ds.name,
        split=split,
        size=len(ds),
        num_classes=ds.num_classes,
        class_names=list(ds.class_names),
        digest=digest,
        manifest=str(path),
        skipped=[(str(p), str(r)) for p, r in ds.skipped],
    )


@task(name="load-dataset", **LOCAL_TASK)
def load_dataset_task(data: DataParams, split: str, work_dir: str) -> dict[str, Any]:
    """Load a split, write its manifest, and report corrupt images that were skipped.

    Skipped images are logged and published as the Prefect table artifact ``skipped-images`` of the run.

    Returns:
        ``DatasetRef.to_dict()``.
    """
    ref = describe_split(data, split, work_dir)
    logger = get_run_logger()
    logger.info(
        "%s/%s: %d images, %d classes, digest %s", ref.dataset, split, ref.size, ref.num_classes, ref.digest[:12]
    )
    if ref.skipped:
        from prefect.artifacts import create_table_artifact

        logger.warning(
            "%s/%s: skipped %d corrupt image(s), first %s (%s)", ref.dataset, split, len(ref.skipped), *ref.skipped[0]
        )
        create_table_artifact(
            key="skipped-images",
            table=[{"image": p, "reason": r, "split": split} for p, r in ref.skipped],
            description=f"{len(ref.skipped)} image(s) of {ref.dataset}/{split} could not be decoded and were skipped.",
        )
    return ref.to_dict()
