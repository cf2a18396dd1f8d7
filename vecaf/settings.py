"""The one settings object of the project.

Every knob lives here, grouped by part. Values come from (highest priority first): keyword arguments,
``VECAF_*`` environment variables (nested with ``__``, e.g. ``VECAF_MODELS__PVM=resnet18``), an optional
YAML file (``VECAF_CONFIG=path.yaml`` or ``load_settings(path)``), then the defaults below.

Settings are read once, by the entry point (CLI, flow, benchmark), and passed down. Nothing here runs at
import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


class ModelSettings(BaseModel):
    """Which pretrained models the pipeline uses (see ``vecaf.models``)."""

    pvm: str = "efficientnet_lite0"
    pvm_checkpoint: Path | None = None
    text_encoder: str = "all-MiniLM-L6-v2"
    captioner: str = "imagenet-labels"
    allow_hub: bool = Field(False, description="Allow downloading weights named by the user from a hub.")
    device: str = Field("auto", description="'auto' picks CUDA when present, else CPU.")
    batch_size: int = Field(64, gt=0)
    num_workers: int = Field(0, ge=0)
    train_processes: int = Field(
        1,
        ge=0,
        description="Data-parallel processes of each train-loop task (torchrun on the worker that runs it): 1 runs "
        "the engine in the task's own process; N > 1 starts N (gloo on CPU, NCCL on CUDA, one GPU each); 0 = one per "
        "visible CUDA device (1 without).",
    )


class DeploySettings(BaseModel):
    """Where and how ``vecaf deploy`` registers the flows (``flows/deploy.py``; see ``infra/deployments.md``).

    Flows that run models on the accelerator for long (``gpu_flows``) go to ``gpu_pool``; the others
    (caption, featurize, promote and the per-shard flows) to ``cpu_pool``. Unknown keys are refused (a
    misspelt pool setting must not silently deploy to the default pool).
    """

    model_config = {"extra": "forbid"}

    source: str | None = Field(
        None,
        description="Where workers get the code: None = this checkout's folder (workers on this machine or an "
        "image holding the code at the same path); a git URL (https://, ssh://, git@, *.git) cloned at `branch`; "
        "or an s3:// prefix holding a copy of the repository (workers need s3fs).",
    )
    branch: str | None = Field(None, description="Git branch (or tag) of a git `source`; None = the remote's default.")
    image: str | None = Field(
        None, description="Worker image of kubernetes/docker pools (written into the pools' job templates)."
    )
    pool_type: str = Field("process", pattern="^(process|kubernetes|docker)$", description="Type of both pools.")
    cpu_pool: str | None = Field(None, description="Work pool of the CPU flows; None = stack.work_pool.")
    gpu_pool: str | None = Field(None, description="Work pool of the GPU flows; None = the CPU pool.")
    gpu_flows: tuple[str, ...] = Field(
        ("finetune", "vecaf-pipeline"), description="Flows deployed on the GPU pool (add 'caption-shard' for a VLM)."
    )
    job_variables: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Job variables per pool role, e.g. {'gpu': {'env': {'VECAF_MODELS__BATCH_SIZE': '128'}}}; "
        "only the variables the project's job templates expose are accepted.",
    )
    manage_pool_templates: bool = Field(
        True, description="Write the project's base job template (no caller-set command/image) onto the pools."
    )
    fan_out_shards: str = Field(
        "auto",
        pattern="^(auto|always|never)$",
        description="In a deployed run, run each caption/embedding shard as its own flow run on the pool: 'always'; "
        "'never'; 'auto' = always on kubernetes/docker pools, on a process pool only when 2+ workers are online.",
    )


class DataSettings(BaseModel):
    """Where the image pool comes from."""

    dataset: str = "fashion-mnist"
    root: Path | None = Field(None, description="Dataset folder; None uses the dataset's default location.")
    image_size: int | None = Field(None, gt=0, description="Override the PVM's input size (smaller is faster).")
    strict: bool = Field(False, description="Fail on a corrupt image instead of skipping and reporting it.")


class ServiceSettings(BaseModel):
    """The services the pipeline talks to, wherever they run (see ``vecaf.services.resolve_services``).

    Each field left unset falls back to the client's usual environment variable, then to the local stack.
    ``vecaf stack up`` starts only the services whose URL here (or in that variable) is not the local one.
    Unknown keys are refused: a misspelt URL setting must not silently fall back to the local stack.
    """

    model_config = ConfigDict(extra="forbid")

    prefect_api_url: str | None = Field(None, description="Prefect API, e.g. https://prefect.example.org/api.")
    prefect_api_key: SecretStr | None = Field(None, description="Prefect Cloud API key.")
    prefect_api_auth_string: SecretStr | None = Field(None, description="Prefect server basic auth 'user:password'.")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow tracking server (http or https).")
    mlflow_username: SecretStr | None = None
    mlflow_password: SecretStr | None = None
    mlflow_token: SecretStr | None = None
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint (MinIO, Ceph, ...); 'aws' for AWS's own endpoints."
    )
    s3_region: str | None = None
    s3_addressing_style: Literal["auto", "path", "virtual"] | None = None
    s3_access_key: SecretStr | None = Field(None, description="None: AWS_ACCESS_KEY_ID or boto3's credential chain.")
    s3_secret_key: SecretStr | None = None
    bucket: str | None = Field(None, description="Bucket of artifacts and run state; None: stack.bucket.")
    prefix: str = Field("", description="Key prefix of the pipeline's objects in the bucket.")

    @field_validator("prefect_api_url", "mlflow_tracking_uri", "s3_endpoint_url")
    @classmethod
    def _http_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or value == "" or (info.field_name == "s3_endpoint_url" and value == "aws"):
            return value or None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"services.{info.field_name} must be an http:// or https:// URL, got {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _s3_keys_in_pairs(self) -> "ServiceSettings":
        if (self.s3_access_key is None) != (self.s3_secret_key is None):
            raise ValueError("services.s3_access_key and services.s3_secret_key must be set together (or neither)")
        return self


class StackSettings(BaseModel):
    """The local servers started by ``vecaf stack up`` (only those with no external URL in ``services``).

    Keys left unset are generated once per install by ``vecaf stack up`` and kept in
    ``<state_dir>/secrets.json`` (mode 0600); a value here (or in ``VECAF_STACK__*``) overrides the file.
    """

    host: str = "127.0.0.1"
    state_dir: Path = Path(".vecaf")
    prefect_port: int = Field(4200, gt=0, lt=65536)
    mlflow_port: int = Field(5000, gt=0, lt=65536)
    s3_port: int = Field(9000, gt=0, lt=65536)
    s3_access_key: str | None = Field(None, description="None: the per-install key of the secrets file.")
    s3_secret_key: SecretStr | None = Field(None, description="None: the per-install key of the secrets file.")
    prefect_auth_string: SecretStr | None = Field(
        None, description="Basic-auth 'user:password' of the Prefect server; None: the secrets file's."
    )
    prefect_database_url: SecretStr | None = Field(
        None,
        description="Prefect server database (e.g. postgresql+asyncpg://user:pw@host/db); "
        "None: SQLite <state_dir>/prefect/prefect.db.",
    )
    mlflow_backend_store_uri: SecretStr | None = Field(
        None,
        description="MLflow backend store (e.g. postgresql://user:pw@host/db); None: SQLite <state_dir>/mlflow/mlflow.db.",
    )
    bucket: str = "vecaf"
    work_pool: str = "vecaf-process"
    feast_dir: Path | None = Field(None, description="Feast repo/data folder; None means <state_dir>/feast.")

    @property
    def feast_path(self) -> Path:
        """Where the Feast registry, online store and offline Parquet live."""
        return self.feast_dir if self.feast_dir is not None else self.state_dir / "feast"


class FeastSettings(BaseModel):
    """Where the Feast store lives (``tasks.features.store_spec`` turns this into what tasks receive).

    Either a user's ``feature_store.yaml`` (``repo_config``, used as is and never rewritten) or the fields
    below, rendered into one. Secrets stay out of these values: write them as ``${ENV_VAR}`` references
    (e.g. ``redis://:${REDIS_PASSWORD}@redis:6379/0``); they are expanded where the store is opened.
    """

    repo_config: Path | None = Field(
        None, description="A user's feature_store.yaml, used as is; then leave online_store/redis_url/registry unset."
    )
    project: str = Field("vecaf", description="Feast project name (also the Redis key suffix).")
    online_store: str = Field(
        "sqlite", pattern=r"^(sqlite|redis)$", description="'sqlite' (<feast_dir>/online.db) or 'redis' (redis_url)."
    )
    redis_url: str | None = Field(
        None, description="redis://[:password@]host:port[/db] (rediss:// for TLS) or Feast's 'host:port,db=0'."
    )
    registry: str | None = Field(
        None,
        description="A file path, an s3:// URI, or a SQLAlchemy URL (postgresql://...); None: <feast_dir>/registry.db.",
    )
    offline_path: str | None = Field(
        None, description="Folder or s3://bucket/prefix holding one Parquet folder per view; None: <feast_dir>/data."
    )


class Settings(BaseSettings):
    """All settings of the VeCAF pipeline."""

    model_config = SettingsConfigDict(env_prefix="VECAF_", env_nested_delimiter="__", extra="forbid")

    models: ModelSettings = ModelSettings()
    deploy: DeploySettings = DeploySettings()
    data: DataSettings = DataSettings()
    stack: StackSettings = StackSettings()
    feast: FeastSettings = FeastSettings()
    seed: int = 0
    cache_dir: Path = Path(".vecaf/cache")
    services: ServiceSettings = ServiceSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by ``VECAF_CONFIG`` (if any)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("VECAF_CONFIG")
        if not path:
            return {}
        return _read_yaml(Path(path))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"settings file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"settings file {path} must hold a mapping at top level, got {type(data).__name__}")
    return data


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings once: ``overrides`` > ``VECAF_*`` env vars > YAML file (``path`` or ``VECAF_CONFIG``)."""
    if path is None:
        return Settings(**overrides)
    previous = os.environ.get("VECAF_CONFIG")
    os.environ["VECAF_CONFIG"] = str(path)
    try:
        return Settings(**overrides)
    finally:
        if previous is None:
            os.environ.pop("VECAF_CONFIG", None)
        else:
            os.environ["VECAF_CONFIG"] = previous


def resolve_device(name: str = "auto") -> str:
    """'auto' -> 'cuda' when a CUDA device is visible, else 'cpu'; any other name is returned as is."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def dump_settings(settings: Settings) -> str:
    """The resolved settings as YAML (secrets masked), for logging beside a run so it can be rerun."""
    return yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False)


