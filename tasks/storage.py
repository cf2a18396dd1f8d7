"""Run state in object storage: what tasks hand each other lives in the bucket, a worker's disk is a cache.

Every file one task writes and another reads (dataset manifests, loop checkpoints, loop records, picks, the
trained model folder) is stored in the services' bucket, and tasks exchange ``s3://`` URIs, never local
paths. So a task may run on any worker, on any host, with an empty disk:

- ``s3://<bucket>/<prefix>manifests/<manifest digest>.parquet``: a split's manifest, content-addressed (see
  ``tasks.data.manifest_digest``): the same split of the same images always has the same URI.
- ``s3://<bucket>/<prefix>runs/<run key>/``: one training run's state (see :func:`run_key`):
  ``checkpoints/loop-<l>.pt``, ``picks-loop-<l>.parquet``, ``loop-<l>.json`` (written last: its presence
  marks loop l as complete), and after the last loop ``model/`` and ``result.json``.

The local cache (``Runtime.cache_dir``, default ``<state_dir>/work/cache``) mirrors the bucket's keys
(``<cache_dir>/<bucket>/<key>``). It may vanish at any time: :func:`local_copy` downloads an object when its
cached copy is missing. Downloads land in a temporary file first and are renamed into place, so a killed
task never leaves a truncated file that a later task would trust.

The run key is a digest of what decides the training result: the resolved training parameters (data,
models, caption prompt, objective, training) and the digests of the pool and the held-out split. A rerun
of the same parameters on the same images therefore finds the loops an earlier run stored and resumes after
the last one (the engine restores weights, optimizer, schedule and RNG from the checkpoint); the registry
parameters (experiment, model name) do not enter it, nor does the code version (a code change that alters
training must change a parameter, or the stored loops are reused).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

S3_SCHEME = "s3://"
RUN_KEY_LENGTH = 24
"""Hex characters of the run key (96 bits)."""

_CLIENTS: dict[tuple[Any, ...], Any] = {}
_LOCK = threading.Lock()


def is_uri(location: str) -> bool:
    """Whether ``location`` is an ``s3://`` URI (else it is a local path)."""
    return str(location).startswith(S3_SCHEME)


def split_uri(uri: str) -> tuple[str, str]:
    """``(bucket, key)`` of ``s3://bucket/key``.

    Raises:
        ValueError: not an ``s3://bucket/key`` URI.
    """
    if not is_uri(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket or not key:
        raise ValueError(f"an s3:// URI needs a bucket and a key, got {uri!r}")
    return bucket, key


def join(uri: str, *parts: str) -> str:
    """``uri/part/...`` (no doubled slashes)."""
    out = uri.rstrip("/")
    for part in parts:
        out += "/" + str(part).strip("/")
    return out


def store_uri(bucket: str, prefix: str, *parts: str) -> str:
    """``s3://<bucket>/<prefix><parts joined by '/'>``."""
    return join(f"{S3_SCHEME}{bucket}/{prefix.strip('/')}".rstrip("/"), *parts)


def run_uri(rt: Any, key: str) -> str:
    """Where the state of the training run with run key ``key`` lives (``Runtime`` ``rt``)."""
    return store_uri(rt.bucket, rt.prefix, "runs", key)


def manifest_uri(rt: Any, digest: str) -> str:
    """Where the manifest with this manifest digest lives (``Runtime`` ``rt``)."""
    return store_uri(rt.bucket, rt.prefix, "manifests", f"{digest}.parquet")


def run_key(params: dict[str, Any], pool_digest: str, test_digest: str, *, start: str = "base") -> str:
    """The run key: SHA-256 over the canonical JSON of the training parameters, the two split digests and the
    model the run starts from (``"base"``, or ``"champion:<model id>"`` for a warm start).

    Args:
        params: ``{"data", "models", "ood_prompt", "objective", "training"}`` as JSON-ready values (other keys
            are ignored, so the registry parameters never change the key).
        pool_digest: the pool's dataset digest.
        test_digest: the held-out split's dataset digest.

    Returns:
        The first :data:`RUN_KEY_LENGTH` hex characters.
    """
    keep = {k: params.get(k) for k in ("data", "models", "ood_prompt", "objective", "training")}
    payload = {"params": keep, "pool": pool_digest, "test": test_digest}
    if start != "base":
        payload["start"] = start
    payload = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:RUN_KEY_LENGTH]


def _runtime() -> Any:
    from flows.runtime import runtime

    return runtime()


def client() -> Any:
    """The S3 client of the current settings' services (one per endpoint and key, reused)."""
    rt = _runtime()
    s = rt.services
    marker = (
        s.s3_endpoint_url, s.s3_region, s.s3_addressing_style,
        None if s.s3_access_key is None else hashlib.sha256(s.s3_access_key.get_secret_value().encode()).hexdigest(),
        None if s.s3_secret_key is None else hashlib.sha256(s.s3_secret_key.get_secret_value().encode()).hexdigest(),
    )  # fmt: skip
    with _LOCK:
        found = _CLIENTS.get(marker)
        if found is None:
            found = _CLIENTS[marker] = rt.s3_client(timeout=60.0)
    return found


def cache_dir() -> Path:
    """This worker's cache folder (``Runtime.cache_dir``)."""
    return Path(_runtime().cache_dir)


def cache_path(uri: str, root: str | os.PathLike | None = None) -> Path:
    """Where the cache keeps ``uri``: ``<cache_dir>/<bucket>/<key>``."""
    bucket, key = split_uri(uri)
    base = Path(root) if root is not None else cache_dir()
    return base / bucket / key


def _not_found(exc: Exception) -> bool:
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


def exists(uri: str) -> bool:
    """Whether the object ``uri`` is stored."""
    from botocore.exceptions import ClientError

    bucket, key = split_uri(uri)
    try:
        client().head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _not_found(exc):
            return False
        raise
    return True


def put_file(local: str | os.PathLike, uri: str) -> str:
    """Upload one file to ``uri`` and keep it in the cache under ``uri``'s place; returns ``uri``.

    Raises:
        FileNotFoundError: ``local`` is not a file.
    """
    local = Path(local)
    if not local.is_file():
        raise FileNotFoundError(f"cannot store {local} at {uri}: no such file")
    bucket, key = split_uri(uri)
    client().upload_file(str(local), bucket, key)
    cached = cache_path(uri)
    if cached.resolve() != local.resolve():
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        shutil.copyfile(local, tmp)
        os.replace(tmp, cached)
    return uri


def put_folder(local: str | os.PathLike, uri: str) -> str:
    """Upload every file under folder ``local`` to ``uri/<relative path>``; returns ``uri``.

    Raises:
        FileNotFoundError: ``local`` is not a folder or holds no file.
    """
    local = Path(local)
    files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else []
    if not files:
        raise FileNotFoundError(f"cannot store folder {local} at {uri}: no such folder, or it holds no file")
    for path in files:
        put_file(path, join(uri, path.relative_to(local).as_posix()))
    _folder_marker(uri).touch()
    return uri


def _folder_marker(uri: str) -> Path:
    """The cache's note that the folder ``uri`` is complete there (beside it, never inside it)."""
    folder = cache_path(uri)
    return folder.with_name(f".{folder.name}.complete")


def get_file(uri: str) -> Path:
    """The cached copy of object ``uri``, downloaded first when it is missing.

    Raises:
        FileNotFoundError: the object is not stored.
    """
    from botocore.exceptions import ClientError

    cached = cache_path(uri)
    if cached.is_file():
        return cached
    bucket, key = split_uri(uri)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        client().download_file(bucket, key, str(tmp))
    except ClientError as exc:
        tmp.unlink(missing_ok=True)
        if _not_found(exc):
            raise FileNotFoundError(f"{uri} is not stored (bucket {bucket!r}, key {key!r})") from exc
        raise
    try:  # the object's time, so that what is derived from the file's time does not depend on the download
        stamp = client().head_object(Bucket=bucket, Key=key)["LastModified"].timestamp()
        os.utime(tmp, (stamp, stamp))
    except (ClientError, KeyError, OSError):
        pass
    os.replace(tmp, cached)
    return cached


def get_folder(uri: str) -> Path:
    """The cached copy of every object under ``uri/``, downloading the missing ones; returns the folder.

    A folder this cache uploaded or downloaded whole is marked so (a hidden file beside it) and then served
    without asking the bucket.

    Raises:
        FileNotFoundError: nothing is stored under ``uri/``.
    """
    marker = _folder_marker(uri)
    if marker.is_file() and cache_path(uri).is_dir():
        return cache_path(uri)
    bucket, key = split_uri(uri)
    prefix = key.rstrip("/") + "/"
    keys: list[str] = []
    for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    if not keys:
        raise FileNotFoundError(f"nothing is stored under {uri}/")
    for k in keys:
        get_file(f"{S3_SCHEME}{bucket}/{k}")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return cache_path(uri)


def list_keys(uri: str) -> list[str]:
    """Relative names of the objects under ``uri/``, sorted."""
    bucket, key = split_uri(uri)
    prefix = key.rstrip("/") + "/"
    out: list[str] = []
    for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"][len(prefix) :] for o in page.get("Contents", [])]
    return sorted(out)


def local_copy(location: str | os.PathLike) -> str:
    """A local path for ``location``: an ``s3://`` object (or folder, when no object has that exact key) is
    fetched into the cache when missing; a local path is returned as it is."""
    location = str(location)
    if not is_uri(location):
        return location
    if _folder_marker(location).is_file() and cache_path(location).is_dir():
        return str(cache_path(location))
    try:
        return str(get_file(location))
    except FileNotFoundError:
        return str(get_folder(location))
