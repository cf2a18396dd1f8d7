"""Feast definitions of the VeCAF per-image features: one entity, four feature views.

The pipeline keeps, per image of the pool, what the selection of the paper needs (Sec. 3.1-3.3):
the PVM embedding e_i (Eq. 7), the caption and its text embedding t_i (CEA, Eq. 8-9, and the OOD
prompt suffix of Sec. 3.3), and the per-sample loss L_i under a given model version and loop (Eq. 7).

Entity ``image`` (join key ``image_id``, a string). Every view holds one row per ``image_id`` online
(the latest by ``event_timestamp``, ties broken by ``created``); its offline Parquet folder keeps the whole
history, with the columns that say where a value came from (``pvm``, ``captioner``, ``encoder``,
``prompt_suffix``, ``model_version``/``loop``) so that bulk readers select exactly one provenance.
See ``feature_repo/README.md`` for the choice about losses.

Two ways in:
- the pipeline calls :func:`build_definitions` with its own data folder and applies the result
  programmatically (``tasks.features.apply_definitions``);
- a user runs ``cd feature_repo && feast apply``: the module-level objects below point at the default
  state folder ``<repo>/.vecaf/feast`` (the same one ``feature_store.yaml`` here names).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Float32, Int64, String

PROJECT = "vecaf"
EVENT_TIMESTAMP = "event_timestamp"
CREATED_TIMESTAMP = "created"
JOIN_KEY = "image_id"

VIEW_FEATURES: dict[str, tuple[str, ...]] = {
    "image_embeddings": ("embedding", "label", "split", "pvm"),
    "captions": ("caption", "captioner", "prompt_suffix"),
    "text_embeddings": ("embedding", "encoder", "prompt_suffix"),
    "sample_losses": ("loss", "model_version", "loop"),
}

DEFAULT_STORE_DIR = Path(__file__).resolve().parent.parent / ".vecaf" / "feast"

_SCHEMAS = {
    "image_embeddings": [
        Field(name="embedding", dtype=Array(Float32), description="PVM embedding e_i (not normalised)"),
        Field(name="label", dtype=Int64, description="class index of the labeled pool"),
        Field(name="split", dtype=String, description="dataset split, e.g. 'train' or 'test'"),
        Field(name="pvm", dtype=String, description="name of the PVM that produced the embedding"),
    ],
    "captions": [
        Field(name="caption", dtype=String, description="one-sentence caption of the image"),
        Field(name="captioner", dtype=String, description="name of the captioning model"),
        Field(name="prompt_suffix", dtype=String, description="suffix appended to the caption (Sec. 3.3)"),
    ],
    "text_embeddings": [
        Field(name="embedding", dtype=Array(Float32), description="text-encoder embedding t_i of the caption"),
        Field(name="encoder", dtype=String, description="name of the text encoder"),
        Field(name="prompt_suffix", dtype=String, description="prompt suffix of the embedded caption"),
    ],
    "sample_losses": [
        Field(name="loss", dtype=Float32, description="per-sample loss L_i (Eq. 7)"),
        Field(name="model_version", dtype=String, description="model version the loss was computed under"),
        Field(name="loop", dtype=Int64, description="active-finetuning loop index"),
    ],
}

_DESCRIPTIONS = {
    "image_embeddings": "PVM image embeddings with label, split and PVM name.",
    "captions": "Image captions with the captioner name and the prompt suffix.",
    "text_embeddings": "Text embeddings of the captions with the encoder name.",
    "sample_losses": "Latest per-sample loss online; the Parquet keeps every (model_version, loop).",
}


def image_entity() -> Entity:
    """The entity every view is keyed by: one pool image, join key ``image_id`` (a string)."""
    return Entity(
        name="image",
        join_keys=[JOIN_KEY],
        value_type=ValueType.STRING,
        description="One image of the pool, e.g. 'fashion-mnist/train/12'.",
    )


def view_path(data_dir: str | Path, view: str) -> str:
    """The Parquet folder of ``view`` under ``data_dir`` (a local path or an ``s3://`` URI)."""
    if view not in VIEW_FEATURES:
        raise ValueError(f"unknown feature view {view!r}; known: {sorted(VIEW_FEATURES)}")
    if "://" in str(data_dir):
        return f"{str(data_dir).rstrip('/')}/{view}"
    return str(Path(data_dir) / view)


def build_definitions(data_dir: str | Path, *, s3_endpoint_override: str | None = None) -> list:
    """The entity and the four feature views, their FileSources under ``data_dir``.

    Args:
        data_dir: folder holding one sub-folder of Parquet files per view. Give an absolute path (or an
            S3 URI) so the registry stays valid whichever directory Feast is started from.
        s3_endpoint_override: S3 endpoint stored with each source of an ``s3://`` ``data_dir`` (None: the
            reader's environment decides, ``AWS_ENDPOINT_URL_S3`` with ``tasks.features``).

    Returns:
        ``[image, image_embeddings, captions, text_embeddings, sample_losses]``.
    """
    entity = image_entity()
    objects: list = [entity]
    for name, schema in _SCHEMAS.items():
        source = FileSource(
            name=f"{name}_source",
            path=view_path(data_dir, name),
            timestamp_field=EVENT_TIMESTAMP,
            created_timestamp_column=CREATED_TIMESTAMP,
            s3_endpoint_override=s3_endpoint_override,
            description=f"Parquet files written by tasks.features for {name}",
        )
        objects.append(
            FeatureView(
                name=name,
                entities=[entity],
                ttl=timedelta(0),
                schema=[Field(name=JOIN_KEY, dtype=String), *schema],
                source=source,
                online=True,
                description=_DESCRIPTIONS[name],
                tags={"project": PROJECT},
            )
        )
    return objects


image, image_embeddings, captions, text_embeddings, sample_losses = build_definitions(DEFAULT_STORE_DIR / "data")
