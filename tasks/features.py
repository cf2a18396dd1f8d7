"""Feature storage of the pipeline: Parquet offline store written in bulk, Feast registry and online store.

What is stored is what the method consumes: PVM embeddings e_i and labels (ODS, Eq. 7), captions and
their text embeddings t_i (CEA, Eq. 8-9; OOD prompt suffix, Sec. 3.3), per-sample losses L_i (Eq. 7).

Where the store is comes from the settings (:func:`store_spec`: ``settings.feast``, a user's
``feature_store.yaml`` used as is, or one rendered from the fields: online store SQLite or Redis, registry a
file, an ``s3://`` file or SQL, offline Parquet in a folder or under ``s3://bucket/prefix``). Every function
takes that spec (a JSON-able dict, so it travels to a worker on another machine), or a local store folder::

    feature_store.yaml   written once when missing (:func:`render_feature_store_yaml`), never rewritten
    registry.db          Feast file registry
    online.db            SQLite online store
    data/<view>/part-<UTC time>-<hash>.parquet   one file per write, never rewritten

All Parquet I/O goes through pyarrow filesystems (local or ``pyarrow.fs.S3FileSystem``), so an ``s3://``
offline path lands in the bucket.

Writes go straight to Parquet with pyarrow (one ``list<float32>`` column for vectors), never row by row
through Feast. A view's value for an image is its latest row: largest ``event_timestamp``, then largest
``created``. Selection reads vectors in bulk from Parquet (:func:`read_embeddings`); the online store,
filled by :func:`materialize_incremental`, serves single-image look-ups (:func:`online_features`).

Rerun cache: each row of a model-derived view carries ``content_key = H(content hash, model, prompt)``
(:func:`content_key`); :func:`cached_ids` says which ids already have a row with the same key, so
captioning and embedding skip them.

The plain functions come first; the Prefect tasks at the end are thin wrappers, one side effect each.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

if TYPE_CHECKING:
    from feast import FeatureStore

FEATURE_REPO_DIR = Path(__file__).resolve().parent.parent / "feature_repo"
JOIN_KEY = "image_id"
EVENT_TIMESTAMP = "event_timestamp"
CREATED_TIMESTAMP = "created"
CONTENT_KEY = "content_key"
CACHED_VIEWS = {"image_embeddings": "pvm", "captions": "captioner", "text_embeddings": "encoder"}
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_TS = pa.timestamp("us", tz="UTC")
_MAX_LIST_VALUES = 2**27

_SCHEMAS = {
    "image_embeddings": pa.schema(
        [(JOIN_KEY, pa.string()), ("embedding", pa.list_(pa.float32())), ("label", pa.int64()),
         ("split", pa.string()), ("pvm", pa.string()), (CONTENT_KEY, pa.string()),
         (EVENT_TIMESTAMP, _TS), (CREATED_TIMESTAMP, _TS)]
    ),
    "captions": pa.schema(
        [(JOIN_KEY, pa.string()), ("caption", pa.string()), ("captioner", pa.string()),
         ("prompt_suffix", pa.string()), (CONTENT_KEY, pa.string()), (EVENT_TIMESTAMP, _TS), (CREATED_TIMESTAMP, _TS)]
    ),
    "text_embeddings": pa.schema(
        [(JOIN_KEY, pa.string()), ("embedding", pa.list_(pa.float32())), ("encoder", pa.string()),
         ("prompt_suffix", pa.string()), (CONTENT_KEY, pa.string()), (EVENT_TIMESTAMP, _TS), (CREATED_TIMESTAMP, _TS)]
    ),
    "sample_losses": pa.schema(
        [(JOIN_KEY, pa.string()), ("loss", pa.float32()), ("model_version", pa.string()), ("loop", pa.int64()),
         (EVENT_TIMESTAMP, _TS), (CREATED_TIMESTAMP, _TS)]
    ),
}


# --------------------------------------------------------------------------------------------------
# Store set-up: the store description ("spec"), feature_store.yaml, FeatureStore, apply

STORE_YAML = "feature_store.yaml"
AWS_ENDPOINT = "aws"
"""An ``s3.endpoint_url`` of a spec that means AWS's own endpoints (not the AWS variables' endpoint)."""
ONLINE_STORE_TYPES = ("redis", "sqlite")
OFFLINE_STORE_TYPES = ("dask", "file")
REGISTRY_TYPES = ("file", "sql")
_SQL_SCHEMES = ("postgresql", "mysql", "sqlite", "mssql", "oracle")


def render_feature_store_yaml(
    store_dir: str | os.PathLike,
    *,
    project: str = "vecaf",
    online_write_batch_size: int = 10_000,
    online_store: str = "sqlite",
    redis_url: str | None = None,
    registry: str | None = None,
) -> str:
    """The ``feature_store.yaml`` of a store whose local files live in ``store_dir`` (absolute paths).

    Args:
        store_dir: folder of the store's local files (file registry ``registry.db``, SQLite ``online.db``).
        project: Feast project name.
        online_write_batch_size: rows per online write batch during materialization (bounds memory).
        online_store: ``"sqlite"`` (``<store_dir>/online.db``) or ``"redis"`` (needs ``redis_url``).
        redis_url: ``redis://[:password@]host:port[/db]``, ``rediss://...`` (TLS), or Feast's own
            ``host:port,db=0,...`` connection string.
        registry: None (``<store_dir>/registry.db``), a file path, an ``s3://`` URI (file registry in a
            bucket), or a SQLAlchemy URL (SQL registry; ``postgresql://`` uses the psycopg 3 driver).

    Returns:
        The YAML text: provider local, the registry, the online store, the ``file`` offline store.

    Raises:
        ValueError: a bad project name, batch size, store type, Redis URL or registry location.
    """
    if not project or not project.replace("_", "").isalnum():
        raise ValueError(f"project must be a non-empty alphanumeric/underscore name, got {project!r}")
    if online_write_batch_size <= 0:
        raise ValueError(f"online_write_batch_size must be positive, got {online_write_batch_size}")
    root = Path(store_dir).resolve()
    registry_type, registry_path = _registry_location(registry, root)
    if online_store == "sqlite":
        online = f"  type: sqlite\n  path: {json.dumps(str(root / 'online.db'))}\n"
    elif online_store == "redis":
        online = f"  type: redis\n  connection_string: {json.dumps(_redis_connection_string(redis_url))}\n"
    else:
        raise ValueError(f"feast.online_store must be one of {list(ONLINE_STORE_TYPES)}, got {online_store!r}")
    if online_store != "redis" and redis_url:
        raise ValueError(f"feast.redis_url is set but feast.online_store is {online_store!r}; set it to 'redis'")
    return (
        f"project: {project}\n"
        "provider: local\n"
        "registry:\n"
        f"  registry_type: {registry_type}\n"
        f"  path: {json.dumps(registry_path)}\n"
        "  cache_ttl_seconds: 60\n"
        "online_store:\n"
        f"{online}"
        "offline_store:\n"
        "  type: file\n"
        "entity_key_serialization_version: 3\n"
        "materialization:\n"
        f"  online_write_batch_size: {int(online_write_batch_size)}\n"
    )


def store_spec(
    settings: Any,
    *,
    services: Any = None,
    s3_endpoint_url: str | None = None,
    s3_region: str | None = None,
    s3_addressing_style: str | None = None,
) -> dict[str, Any]:
    """The store description that tasks receive (JSON-able, so it travels to a worker on another machine).

    Built from ``settings.feast`` (see ``vecaf.settings.FeastSettings``) and ``settings.stack.feast_path``
    (the default folder of the store's local files). The ``feature_store.yaml`` is, first that applies:
    ``feast.repo_config`` (a user's file, as is); the fields ``online_store``/``redis_url``/``registry``
    rendered, when any is set; a ``feature_store.yaml`` already in the store folder (a user's, or one an
    earlier version wrote), as is; else the default rendered (SQLite online store and file registry in
    the store folder). Nothing is written and nothing is contacted here.

    Args:
        settings: the ``vecaf.settings.Settings``.
        services: the resolved services (``vecaf.services.ResolvedServices``): an ``s3://`` offline path is
            then read on the services' S3 endpoint, region and addressing style, with the services' keys
            where the AWS variables hold none (resolved again where the store is opened: no secret is in
            the spec). The three ``s3_*`` arguments override it.
        s3_endpoint_url: S3 endpoint of an ``s3://`` offline path (None: ``AWS_ENDPOINT_URL_S3`` /
            ``AWS_ENDPOINT_URL`` where the store is opened, else AWS). Without ``services``, keys come from
            the standard AWS chain (``AWS_ACCESS_KEY_ID``, ..., instance roles) where the store is opened.
        s3_region: its region (None: ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` there).
        s3_addressing_style: ``"path"`` or ``"virtual"`` (None: path style with an endpoint URL).

    Returns:
        ``{"feature_store_yaml": text, "repo_dir": folder for relative paths in it, "offline_path":
        folder or s3:// URI of the Parquet views, "s3": {"endpoint_url", "region", "addressing_style",
        "keys"}}`` (``keys``: ``"services"`` or ``"aws-chain"``).

    Raises:
        ValueError: the settings name an unknown store type, a bad location, or mix ``repo_config`` with
            the fields it replaces.
        FileNotFoundError: ``feast.repo_config`` names no file.
    """
    feast = settings.feast
    base = _absolute(settings.stack.feast_path)
    if feast.repo_config is not None:
        mixed = {name: getattr(feast, name) for name in ("redis_url", "registry") if getattr(feast, name)}
        if feast.online_store != "sqlite":
            mixed["online_store"] = feast.online_store
        if mixed:
            raise ValueError(
                f"feast.repo_config ({feast.repo_config}) is used as is; remove feast.{', feast.'.join(mixed)} "
                "or put them into that file"
            )
        path = _absolute(feast.repo_config)
        if not path.is_file():
            raise FileNotFoundError(f"feast.repo_config {path} does not exist")
        text, repo_dir, source = path.read_text(), path.parent, f"feast.repo_config {path}"
    elif not (feast.online_store != "sqlite" or feast.redis_url or feast.registry) and (base / STORE_YAML).is_file():
        path = base / STORE_YAML
        text, repo_dir, source = path.read_text(), base, f"{path} (the store folder's own file)"
    else:
        text = render_feature_store_yaml(
            base, project=feast.project, online_store=feast.online_store, redis_url=feast.redis_url,
            registry=feast.registry,
        )
        repo_dir, source = base, "settings.feast"
    _check_config(_parse_config(text, source), source)
    if services is not None:
        s3_endpoint_url = s3_endpoint_url or services.s3_endpoint_url or AWS_ENDPOINT
        s3_region = s3_region or services.s3_region
        if s3_addressing_style is None and services.s3_addressing_style != "auto":
            s3_addressing_style = services.s3_addressing_style
    if s3_addressing_style not in (None, "path", "virtual"):
        raise ValueError(f"s3_addressing_style must be 'path' or 'virtual', got {s3_addressing_style!r}")
    return {
        "feature_store_yaml": text,
        "repo_dir": str(repo_dir),
        "offline_path": _offline_location(feast.offline_path, base / "data"),
        "s3": {
            "endpoint_url": s3_endpoint_url, "region": s3_region, "addressing_style": s3_addressing_style,
            "keys": "aws-chain" if services is None else "services",
        },
    }


def open_store(store: dict | str | os.PathLike, *, project: str = "vecaf") -> FeatureStore:
    """Open the Feast store of a spec (:func:`store_spec`) or of a local store folder.

    A spec's ``feature_store.yaml`` is used as is (``${VAR}`` expanded from the environment, as Feast's
    CLI does) and written nowhere. A folder's ``feature_store.yaml`` is rendered (SQLite, ``project``) only
    when the folder has none; an existing one, a user's or an earlier render, is used as is, never rewritten.
    Local parents of a file registry or SQLite file are created; a Redis online store must answer a ping.

    Raises:
        ValueError: the config names a store type this pipeline does not support (listed in the message).
        ConnectionError: the Redis online store or the SQL registry does not answer (named, with its URL).
    """
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    spec = _as_spec(store, project=project, for_feast=True)
    source = f"feature_store.yaml of {spec['repo_dir']}"
    raw = _parse_config(os.path.expandvars(spec["feature_store_yaml"]), source)
    _check_config(raw, source)
    repo_dir = Path(spec["repo_dir"])
    config = RepoConfig(**raw, repo_path=repo_dir)
    _check_redis(config)
    _make_local_parents(config, repo_dir)
    if str(spec["offline_path"]).startswith("s3://"):
        _use_pyarrow_for_fsspec_s3(spec.get("s3") or {})
    try:
        fs = FeatureStore(repo_path=str(repo_dir), config=config)
        fs.registry  # noqa: B018 - opening the registry here makes an unreachable SQL database fail now
    except Exception as exc:  # noqa: BLE001 - re-raised with the registry named
        if config.registry.registry_type == "sql" and _is_connection_error(exc):
            raise ConnectionError(
                f"Feast SQL registry at {_hide_password(config.registry.path)} is unreachable: {exc}"
            ) from exc
        raise
    fs.vecaf_offline_path = spec["offline_path"]  # where apply_definitions points the views
    fs.vecaf_s3 = dict(spec.get("s3") or {})
    return fs


def apply_definitions(store: FeatureStore | dict | str | os.PathLike) -> list[str]:
    """``feast apply``, programmatically: register the entity and views of ``feature_repo/features.py``.

    The views' FileSources point at ``<offline path>/<view>`` (absolute path or ``s3://`` URI); local
    folders are created here when missing.

    Returns:
        The names of the feature views applied.
    """
    fs = _as_store(store)
    defs = _definitions()
    offline = _offline_of_store(fs)
    endpoint = offline.s3.get("endpoint_url")
    objects = defs.build_definitions(offline.uri, s3_endpoint_override=None if endpoint == AWS_ENDPOINT else endpoint)
    if offline.is_local:
        for view in defs.VIEW_FEATURES:
            Path(defs.view_path(offline.uri, view)).mkdir(parents=True, exist_ok=True)
    fs.apply(objects)
    return [obj.name for obj in objects[1:]]


# --------------------------------------------------------------------------------------------------
# Rerun cache


def content_hash(data: bytes | str) -> str:
    """SHA-256 hex digest of an image's bytes (or a caption's UTF-8 text): the content part of a cache key."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"content_hash takes bytes or str, got {type(data).__name__}")
    return hashlib.sha256(bytes(data)).hexdigest()


def content_key(image_bytes_hash: str, model_name: str, prompt: str = "") -> str:
    """Cache key of one model output: K = SHA-256 of the JSON list [content hash, model name, prompt].

    JSON encoding keeps the three parts apart (``("a|b", "c")`` and ``("a", "b|c")`` give different keys).

    Args:
        image_bytes_hash: hash of the model's input (image bytes; caption text for the text encoder).
        model_name: name of the model, with anything else that changes its output (checkpoint, template).
        prompt: prompt or prompt suffix that steers the output ("" when none).
    """
    for name, value in (("image_bytes_hash", image_bytes_hash), ("model_name", model_name)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    return hashlib.sha256(json.dumps([image_bytes_hash, model_name, prompt]).encode("utf-8")).hexdigest()


def cached_ids(
    store: dict | str | os.PathLike,
    view: str,
    ids: Sequence[str] | np.ndarray,
    content_hashes: Sequence[str],
    *,
    model_name: str,
    prompt: str = "",
) -> np.ndarray:
    """Which ids already have a row in ``view`` for this content, model and prompt.

    Row i is cached when the view's Parquet holds a row with ``image_id == ids[i]`` and
    ``content_key == content_key(content_hashes[i], model_name, prompt)``; a changed image, model or
    prompt therefore misses. Use ``prompt=prompt_suffix`` for captions and text embeddings, "" for
    image embeddings (what the writers use).

    Args:
        store: the store: a spec (:func:`store_spec`), a local store folder or an ``s3://`` store root.
        view: ``"image_embeddings"``, ``"captions"`` or ``"text_embeddings"``.
        ids: image ids, shape (N,).
        content_hashes: one content hash per id, shape (N,).
        model_name: the PVM, captioner or encoder name.
        prompt: the prompt part of the key.

    Returns:
        Boolean mask, shape (N,): True where the features are already stored.
    """
    if view not in CACHED_VIEWS:
        raise ValueError(f"cached_ids works on {sorted(CACHED_VIEWS)}, got view {view!r}")
    id_list = _as_ids(ids)
    keys = [content_key(h, model_name, prompt) for h in _as_strings(content_hashes, len(id_list), "content_hashes")]
    fs, folder, _ = _offline(store).view(view)
    files = _parquet_files(fs, folder)
    if not files:
        return np.zeros(len(id_list), dtype=bool)
    dataset = pads.dataset(files, filesystem=fs, format="parquet")
    stored = dataset.to_table(
        columns=[JOIN_KEY, CONTENT_KEY],
        filter=pc.field(JOIN_KEY).isin(pa.array(id_list, pa.string())) & pc.field(CONTENT_KEY).isin(pa.array(keys)),
    )
    present = set(zip(stored[JOIN_KEY].to_pylist(), stored[CONTENT_KEY].to_pylist()))
    return np.fromiter(((i, k) in present for i, k in zip(id_list, keys)), dtype=bool, count=len(id_list))


# --------------------------------------------------------------------------------------------------
# Bulk writes (offline store)


def write_image_embeddings(
    store: dict | str | os.PathLike,
    ids: Sequence[str] | np.ndarray,
    embeddings: np.ndarray,
    *,
    labels: Sequence[int] | np.ndarray,
    split: str | Sequence[str],
    pvm: str,
    content_hashes: Sequence[str] | None = None,
    event_time: datetime | None = None,
) -> str:
    """Append PVM embeddings e_i (Eq. 7) with labels to the ``image_embeddings`` Parquet, in one file.

    Args:
        store: the store: a spec (:func:`store_spec`), a local store folder or an ``s3://`` store root.
        ids: image ids, shape (N,), unique, non-empty strings (integers are stored as their decimal string).
        embeddings: float32 array, shape (N, D), finite.
        labels: integer class indices, shape (N,).
        split: dataset split of every row, or one per row.
        pvm: name of the PVM.
        content_hashes: optional hash of each image's bytes; enables :func:`cached_ids` with ``model_name=pvm``.
        event_time: time the features refer to (timezone-aware); default now. Rows reach the online store at
            the next :func:`materialize_incremental` only if this is later than the previous one's end.

    Returns:
        Path of the Parquet file written.
    """
    id_list = _as_ids(ids)
    n = len(id_list)
    matrix = _as_embeddings(embeddings, n)
    label_arr = _as_ints(labels, n, "labels")
    splits = [split] * n if isinstance(split, str) else _as_strings(split, n, "split")
    _check_names(split=splits[0], pvm=pvm)
    keys = _content_keys(content_hashes, n, pvm, "")
    when, created = _times(event_time)
    columns = {
        JOIN_KEY: pa.array(id_list, pa.string()),
        "embedding": _list_column(matrix),
        "label": pa.array(label_arr, pa.int64()),
        "split": pa.array(splits, pa.string()),
        "pvm": _repeat(pvm, n, pa.string()),
        CONTENT_KEY: pa.array(keys, pa.string()),
    }
    return _write(store, "image_embeddings", columns, when, created, n)


def write_captions(
    store: dict | str | os.PathLike,
    ids: Sequence[str] | np.ndarray,
    captions: Sequence[str],
    *,
    captioner: str,
    prompt_suffix: str = "",
    content_hashes: Sequence[str] | None = None,
    event_time: datetime | None = None,
) -> str:
    """Append one caption per image to the ``captions`` Parquet.

    Args:
        store: the store: a spec (:func:`store_spec`), a local store folder or an ``s3://`` store root.
        ids: image ids, shape (N,).
        captions: non-empty strings, shape (N,).
        captioner: name of the captioning model.
        prompt_suffix: prompt suffix used (Sec. 3.3), "" for none.
        content_hashes: optional hash of each image's bytes; key ``content_key(hash, captioner, prompt_suffix)``.
        event_time: see :func:`write_image_embeddings`.

    Returns:
        Path of the Parquet file written.
    """
    id_list = _as_ids(ids)
    n = len(id_list)
    texts = _as_strings(captions, n, "captions")
    _check_names(captioner=captioner)
    _check_suffix(prompt_suffix)
    keys = _content_keys(content_hashes, n, captioner, prompt_suffix)
    when, created = _times(event_time)
    columns = {
        JOIN_KEY: pa.array(id_list, pa.string()),
        "caption": pa.array(texts, pa.string()),
        "captioner": _repeat(captioner, n, pa.string()),
        "prompt_suffix": _repeat(prompt_suffix, n, pa.string()),
        CONTENT_KEY: pa.array(keys, pa.string()),
    }
    return _write(store, "captions", columns, when, created, n)


def write_text_embeddings(
    store: dict | str | os.PathLike,
    ids: Sequence[str] | np.ndarray,
    embeddings: np.ndarray,
    *,
    encoder: str,
    prompt_suffix: str = "",
    content_hashes: Sequence[str] | None = None,
    event_time: datetime | None = None,
) -> str:
    """Append text embeddings t_i of the captions (CEA, Eq. 8-9) to the ``text_embeddings`` Parquet.

    Args:
        store: the store: a spec (:func:`store_spec`), a local store folder or an ``s3://`` store root.
        ids: image ids, shape (N,).
        embeddings: float32 array, shape (N, D_text), finite.
        encoder: name of the text encoder.
        prompt_suffix: prompt suffix of the captions embedded (Sec. 3.3).
        content_hashes: optional hash of each embedded caption text; key ``content_key(hash, encoder, prompt_suffix)``.
        event_time: see :func:`write_image_embeddings`.

    Returns:
        Path of the Parquet file written.
    """
    id_list = _as_ids(ids)
    n = len(id_list)
    matrix = _as_embeddings(embeddings, n)
    _check_names(encoder=encoder)
    _check_suffix(prompt_suffix)
    keys = _content_keys(content_hashes, n, encoder, prompt_suffix)
    when, created = _times(event_time)
    columns = {
        JOIN_KEY: pa.array(id_list, pa.string()),
        "embedding": _list_column(matrix),
        "encoder": _repeat(encoder, n, pa.string()),
        "prompt_suffix": _repeat(prompt_suffix, n, pa.string()),
        CONTENT_KEY: pa.array(keys, pa.string()),
    }
    return _write(store, "text_embeddings", columns, when, created, n)


def write_sample_losses(
    store: dict | str | os.PathLike,
    ids: Sequence[str] | np.ndarray,
    losses: np.ndarray,
    *,
    model_version: str,
    loop: int,
    event_time: datetime | None = None,
) -> str:
    """Append per-sample losses L_i (Eq. 7) under ``model_version`` at ``loop`` to the ``sample_losses`` Parquet.

    Every (image_id, model_version, loop) stays in the Parquet; the online store shows the latest one.

    Args:
        store: the store: a spec (:func:`store_spec`), a local store folder or an ``s3://`` store root.
        ids: image ids, shape (N,).
        losses: finite floating-point losses, shape (N,), stored as float32.
        model_version: model version (e.g. an MLflow model version or run id).
        loop: active-finetuning loop index, >= 0.
        event_time: see :func:`write_image_embeddings`.

    Returns:
        Path of the Parquet file written.
    """
    id_list = _as_ids(ids)
    n = len(id_list)
    loss_arr = np.asarray(losses)
    if loss_arr.dtype.kind != "f":
        raise ValueError(f"losses must be floating point, got dtype {loss_arr.dtype}")
    if loss_arr.shape != (n,):
        raise ValueError(f"losses must have shape ({n},) to match ids, got {loss_arr.shape}")
    bad = np.flatnonzero(~np.isfinite(loss_arr))
    if bad.size:
        raise ValueError(f"losses hold NaN or inf at {bad.size} rows, first id {id_list[bad[0]]!r}")
    _check_names(model_version=model_version)
    loop_index = _as_loop(loop)
    when, created = _times(event_time)
    columns = {
        JOIN_KEY: pa.array(id_list, pa.string()),
        "loss": pa.array(loss_arr.astype(np.float32), pa.float32()),
        "model_version": _repeat(model_version, n, pa.string()),
        "loop": _repeat(loop_index, n, pa.int64()),
    }
    return _write(store, "sample_losses", columns, when, created, n)


# --------------------------------------------------------------------------------------------------
# Bulk reads (offline store, for selection)


def read_embeddings(
    store: dict | str | os.PathLike,
    *,
    pvm: str,
    split: str | None,
    ids: Sequence[str] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bulk read of the latest image embedding per image for one PVM (and split), straight from Parquet.

    Args:
        store: the store: a spec (:func:`store_spec`), a local store folder or an ``s3://`` store root.
        pvm: PVM name the embeddings must come from.
        split: split to keep; None keeps every split.
        ids: images wanted, in this order; None returns every stored image, sorted by id.

    Returns:
        ``(ids, embeddings, labels)``: ids (N,) object array of str, embeddings (N, D) float32,
        labels (N,) int64.

    Raises:
        ValueError: no rows match, an id has no embedding, or the stored vectors differ in length.
    """
    _check_names(pvm=pvm)
    if split is not None:
        _check_names(split=split)
    table, rows = _read_latest(store, "image_embeddings", ["embedding", "label"], {"pvm": pvm, "split": split}, ids)
    labels = table["label"].take(rows).to_numpy().astype(np.int64)
    return _ids_out(table, rows), _matrix_out(table["embedding"], rows), labels


def read_text_embeddings(
    store: dict | str | os.PathLike,
    *,
    encoder: str,
    prompt_suffix: str | None = None,
    ids: Sequence[str] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Bulk read of the latest text embedding t_i per image for one encoder (and prompt suffix).

    Returns:
        ``(ids, embeddings)``: (N,) object array of str, (N, D_text) float32. Order as in
        :func:`read_embeddings`.
    """
    _check_names(encoder=encoder)
    if prompt_suffix is not None:
        _check_suffix(prompt_suffix)
    table, rows = _read_latest(
        store, "text_embeddings", ["embedding"], {"encoder": encoder, "prompt_suffix": prompt_suffix}, ids
    )
    return _ids_out(table, rows), _matrix_out(table["embedding"], rows)


def read_captions(
    store: dict | str | os.PathLike,
    *,
    captioner: str | None = None,
    prompt_suffix: str | None = None,
    ids: Sequence[str] | np.ndarray | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Bulk read of the latest caption per image (optionally of one captioner and prompt suffix).

    Returns:
        ``(ids, captions)``: (N,) object array of str and a list of N strings.
    """
    if captioner is not None:
        _check_names(captioner=captioner)
    if prompt_suffix is not None:
        _check_suffix(prompt_suffix)
    table, rows = _read_latest(
        store, "captions", ["caption"], {"captioner": captioner, "prompt_suffix": prompt_suffix}, ids
    )
    return _ids_out(table, rows), table["caption"].take(rows).to_pylist()


def read_losses(
    store: dict | str | os.PathLike,
    *,
    model_version: str,
    loop: int | None = None,
    ids: Sequence[str] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Bulk read of per-sample losses L_i of one model version (and loop; None = its latest loop per image).

    Returns:
        ``(ids, losses)``: (N,) object array of str, (N,) float32.
    """
    _check_names(model_version=model_version)
    where: dict[str, Any] = {"model_version": model_version, "loop": None if loop is None else _as_loop(loop)}
    table, rows = _read_latest(store, "sample_losses", ["loss"], where, ids)
    return _ids_out(table, rows), table["loss"].take(rows).to_numpy().astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Materialization and online look-ups


def materialize_incremental(
    store: FeatureStore | str | os.PathLike,
    *,
    end_date: datetime | None = None,
    views: Sequence[str] | None = None,
) -> list[str]:
    """Load rows with ``event_timestamp`` in [previous end, ``end_date``] into the online store.

    A view never materialized before takes everything up to ``end_date`` (start 1970-01-01, not Feast's
    "now - 1 year" default for ttl 0); views with no Parquet file yet are skipped.

    Args:
        store: a FeatureStore or its folder.
        end_date: timezone-aware end of the window; default now.
        views: view names; default all four.

    Returns:
        Names of the views materialized.
    """
    fs = _as_store(store)
    end = datetime.now(timezone.utc) if end_date is None else end_date
    if end.tzinfo is None:
        raise ValueError("end_date must be timezone-aware (e.g. datetime.now(timezone.utc))")
    registered = {fv.name: fv for fv in fs.list_feature_views()}
    names = list(_definitions().VIEW_FEATURES) if views is None else list(views)
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise ValueError(f"feature views {unknown} are not registered; run apply_definitions first")
    s3 = _offline_of_store(fs).s3
    todo = [n for n in names if _has_data(registered[n].batch_source.path, s3)]
    first = [n for n in todo if registered[n].most_recent_end_time is None]
    later = [n for n in todo if registered[n].most_recent_end_time is not None]
    if first:
        fs.materialize(start_date=_EPOCH, end_date=end, feature_views=first)
    if later:
        fs.materialize_incremental(end_date=end, feature_views=later)
    return todo


def online_features(
    store: FeatureStore | str | os.PathLike,
    ids: Sequence[str] | np.ndarray,
    *,
    features: Sequence[str] | None = None,
    full_feature_names: bool = True,
) -> dict[str, list]:
    """Online look-up of some images' features (UI, serving), from the online store.

    Args:
        store: a FeatureStore or its folder.
        ids: image ids (repeats allowed).
        features: ``"view:feature"`` references; default every feature of the four views.
        full_feature_names: keys ``view__feature`` (needed when two views share a feature name).

    Returns:
        Column dict: ``image_id`` and one list per feature, in the order of ``ids``; None where an image
        has no materialized value.
    """
    id_list = _as_ids(ids, unique=False)
    defs = _definitions()
    refs = [f"{v}:{f}" for v, fs_ in defs.VIEW_FEATURES.items() for f in fs_] if features is None else list(features)
    if not refs:
        raise ValueError("features is empty")
    for ref in refs:
        view, _, name = ref.partition(":") if isinstance(ref, str) else ("", "", "")
        if view not in defs.VIEW_FEATURES or name not in defs.VIEW_FEATURES[view]:
            raise ValueError(
                f"unknown feature reference {ref!r}; use 'view:feature', e.g. 'image_embeddings:embedding'"
            )
    fs = _as_store(store)
    response = fs.get_online_features(
        features=refs, entity_rows=[{JOIN_KEY: i} for i in id_list], full_feature_names=full_feature_names
    )
    return response.to_dict()


# --------------------------------------------------------------------------------------------------
# Helpers


@lru_cache(maxsize=4)
def _load_definitions(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("vecaf_feature_repo_features", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load Feast definitions from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _definitions() -> ModuleType:
    return _load_definitions(str(FEATURE_REPO_DIR / "features.py"))


def _as_store(store: FeatureStore | dict | str | os.PathLike) -> FeatureStore:
    from feast import FeatureStore

    if isinstance(store, FeatureStore):
        return store
    if isinstance(store, (dict, str, os.PathLike)):
        return open_store(store)
    raise ValueError(f"store must be a feast.FeatureStore, a store spec or a folder path, got {type(store).__name__}")


@dataclass(frozen=True)
class _Offline:
    """Where a store's Parquet views live: ``uri`` (absolute folder or ``s3://bucket/prefix``) and S3 options."""

    uri: str
    s3: dict

    @property
    def is_local(self) -> bool:
        return not self.uri.startswith("s3://")

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        """The pyarrow filesystem and the path of ``uri`` inside it."""
        return _filesystem(self.uri, self.s3)

    def view(self, view: str) -> tuple[pafs.FileSystem, str, str]:
        """Filesystem, path inside it and printable URI of ``view``'s Parquet folder."""
        if view not in _SCHEMAS:
            raise ValueError(f"unknown feature view {view!r}; known: {sorted(_SCHEMAS)}")
        fs, root = self.filesystem()
        return fs, f"{root.rstrip('/')}/{view}", f"{self.uri.rstrip('/')}/{view}"


def _filesystem(uri: str, s3: dict) -> tuple[pafs.FileSystem, str]:
    if uri.startswith("s3://"):
        return _s3_filesystem(s3.get("endpoint_url"), s3.get("region"), s3.get("addressing_style"),
                              **_keys(s3)), uri[5:]
    return pafs.LocalFileSystem(), uri


def _keys(s3: dict) -> dict[str, str]:
    """The services' S3 keys for a spec built with ``services`` when the AWS variables hold none (else {}:
    pyarrow's standard AWS chain). Resolved here, where the store is opened, so no key travels in a spec."""
    if s3.get("keys") != "services" or os.environ.get("AWS_ACCESS_KEY_ID"):
        return {}
    from vecaf.services import resolve_services
    from vecaf.settings import load_settings

    found = resolve_services(load_settings())
    if found.s3_access_key is None or found.s3_secret_key is None:
        return {}
    return {"access_key": found.s3_access_key.get_secret_value(), "secret_key": found.s3_secret_key.get_secret_value()}


def _s3_filesystem(
    endpoint_url: str | None,
    region: str | None,
    addressing_style: str | None,
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    session_token: str | None = None,
) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem; unset options come from the standard AWS environment.

    pyarrow does not read ``AWS_ENDPOINT_URL_S3`` itself, so the endpoint is resolved here. Checksums are
    computed only when required (the SDKs' pre-2025 default, set only when the caller has not chosen):
    S3-compatible servers such as ``rclone serve s3`` reject the newer chunked uploads with HTTP 411.
    """
    os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs: dict[str, Any] = {}
    if endpoint and endpoint != "aws":
        kwargs["endpoint_override"] = endpoint
    if region:
        kwargs["region"] = region
    if addressing_style == "virtual":
        kwargs["force_virtual_addressing"] = True
    if access_key and secret_key:
        kwargs.update(access_key=access_key, secret_key=secret_key, session_token=session_token)
    return pafs.S3FileSystem(**kwargs)


def _use_pyarrow_for_fsspec_s3(s3: dict) -> None:
    """Let Feast's dask reads of ``s3://`` Parquet (materialization) go through pyarrow's S3 filesystem.

    Feast's file offline store reads sources with ``dask.dataframe.read_parquet``, which opens ``s3://``
    through fsspec, i.e. the s3fs package; s3fs (through aiobotocore) pins an older botocore than the one
    boto3 here needs. Unless s3fs is installed, fsspec's ``s3`` protocol is registered (for this process)
    as fsspec's own wrapper of a pyarrow ``S3FileSystem``, which dask unwraps and reads with pyarrow.
    """
    if importlib.util.find_spec("s3fs") is not None:
        return
    import fsspec
    from fsspec.implementations.arrow import ArrowFSWrapper

    defaults = dict(s3)

    class PyarrowS3(ArrowFSWrapper):
        """fsspec ``s3://`` over pyarrow (storage options of s3fs's form: key, secret, token, client_kwargs)."""

        protocol = ("s3", "s3a")

        def __init__(self, key=None, secret=None, token=None, client_kwargs=None, endpoint_url=None, **kwargs):
            endpoint = (client_kwargs or {}).get("endpoint_url") or endpoint_url or defaults.get("endpoint_url")
            keys = {"access_key": key, "secret_key": secret, "session_token": token} if key else _keys(defaults)
            fs = _s3_filesystem(endpoint, defaults.get("region"), defaults.get("addressing_style"), **keys)
            super().__init__(fs, **kwargs)

    fsspec.register_implementation("s3", PyarrowS3, clobber=True)
    fsspec.register_implementation("s3a", PyarrowS3, clobber=True)


def _absolute(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (Path.cwd() / p).resolve()


def _offline_location(value: str | None, default: Path) -> str:
    if value is None:
        return str(default)
    text = str(value)
    if text.startswith("s3://"):
        if not text[5:].split("/", 1)[0]:
            raise ValueError(f"feast.offline_path {text!r} names no bucket; use s3://bucket/prefix")
        return text.rstrip("/")
    if "://" in text:
        raise ValueError(f"feast.offline_path must be a folder or s3://bucket/prefix, got {text!r}")
    return str(_absolute(text))


def _registry_location(registry: str | None, root: Path) -> tuple[str, str]:
    if registry is None:
        return "file", str(root / "registry.db")
    text = str(registry)
    if text.startswith("s3://"):
        return "file", text
    scheme = text.split("://", 1)[0] if "://" in text else ""
    if scheme.split("+", 1)[0] in _SQL_SCHEMES:
        if scheme == "postgresql":  # SQLAlchemy's default driver (psycopg2) is not installed; psycopg 3 is
            text = "postgresql+psycopg://" + text.split("://", 1)[1]
        return "sql", text
    if scheme:
        raise ValueError(
            f"feast.registry must be a file path, an s3:// URI or a SQLAlchemy URL "
            f"({'/'.join(_SQL_SCHEMES)}[+driver]://...), got {text!r}"
        )
    return "file", str(_absolute(text))


def _redis_connection_string(url: str | None) -> str:
    """Feast's ``host:port,db=N,password=...,ssl=true`` from a ``redis://`` / ``rediss://`` URL."""
    if not url:
        raise ValueError("feast.online_store is 'redis' but feast.redis_url is not set (redis://host:6379/0)")
    if "://" not in url:
        return url
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss"):
        raise ValueError(f"feast.redis_url must start with redis:// or rediss://, got {parsed.scheme + '://'!r}")
    if not parsed.hostname:
        raise ValueError(f"feast.redis_url names no host: {url!r}")
    db = parsed.path.strip("/") or "0"
    if not db.isdigit():
        raise ValueError(f"feast.redis_url database must be a number, got {db!r}")
    parts = [f"{parsed.hostname}:{parsed.port or 6379}", f"db={db}"]
    if parsed.username:
        parts.append(f"username={parsed.username}")
    if parsed.password:
        parts.append(f"password={parsed.password}")
    if parsed.scheme == "rediss":
        parts.append("ssl=true")
    return ",".join(parts)


def _parse_config(text: str, source: str) -> dict[str, Any]:
    import yaml

    raw = yaml.safe_load(text)
    if not isinstance(raw, dict):
        raise ValueError(f"{source} must hold a mapping, got {type(raw).__name__}")
    return raw


def _check_config(raw: dict[str, Any], source: str) -> None:
    """Reject store types the pipeline cannot use, naming the field and the allowed values."""
    online = raw.get("online_store", "sqlite")
    offline = raw.get("offline_store", "dask")
    registry = raw.get("registry", {})
    found = {
        "online_store.type": (online.get("type", "sqlite") if isinstance(online, dict) else online, ONLINE_STORE_TYPES),
        "offline_store.type": (offline.get("type", "dask") if isinstance(offline, dict) else offline,
                               OFFLINE_STORE_TYPES),
        "registry.registry_type": (registry.get("registry_type", "file") if isinstance(registry, dict) else "file",
                                   REGISTRY_TYPES),
    }
    for field, (value, allowed) in found.items():
        if value not in allowed:
            raise ValueError(
                f"{source}: {field} {value!r} is not supported by this pipeline; use one of {list(allowed)} "
                "(the pipeline writes Parquet itself, so the offline store must read Parquet files)"
                if field.startswith("offline") else
                f"{source}: {field} {value!r} is not supported by this pipeline; use one of {list(allowed)}"
            )


def _as_spec(store: Any, *, project: str = "vecaf", for_feast: bool) -> dict[str, Any]:
    """A spec from a spec, a local store folder or an ``s3://`` store root (``for_feast``: Feast will be opened)."""
    if isinstance(store, dict):
        missing = [k for k in ("feature_store_yaml", "repo_dir", "offline_path") if k not in store]
        if missing or not isinstance(store.get("offline_path"), str):
            raise ValueError(f"store spec lacks {missing or ['offline_path']}; build it with tasks.features.store_spec")
        return store
    if not isinstance(store, (str, os.PathLike)):
        raise ValueError(f"store must be a store spec (dict), a folder or a FeatureStore, got {type(store).__name__}")
    text = os.fspath(store)
    if text.startswith("s3://"):
        if for_feast:
            raise ValueError(
                f"{text!r} holds only the offline Parquet; open the Feast store from tasks.features.store_spec(settings)"
            )
        return {"feature_store_yaml": "", "repo_dir": "", "offline_path": f"{text.rstrip('/')}/data", "s3": {}}
    if "://" in text:
        raise ValueError(f"store must be a local folder or s3://bucket/prefix, got {text!r}")
    root = Path(text).resolve()
    yaml_text = ""
    if for_feast:
        root.mkdir(parents=True, exist_ok=True)
        path = root / "feature_store.yaml"
        if not path.exists():
            path.write_text(render_feature_store_yaml(root, project=project))
        yaml_text = path.read_text()
    return {"feature_store_yaml": yaml_text, "repo_dir": str(root), "offline_path": str(root / "data"), "s3": {}}


def _offline(store: Any) -> _Offline:
    from feast import FeatureStore

    if isinstance(store, FeatureStore):
        return _offline_of_store(store)
    spec = _as_spec(store, for_feast=False)
    return _Offline(spec["offline_path"], dict(spec.get("s3") or {}))


def _offline_of_store(fs: FeatureStore) -> _Offline:
    uri = getattr(fs, "vecaf_offline_path", None) or str(Path(fs.repo_path).resolve() / "data")
    return _Offline(uri, dict(getattr(fs, "vecaf_s3", None) or {}))


def _make_local_parents(config: Any, repo_dir: Path) -> None:
    """Create the folders of a local file registry and SQLite file (Feast creates neither parent)."""
    paths = []
    if config.registry.registry_type == "file" and "://" not in config.registry.path:
        paths.append(config.registry.path)
    if config.online_store.type == "sqlite":
        paths.append(config.online_store.path)
    for path in paths:
        p = Path(path)
        (p if p.is_absolute() else repo_dir / p).parent.mkdir(parents=True, exist_ok=True)


def _check_redis(config: Any) -> None:
    """Ping a Redis online store (plain Redis; clusters and sentinels are left to Feast)."""
    online = config.online_store
    if online.type != "redis" or str(getattr(online.redis_type, "value", online.redis_type)) != "redis":
        return
    import redis
    from feast.infra.online_stores.redis import RedisOnlineStore

    nodes, params = RedisOnlineStore._parse_connection_string(online.connection_string)
    host, port = nodes[0]["host"], int(nodes[0].get("port", 6379))
    db = int(params.get("db", 0))
    url = f"{'rediss' if params.get('ssl') else 'redis'}://{host}:{port}/{db}"
    client = redis.Redis(
        host=host, port=port, db=db, username=params.get("username"), password=params.get("password"),
        ssl=bool(params.get("ssl")), socket_connect_timeout=5, socket_timeout=5,
    )
    try:
        client.ping()
    except (redis.exceptions.RedisError, OSError) as exc:
        raise ConnectionError(
            f"Feast online store: Redis at {url} does not answer ({exc}); check feast.redis_url "
            "or online_store.connection_string"
        ) from exc
    finally:
        client.close()


def _is_connection_error(exc: BaseException) -> bool:
    from sqlalchemy.exc import InterfaceError, OperationalError

    while exc is not None:
        if isinstance(exc, (OperationalError, InterfaceError)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for a message
        return "<unparsable URL>"


def _parquet_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    """The Parquet files of a view folder (none when it does not exist), hidden and temporary files left out."""
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    names = [i.path for i in infos if i.type == pafs.FileType.File]
    return sorted(p for p in names if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith((".", "_")))


def _has_data(uri: str, s3: dict) -> bool:
    fs, path = _filesystem(uri, s3)
    return bool(_parquet_files(fs, path))


def _as_ids(ids: Any, *, unique: bool = True) -> list[str]:
    if isinstance(ids, (str, bytes)):
        raise ValueError("ids must be a sequence of ids, not a single string")
    arr = np.asarray(ids, dtype=object) if not isinstance(ids, np.ndarray) else ids
    if arr.ndim != 1:
        raise ValueError(f"ids must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("ids is empty")
    out: list[str] = []
    seen: set[str] = set()
    for value in arr.tolist():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (str, int, np.integer)):
            raise ValueError(f"ids must be strings or integers, got {type(value).__name__} ({value!r})")
        text = value if isinstance(value, str) else str(int(value))
        if not text:
            raise ValueError("ids must not hold empty strings")
        if unique and text in seen:
            raise ValueError(f"ids must be unique within one write; {text!r} repeats")
        seen.add(text)
        out.append(text)
    return out


def _as_embeddings(embeddings: Any, n: int) -> np.ndarray:
    if not isinstance(embeddings, np.ndarray):
        raise ValueError(f"embeddings must be a numpy array, got {type(embeddings).__name__}")
    if embeddings.dtype != np.float32:
        raise ValueError(f"embeddings must be float32, got dtype {embeddings.dtype}")
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must have shape (N, D), got {embeddings.shape}")
    if embeddings.shape[0] != n:
        raise ValueError(f"embeddings has {embeddings.shape[0]} rows but ids has {n}")
    if embeddings.shape[1] == 0:
        raise ValueError("embeddings has dimension D = 0")
    finite = np.isfinite(embeddings).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"embeddings hold NaN or inf in {bad.size} rows, first row {bad[0]}")
    return np.ascontiguousarray(embeddings)


def _as_ints(values: Any, n: int, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match ids, got {arr.shape}")
    return arr.astype(np.int64)


def _as_strings(values: Any, n: int, name: str) -> list[str]:
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of strings, not a single string")
    out = list(np.asarray(values, dtype=object).tolist()) if isinstance(values, np.ndarray) else list(values)
    if len(out) != n:
        raise ValueError(f"{name} has {len(out)} entries but ids has {n}")
    for value in out:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must hold non-empty strings, got {value!r}")
    return out


def _as_loop(loop: Any) -> int:
    if isinstance(loop, bool) or not isinstance(loop, (int, np.integer)):
        raise ValueError(f"loop must be an integer, got {type(loop).__name__}")
    if loop < 0:
        raise ValueError(f"loop must be >= 0, got {loop}")
    return int(loop)


def _check_names(**names: Any) -> None:
    for name, value in names.items():
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def _check_suffix(prompt_suffix: Any) -> None:
    if not isinstance(prompt_suffix, str):
        raise ValueError(f"prompt_suffix must be a string, got {type(prompt_suffix).__name__}")


def _content_keys(hashes: Sequence[str] | None, n: int, model_name: str, prompt: str) -> list[str | None]:
    if hashes is None:
        return [None] * n
    return [content_key(h, model_name, prompt) for h in _as_strings(hashes, n, "content_hashes")]


def _times(event_time: datetime | None) -> tuple[datetime, datetime]:
    created = datetime.now(timezone.utc)
    if event_time is None:
        return created, created
    if not isinstance(event_time, datetime) or event_time.tzinfo is None:
        raise ValueError("event_time must be a timezone-aware datetime (e.g. datetime.now(timezone.utc))")
    return event_time.astimezone(timezone.utc), created


def _repeat(value: Any, n: int, type_: pa.DataType) -> pa.Array:
    return pa.repeat(pa.scalar(value, type_), n)


def _list_column(matrix: np.ndarray) -> pa.ChunkedArray:
    n, d = matrix.shape
    rows = max(1, _MAX_LIST_VALUES // d)
    chunks = []
    for start in range(0, n, rows):
        block = matrix[start : start + rows]
        offsets = pa.array(np.arange(0, (block.shape[0] + 1) * d, d, dtype=np.int32))
        chunks.append(pa.ListArray.from_arrays(offsets, pa.array(block.reshape(-1))))
    return pa.chunked_array(chunks, pa.list_(pa.float32()))


def _write(
    store: dict | str | os.PathLike, view: str, columns: dict[str, Any], when: datetime, created: datetime, n: int
) -> str:
    """Write one Parquet file into ``view``'s folder and return its path (local) or ``s3://`` URI.

    Locally the file is written under a hidden name and renamed (readers never see half a file); on S3 an
    object appears whole when its upload completes, so it is written under its final key.
    """
    columns = {**columns, EVENT_TIMESTAMP: _repeat(when, n, _TS), CREATED_TIMESTAMP: _repeat(created, n, _TS)}
    table = pa.table(columns, schema=_SCHEMAS[view])
    offline = _offline(store)
    fs, folder, folder_uri = offline.view(view)
    name = f"part-{created.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:12]}.parquet"
    if not offline.is_local:
        pq.write_table(table, f"{folder}/{name}", filesystem=fs, row_group_size=65_536)
        return f"{folder_uri}/{name}"
    Path(folder).mkdir(parents=True, exist_ok=True)
    tmp = Path(folder) / f".{name}.tmp"
    try:
        pq.write_table(table, tmp, row_group_size=65_536)
        os.replace(tmp, Path(folder) / name)
    finally:
        tmp.unlink(missing_ok=True)
    return str(Path(folder) / name)


def _read_latest(
    store: dict | str | os.PathLike,
    view: str,
    columns: list[str],
    where: dict[str, Any],
    ids: Sequence[str] | np.ndarray | None,
) -> tuple[pa.Table, pa.Array]:
    """The rows matching ``where`` and the indices of the latest row per id (``ids`` order, else sorted)."""
    fs, folder_path, folder = _offline(store).view(view)
    wanted = None if ids is None else _as_ids(ids)
    conditions = {k: v for k, v in where.items() if v is not None}
    described = ", ".join(f"{k}={v!r}" for k, v in conditions.items()) or "any provenance"
    files = _parquet_files(fs, folder_path)
    if not files:
        raise ValueError(f"no {view} stored under {folder}")
    expr = None
    for column, value in conditions.items():
        term = pc.field(column) == value
        expr = term if expr is None else expr & term
    if wanted is not None:
        term = pc.field(JOIN_KEY).isin(pa.array(wanted, pa.string()))
        expr = term if expr is None else expr & term
    dataset = pads.dataset(files, filesystem=fs, format="parquet")
    table = dataset.to_table(columns=[JOIN_KEY, *columns, EVENT_TIMESTAMP, CREATED_TIMESTAMP], filter=expr)
    if table.num_rows == 0:
        raise ValueError(f"no {view} rows for {described} under {folder}")
    rows, stored_ids = _latest_rows(table)
    if wanted is not None:
        positions = pc.index_in(pa.array(wanted, pa.string()), value_set=stored_ids)
        if positions.null_count:
            missing = [i for i, p in zip(wanted, positions.to_pylist()) if p is None]
            raise ValueError(f"{len(missing)} ids have no {view} for {described}, e.g. {missing[:5]}")
        rows = rows.take(positions)
    return table, rows


def _latest_rows(table: pa.Table) -> tuple[pa.Array, pa.Array]:
    """Row indices of the latest row per id (sorted by id) and those ids; only key columns are sorted."""
    keys = table.select([JOIN_KEY, EVENT_TIMESTAMP, CREATED_TIMESTAMP])
    order = pc.sort_indices(
        keys,
        sort_keys=[(JOIN_KEY, "ascending"), (EVENT_TIMESTAMP, "descending"), (CREATED_TIMESTAMP, "descending")],
    )
    ids = keys[JOIN_KEY].take(order).combine_chunks()
    first = np.ones(len(ids), dtype=bool)
    if len(ids) > 1:
        first[1:] = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1)).to_numpy(zero_copy_only=False)
    mask = pa.array(first)
    return order.filter(mask), ids.filter(mask)


def _ids_out(table: pa.Table, rows: pa.Array) -> np.ndarray:
    return np.asarray(table[JOIN_KEY].take(rows).to_pylist(), dtype=object)


def _matrix_out(column: pa.ChunkedArray, rows: pa.Array) -> np.ndarray:
    """Rows ``rows`` of a list<float32> column as an (N, D) float32 array (one numpy gather, no Arrow take)."""
    blocks = []
    dims: set[int] = set()
    for chunk in column.chunks:
        if len(chunk) == 0:
            continue
        dims.update(np.unique(np.diff(chunk.offsets.to_numpy())).tolist())
        blocks.append(chunk.flatten().to_numpy(zero_copy_only=False))
    if len(dims) != 1 or 0 in dims:
        raise ValueError(f"stored vectors differ in length ({sorted(dims)}); read one model's embeddings at a time")
    d = dims.pop()
    values = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
    return np.ascontiguousarray(values.reshape(-1, d)[rows.to_numpy()], dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# Prefect tasks (thin wrappers; big arrays are arguments, never results)

_WRITE = {"cache_policy": NO_CACHE, "persist_result": False}
_SERVER = {"cache_policy": NO_CACHE, "persist_result": False, "retries": 2, "retry_delay_seconds": 5}

write_image_embeddings_task = task(write_image_embeddings, name="write-image-embeddings", **_WRITE)
write_captions_task = task(write_captions, name="write-captions", **_WRITE)
write_text_embeddings_task = task(write_text_embeddings, name="write-text-embeddings", **_WRITE)
write_sample_losses_task = task(write_sample_losses, name="write-sample-losses", **_WRITE)
find_cached_ids_task = task(cached_ids, name="find-cached-ids", **_WRITE)
feast_apply_task = task(apply_definitions, name="feast-apply", **_SERVER)
feast_materialize_task = task(materialize_incremental, name="feast-materialize-incremental", **_SERVER)
online_features_task = task(online_features, name="online-features", **_SERVER)
