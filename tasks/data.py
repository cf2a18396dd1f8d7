"""Data tasks: load an image pool, hash its images, write its manifest, report corrupt images.

Every image gets a content hash h_i = SHA-256 of its bytes (the file's bytes for an ImageFolder, the raw
uint8 pixels with their shape for in-memory datasets). The hashes are half of the rerun cache key
K = H(h_i, model, prompt) of ``tasks.features.content_key``; the dataset digest

    D = SHA-256 over the pool, in id order, of "id \\t h_i \\t y_i \\n"

names a pool exactly (same images, same labels), and is logged with every run.

Held-out split of an ImageFolder without ``train``/``test`` folders: it is carved out of the images by
content hash. With u(h) = the first 52 bits of h read as a fraction in [0, 1), an image is held out when
u(h_i) < ``data.holdout_fraction``; in a class with at least two distinct images where that rule leaves one
side empty, the image of lowest u moves to the held-out side (or the one of highest u back to the pool).
An image's side thus depends on its bytes alone (adding images never moves the others), and an image
held out is held out under every copy of its bytes, so pool and held-out never share content.

Checks before training (:func:`check_splits`): the pool and the held-out split share no content hash unless
``data.allow_overlap``, and every class has images on both sides once corrupt images are skipped.

A pool's manifest is a Parquet file (image_id, label, class_name, split, content_hash) stored in the bucket at
``s3://<bucket>/<prefix>manifests/<manifest digest>.parquet`` (:func:`manifest_digest`; ``tasks.storage``);
tasks pass its URI, never the images, and read it through the worker's cache. Datasets and
hashes are memoised per process, so the shard tasks of one flow run load a pool once.
"""

from __future__ import annotations

import hashlib
import json
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
        manifest: the manifest Parquet: its ``s3://`` URI once stored (a local path before).
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

    An ImageFolder without split folders is carved into pool and held-out split by content hash (see
    the module docstring).

    Args:
        data: the data parameters (name, root, sizes, subset seed).
        split: ``data.train_split`` or ``data.test_split``.
        strict: fail on a corrupt image instead of skipping it.

    Raises:
        ValueError: an ImageFolder has one split folder but not the other.
    """
    from vecaf.data import load_dataset

    if carves_holdout(data):
        if split in (data.train_split, data.test_split):
            return _carved_split(data, split, strict=strict)
    return load_dataset(
        data.dataset, root=data.root, split=split, strict=strict, limit=split_limit(data, split), seed=data.subset_seed
    )


def _split_folder(root: Path, split: str) -> bool:
    folder = root / split
    return folder.is_dir() and any(d.is_dir() and not d.name.startswith(".") for d in folder.iterdir())


def carves_holdout(data: DataParams) -> bool:
    """Whether the held-out split is carved out of the images: an ImageFolder with neither split folder.

    Raises:
        ValueError: the folder has one of ``root/<train_split>``, ``root/<test_split>`` but not the other.
    """
    if data.dataset != "imagefolder" or data.root is None or data.train_split == data.test_split:
        return False
    root = Path(data.root).expanduser()
    if not root.is_dir():
        return False
    has_train, has_test = _split_folder(root, data.train_split), _split_folder(root, data.test_split)
    if has_train != has_test:
        present, missing = (data.train_split, data.test_split) if has_train else (data.test_split, data.train_split)
        raise ValueError(
            f"image folder {root} has a {present!r} split folder but no {missing!r} one: add "
            f"{root / missing}/<class>/<images>, or put every class folder directly under {root} (the held-out "
            f"split is then carved out by content hash, data.holdout_fraction={data.holdout_fraction})"
        )
    return not has_train


def hash_fraction(content_hash: str) -> float:
    """u(h): the first 52 bits of a hex content hash as a fraction in [0, 1)."""
    return int(content_hash[:13], 16) / float(16**13)


def holdout_mask(labels: np.ndarray, hashes: list[str], fraction: float) -> np.ndarray:
    """Which images form the held-out split when it is carved by content hash (see the module docstring).

    Args:
        labels: (N,) class labels.
        hashes: N content hashes h_i.
        fraction: the held-out share, in (0, 1).

    Returns:
        (N,) bool, True for held-out images; equal hashes always get the same value.
    """
    labels = np.asarray(labels)
    if len(labels) != len(hashes):
        raise ValueError(f"{len(labels)} labels but {len(hashes)} hashes")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must lie in (0, 1), got {fraction}")
    held: set[str] = set()
    for c in np.unique(labels):
        unique = sorted({hashes[i] for i in np.flatnonzero(labels == c)}, key=lambda h: (hash_fraction(h), h))
        chosen = {h for h in unique if hash_fraction(h) < fraction}
        if len(unique) >= 2:
            if not chosen:
                chosen = {unique[0]}
            elif len(chosen) == len(unique):
                chosen.discard(unique[-1])
        held |= chosen
    return np.fromiter((h in held for h in hashes), dtype=bool, count=len(hashes))


@lru_cache(maxsize=4)
def _whole_folder(dataset: str, root: str, strict: bool) -> Any:
    from vecaf.data import load_dataset

    return load_dataset(dataset, root=root, split="", strict=strict, limit=None)


def _carved_split(data: DataParams, split: str, *, strict: bool) -> Any:
    from vecaf.data.dataset import FileImageDataset, subset_indices

    whole = _whole_folder(data.dataset, str(data.root), strict)
    hashes = image_content_hashes(whole)
    held = holdout_mask(whole.labels, hashes, data.holdout_fraction)
    is_test = split == data.test_split
    side = np.flatnonzero(held if is_test else ~held)
    keep = side[subset_indices(whole.labels[side], split_limit(data, split), seed=data.subset_seed)]
    carved = FileImageDataset(
        [whole.paths[i] for i in keep],
        name=whole.name,
        split=split,
        ids=[whole.ids[i] for i in keep],
        labels=whole.labels[keep],
        class_names=whole.class_names,
        skipped=[] if is_test else whole.skipped,
        root=whole.root,
    )
    carved._vecaf_content_hashes = [hashes[i] for i in keep]
    return carved


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
    """The manifest table (image_id, label, class_name, split, content_hash) of a local path or an ``s3://``
    URI (fetched into this worker's cache when missing, see ``tasks.storage``)."""
    from tasks.storage import local_copy

    return pq.read_table(local_copy(str(path)))


def manifest_digest(dataset_digest_: str, split: str, class_names: list[str]) -> str:
    """The manifest's content address: SHA-256 over the dataset digest D, the split name and the class names
    (everything the manifest's rows are made of), so equal manifests share one object in the bucket."""
    payload = json.dumps({"dataset_digest": dataset_digest_, "split": split, "class_names": list(class_names)})
    return hashlib.sha256(payload.encode()).hexdigest()


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


def check_splits(data: DataParams, pool: dict[str, Any], holdout: dict[str, Any]) -> dict[str, Any]:
    """Refuse a pool/held-out pair that would train a bad model or measure it on its own training images.

    Checked, in this order: both splits name the same classes; every class has at least one image in the
    pool and in the held-out split (after corrupt images were skipped); the two splits share no image
    content hash, unless ``data.allow_overlap``.

    Args:
        data: the data parameters (``allow_overlap``, sizes asked for).
        pool: ``load_dataset_task``'s answer for ``data.train_split``.
        holdout: its answer for ``data.test_split``.

    Returns:
        ``{"pool_size_used", "test_size_used", "pool_size_asked", "test_size_asked", "overlap",
        "pool_class_counts", "test_class_counts"}`` (class counts by class name).

    Raises:
        ValueError: naming the split, the classes or the number of shared images, and how to fix it.
    """
    names = list(pool["class_names"])
    if list(holdout["class_names"]) != names:
        raise ValueError(f"the held-out split's classes {holdout['class_names']} differ from the pool's {names}")
    pool_table = read_manifest(pool["manifest"])
    test_table = read_manifest(holdout["manifest"])
    counts = {}
    for what, ref, table in (("pool", pool, pool_table), ("held-out split", holdout, test_table)):
        per_class = np.bincount(np.asarray(table["label"].to_pylist(), dtype=np.int64), minlength=len(names))
        counts[what] = {n: int(k) for n, k in zip(names, per_class.tolist())}
        empty = [n for n, k in counts[what].items() if k == 0]
        if empty:
            skipped = len(ref.get("skipped") or [])
            after = f" after {skipped} corrupt image(s) were skipped (artifact skipped-images)" if skipped else ""
            raise ValueError(
                f"{len(empty)} class(es) have no image in the {what} {ref['dataset']}/{ref['split']}{after}: "
                f"{empty}; a model trained or evaluated so would be wrong for them. Add readable images to those "
                f"classes, remove their folders, or raise data.pool_size/data.test_size"
            )
    pool_hashes = set(pool_table["content_hash"].to_pylist())
    test_ids, test_hashes = test_table["image_id"].to_pylist(), test_table["content_hash"].to_pylist()
    shared = [i for i, h in zip(test_ids, test_hashes) if h in pool_hashes]
    if shared and not data.allow_overlap:
        raise ValueError(
            f"{len(shared)} of the {test_table.num_rows} held-out images also are in the pool (same content hash), "
            f"e.g. {shared[:3]}: accuracies and promotion would be measured on training images. Remove them from "
            f"one split, or set data.allow_overlap=true to accept it knowingly"
        )
    return {
        "pool_size_used": int(pool_table.num_rows),
        "test_size_used": int(test_table.num_rows),
        "pool_size_asked": data.pool_size,
        "test_size_asked": data.test_size,
        "overlap": len(shared),
        "pool_class_counts": counts["pool"],
        "test_class_counts": counts["held-out split"],
    }


def warn_smaller_than_asked(logger: Any, checked: dict[str, Any]) -> list[str]:
    """Log a warning for each split that holds fewer images than its size parameter asked for.

    Args:
        logger: the run logger.
        checked: :func:`check_splits`'s answer.

    Returns:
        The warnings logged.
    """
    out = []
    for what, param in (("pool", "pool_size"), ("held-out split", "test_size")):
        asked, used = checked[f"{param}_asked"], checked[f"{param}_used"]
        if asked is not None and used < asked:
            out.append(
                f"data.{param}={asked} asked, but the {what} holds only {used} images: using {used} "
                f"(MLflow param data.{param}_used)"
            )
            logger.warning(out[-1])
    return out


def store_manifest(ref: DatasetRef) -> DatasetRef:
    """Upload a split's manifest to its content address in the bucket (once); the ref then names that URI.

    Returns:
        ``ref`` with ``manifest`` = ``s3://<bucket>/<prefix>manifests/<manifest digest>.parquet``.
    """
    from dataclasses import replace

    from flows.runtime import runtime
    from tasks.storage import exists, manifest_uri, put_file

    uri = manifest_uri(runtime(), manifest_digest(ref.digest, ref.split, ref.class_names))
    if not exists(uri):
        put_file(ref.manifest, uri)
    return replace(ref, manifest=uri)


@task(name="load-dataset", **LOCAL_TASK)
def load_dataset_task(data: DataParams, split: str, work_dir: str) -> dict[str, Any]:
    """Load a split, store its manifest in the bucket, and report corrupt images that were skipped.

    ``work_dir`` is scratch space for the manifest before it is uploaded; the answer's ``manifest`` is the
    manifest's ``s3://`` URI (content-addressed, see :func:`store_manifest`).

    Skipped images are logged and published as the Prefect table artifact ``skipped-images`` of the run.

    Returns:
        ``DatasetRef.to_dict()``.
    """
    ref = store_manifest(describe_split(data, split, work_dir))
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


def pool_version(data: DataParams, models: Any, store: dict[str, Any] | str) -> dict[str, Any]:
    """The pool as this run finds it: its version (size, images per class, digest D) and what is new in it.

    An image is *new* when the ``image_embeddings`` view holds no row for its content under this run's PVM
    key (``tasks.features.cached_ids``): it was never featurized, so this run captions and embeds it; the
    others were seen by an earlier run and are served from the feature cache. A folder that grows between
    runs therefore shows ``new`` = the images added since (0 when nothing was dropped in).

    Args:
        data: the data parameters (the pool is ``data.train_split``).
        models: the ``ModelParams`` (the PVM key of the cache lookup).
        store: the Feast store spec (``Runtime.feature_store``), as every task that reads the store gets it.

    Returns:
        ``{"dataset", "split", "size", "digest", "class_counts": {class name: images}, "new", "cached"}``.
    """
    from tasks.embeddings import feature_keys
    from tasks.features import cached_ids

    ds = load_split(data, data.train_split)
    hashes = image_content_hashes(ds)
    seen = cached_ids(store, "image_embeddings", ds.ids, hashes, model_name=feature_keys(models, data, None).pvm)
    counts = np.bincount(np.asarray(ds.labels, dtype=np.int64), minlength=ds.num_classes)
    return {
        "dataset": ds.name,
        "split": data.train_split,
        "size": len(ds),
        "digest": dataset_digest(ds.ids, hashes, ds.labels),
        "class_counts": {str(c): int(k) for c, k in zip(ds.class_names, counts.tolist())},
        "new": int((~seen).sum()),
        "cached": int(seen.sum()),
    }


@task(name="pool-version", **LOCAL_TASK)
def pool_version_task(data: DataParams, models: Any, store: dict[str, Any] | str) -> dict[str, Any] | None:
    """:func:`pool_version`, logged ("N images, n new, m seen before") and published as the table artifact
    ``pool-version``: one row per class, then "(all)", "(new)" and "(seen before)"; the digest in its
    description.

    A pool that cannot be loaded (missing folder, no class folders...) gives None and a warning: the step
    that loads it for real (``load-dataset`` in caption/featurize) then fails with the reason, as it would
    without this count.
    """
    from prefect.artifacts import create_table_artifact

    try:
        version = pool_version(data, models, store)
    except (OSError, ValueError) as exc:
        get_run_logger().warning("pool version unknown (%s); the data steps below report it", exc)
        return None
    get_run_logger().info(
        "pool %s/%s: %d images in %d classes, %d new (captioned and embedded now), %d seen before (cached); "
        "digest %s", version["dataset"], version["split"], version["size"], len(version["class_counts"]),
        version["new"], version["cached"], version["digest"][:12],
    )  # fmt: skip
    rows = [{"class": c, "images": k} for c, k in version["class_counts"].items()]
    rows += [{"class": "(all)", "images": version["size"]}, {"class": "(new)", "images": version["new"]},
             {"class": "(seen before)", "images": version["cached"]}]  # fmt: skip
    create_table_artifact(
        key="pool-version",
        table=rows,
        description=f"Pool {version['dataset']}/{version['split']}: {version['size']} images, {version['new']} new, "
        f"{version['cached']} seen before; digest {version['digest']}.",
    )
    return version
