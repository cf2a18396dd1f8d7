"""Where the services of the pipeline are: the Prefect API, the MLflow tracking server and S3.

One pure function, :func:`resolve_services`, turns the settings into addresses and credentials; the
pipeline (``flows.runtime``) and the local stack (``infra.stack``) both use it, so neither needs the other.
For each value the first that is set wins:

1. the ``services`` settings (``VECAF_SERVICES__*``, the YAML file's ``services:``);
2. the usual environment names of each client (``PREFECT_API_URL``, ``PREFECT_API_KEY``,
   ``PREFECT_API_AUTH_STRING``, ``MLFLOW_TRACKING_URI``, ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN``,
   ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
   ``AWS_REGION``/``AWS_DEFAULT_REGION``);
3. the local stack (``stack.host`` and ports; its keys from ``stack.*`` or the per-install secrets file
   ``<state_dir>/secrets.json`` that ``vecaf stack up`` writes with mode 0600).

A service is *external* when its URL differs from the one the local stack would serve; ``vecaf stack up``
starts only the services that are not external. For S3, "AWS" (no endpoint URL) is external too: it is
chosen by ``services.s3_endpoint_url: aws``, or when ``services.bucket`` names a bucket and no endpoint is
set anywhere. S3 keys left unset everywhere (external S3) mean boto3's standard credential chain.

Nothing here imports boto3, prefect or mlflow, and nothing talks to a server.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from vecaf.settings import Settings, StackSettings

SECRETS_FILE = "secrets.json"
"""Name of the per-install secrets file under the state dir (mode 0600)."""

LOCAL_REGION = "us-east-1"
AWS_ENDPOINT = "aws"
"""The value of ``services.s3_endpoint_url`` that means AWS's own endpoints."""

_SECRET_KEYS = ("s3_access_key", "s3_secret_key", "prefect_auth_string", "fingerprint_salt")


@dataclass(frozen=True)
class LocalSecrets:
    """The per-install secrets of the local stack (``<state_dir>/secrets.json``, mode 0600).

    Attributes:
        s3_access_key: The S3 access key id of ``rclone serve s3``.
        s3_secret_key: Its secret key.
        prefect_auth_string: The Prefect server's basic-auth string ``user:password``.
        fingerprint_salt: Key of the HMAC that fingerprints a server's settings in its PID record.
    """

    s3_access_key: SecretStr
    s3_secret_key: SecretStr
    prefect_auth_string: SecretStr
    fingerprint_salt: SecretStr


@dataclass(frozen=True)
class ResolvedServices:
    """Addresses and credentials of the services, after settings, environment and local-stack defaults.

    Attributes:
        prefect_api_url: The Prefect API (``.../api``).
        prefect_ui_url: The Prefect UI base URL (the API URL without ``/api``).
        prefect_api_key: A Prefect Cloud API key, or None.
        prefect_auth_string: A Prefect server basic-auth string ``user:password``, or None.
        prefect_external: The Prefect API is not the local stack's.
        mlflow_tracking_uri: The MLflow tracking server (http or https).
        mlflow_username: MLflow basic-auth user, or None.
        mlflow_password: MLflow basic-auth password, or None.
        mlflow_token: MLflow bearer token, or None.
        mlflow_external: The tracking server is not the local stack's.
        s3_endpoint_url: The S3 endpoint; None means AWS.
        s3_region: The S3 region.
        s3_addressing_style: ``auto``, ``path`` or ``virtual``.
        s3_access_key: The access key id; None means boto3's credential chain.
        s3_secret_key: The secret key; None means boto3's credential chain.
        s3_external: The S3 endpoint is not the local stack's.
        bucket: The bucket holding artifacts and run state.
        prefix: Key prefix of the pipeline's objects in the bucket ('' for none, else ending in '/').
    """

    prefect_api_url: str
    prefect_ui_url: str
    prefect_api_key: SecretStr | None
    prefect_auth_string: SecretStr | None
    prefect_external: bool
    mlflow_tracking_uri: str
    mlflow_username: SecretStr | None
    mlflow_password: SecretStr | None
    mlflow_token: SecretStr | None
    mlflow_external: bool
    s3_endpoint_url: str | None
    s3_region: str
    s3_addressing_style: str
    s3_access_key: SecretStr | None
    s3_secret_key: SecretStr | None
    s3_external: bool
    bucket: str
    prefix: str

    def external(self, name: str) -> bool:
        """Whether service ``name`` (``prefect``, ``mlflow`` or ``s3``) is not the local stack's."""
        return {"prefect": self.prefect_external, "mlflow": self.mlflow_external, "s3": self.s3_external}[name]

    def url(self, name: str) -> str:
        """The URL of service ``name`` as shown to a user (``AWS S3`` when S3 is AWS)."""
        if name == "prefect":
            return self.prefect_api_url
        if name == "mlflow":
            return self.mlflow_tracking_uri
        return self.s3_endpoint_url or f"AWS S3 ({self.s3_region})"

    def client_env(self) -> dict[str, str]:
        """The environment a client process needs: Prefect, MLflow (artifacts via S3 too) and boto3.

        Only values that are set appear; credentials left to boto3's chain are not written.
        """
        env = {"PREFECT_API_URL": self.prefect_api_url, "MLFLOW_TRACKING_URI": self.mlflow_tracking_uri}
        optional = {
            "PREFECT_API_KEY": self.prefect_api_key,
            "PREFECT_API_AUTH_STRING": self.prefect_auth_string,
            "MLFLOW_TRACKING_USERNAME": self.mlflow_username,
            "MLFLOW_TRACKING_PASSWORD": self.mlflow_password,
            "MLFLOW_TRACKING_TOKEN": self.mlflow_token,
            "AWS_ACCESS_KEY_ID": self.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret_key,
        }
        if self.s3_endpoint_url:
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint_url
            env["AWS_ENDPOINT_URL_S3"] = self.s3_endpoint_url
        for key, value in optional.items():
            if value is not None:
                env[key] = value.get_secret_value()
        env["AWS_DEFAULT_REGION"] = self.s3_region
        return env

    def s3_client_options(self, *, timeout: float = 10.0) -> dict[str, Any]:
        """Keyword arguments for ``boto3.client("s3", **options)`` (``config`` as a plain dict for
        ``botocore.config.Config(**options["config"])``)."""
        options: dict[str, Any] = {
            "endpoint_url": self.s3_endpoint_url,
            "region_name": self.s3_region,
            "config": {
                "connect_timeout": timeout,
                "read_timeout": timeout,
                "retries": {"max_attempts": 1},
                "s3": {"addressing_style": self.s3_addressing_style},
            },
        }
        if self.s3_access_key is not None and self.s3_secret_key is not None:
            options["aws_access_key_id"] = self.s3_access_key.get_secret_value()
            options["aws_secret_access_key"] = self.s3_secret_key.get_secret_value()
        return options


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def local_urls(stack: StackSettings) -> dict[str, str]:
    """The URLs the local stack serves: ``prefect_api_url``, ``prefect_ui_url``, ``mlflow_url``, ``s3_endpoint_url``."""
    host = _url_host(stack.host)
    return {
        "prefect_api_url": f"http://{host}:{stack.prefect_port}/api",
        "prefect_ui_url": f"http://{host}:{stack.prefect_port}",
        "mlflow_url": f"http://{host}:{stack.mlflow_port}",
        "s3_endpoint_url": f"http://{host}:{stack.s3_port}",
    }


def state_dir(stack: StackSettings) -> Path:
    """The absolute state directory (``stack.state_dir`` resolved against the current directory)."""
    return Path(stack.state_dir).expanduser().resolve()


def read_local_secrets(stack: StackSettings) -> LocalSecrets | None:
    """The secrets file of the local stack, or None when ``vecaf stack up`` has not written it yet.

    Raises:
        ValueError: The file exists but is not a JSON object with the expected keys.
    """
    path = state_dir(stack) / SECRETS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ValueError(f"the secrets file {path} is not valid JSON ({exc}); delete it to generate new keys") from exc
    if not isinstance(data, dict) or any(not isinstance(data.get(k), str) for k in _SECRET_KEYS):
        raise ValueError(f"the secrets file {path} lacks one of {list(_SECRET_KEYS)}; delete it to generate new keys")
    return LocalSecrets(**{k: SecretStr(data[k]) for k in _SECRET_KEYS})


def ensure_local_secrets(stack: StackSettings) -> LocalSecrets:
    """Read the per-install secrets, creating the file (mode 0600, state dir 0700) with random values first.

    Values given in ``stack.*`` settings are not written here: they override the file when resolved.
    """
    root = state_dir(stack)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)
    found = read_local_secrets(stack)
    if found is not None:
        os.chmod(root / SECRETS_FILE, 0o600)
        return found
    values = {
        "s3_access_key": "vecaf-" + secrets.token_hex(6),
        "s3_secret_key": secrets.token_urlsafe(30).replace("-", "A").replace("_", "B"),
        "prefect_auth_string": "vecaf:" + secrets.token_urlsafe(24),
        "fingerprint_salt": secrets.token_hex(32),
    }
    path = root / SECRETS_FILE
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(values, handle, indent=2)
    try:
        os.link(tmp, path)  # atomic, and never replaces a file another `up` wrote meanwhile
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    result = read_local_secrets(stack)
    assert result is not None
    return result


def _env(environ: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = environ.get(name)
        if value:
            return value
    return None


def _secret(value: SecretStr | None) -> SecretStr | None:
    return value if value is not None and value.get_secret_value() else None


def _same_url(a: str | None, b: str) -> bool:
    return a is not None and a.rstrip("/") == b.rstrip("/")


def local_stack_keys(stack: StackSettings) -> tuple[SecretStr | None, SecretStr | None, SecretStr | None]:
    """``(s3_access_key, s3_secret_key, prefect_auth_string)`` of the local stack: ``stack.*`` settings
    first, else the secrets file (None where neither has one)."""
    stored = read_local_secrets(stack)
    access = SecretStr(stack.s3_access_key) if stack.s3_access_key else None
    secret = _secret(stack.s3_secret_key)
    auth = _secret(stack.prefect_auth_string)
    if stored is not None:
        access = access or stored.s3_access_key
        secret = secret or stored.s3_secret_key
        auth = auth or stored.prefect_auth_string
    return access, secret, auth


def resolve_services(settings: Settings, environ: Mapping[str, str] | None = None) -> ResolvedServices:
    """Resolve every service address and credential (see the module docstring for the order).

    Args:
        settings: The settings (``services`` and ``stack`` are read).
        environ: The environment to read the usual client variables from (default ``os.environ``).

    Returns:
        The :class:`ResolvedServices`.

    Raises:
        ValueError: A URL from the environment is not http(s) (the settings check their own values).
    """
    env = os.environ if environ is None else environ
    svc = settings.services
    stack = settings.stack
    local = local_urls(stack)
    access, secret, auth = local_stack_keys(stack)

    prefect_url = (svc.prefect_api_url or _env(env, "PREFECT_API_URL") or local["prefect_api_url"]).rstrip("/")
    prefect_external = not _same_url(prefect_url, local["prefect_api_url"])
    prefect_auth = _secret(svc.prefect_api_auth_string)
    if prefect_auth is None and not prefect_external:
        prefect_auth = auth
    if prefect_auth is None and _env(env, "PREFECT_API_AUTH_STRING"):
        prefect_auth = SecretStr(env["PREFECT_API_AUTH_STRING"])
    prefect_key = _secret(svc.prefect_api_key) or _as_secret(_env(env, "PREFECT_API_KEY"))
    ui = prefect_url[: -len("/api")] if prefect_url.endswith("/api") else prefect_url

    mlflow_uri = (svc.mlflow_tracking_uri or _env(env, "MLFLOW_TRACKING_URI") or local["mlflow_url"]).rstrip("/")
    _check_http("MLFLOW_TRACKING_URI", mlflow_uri)
    _check_http("PREFECT_API_URL", prefect_url)

    endpoint: str | None
    if svc.s3_endpoint_url == AWS_ENDPOINT:
        endpoint = None
    else:
        endpoint = svc.s3_endpoint_url or _env(env, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        if endpoint is None and not svc.bucket:
            endpoint = local["s3_endpoint_url"]
    if endpoint is not None:
        endpoint = endpoint.rstrip("/")
        _check_http("AWS_ENDPOINT_URL_S3", endpoint)
    s3_local = _same_url(endpoint, local["s3_endpoint_url"])
    key_id = _secret(svc.s3_access_key)
    key = _secret(svc.s3_secret_key)
    if key_id is None and key is None and s3_local:
        key_id, key = access, secret
    if key_id is None and key is None:
        key_id = _as_secret(_env(env, "AWS_ACCESS_KEY_ID"))
        key = _as_secret(_env(env, "AWS_SECRET_ACCESS_KEY"))
    region = svc.s3_region or _env(env, "AWS_REGION", "AWS_DEFAULT_REGION") or LOCAL_REGION
    style = svc.s3_addressing_style or ("path" if endpoint is not None else "auto")
    prefix = svc.prefix.strip("/")
    return ResolvedServices(
        prefect_api_url=prefect_url,
        prefect_ui_url=ui,
        prefect_api_key=prefect_key,
        prefect_auth_string=prefect_auth,
        prefect_external=prefect_external,
        mlflow_tracking_uri=mlflow_uri,
        mlflow_username=_secret(svc.mlflow_username) or _as_secret(_env(env, "MLFLOW_TRACKING_USERNAME")),
        mlflow_password=_secret(svc.mlflow_password) or _as_secret(_env(env, "MLFLOW_TRACKING_PASSWORD")),
        mlflow_token=_secret(svc.mlflow_token) or _as_secret(_env(env, "MLFLOW_TRACKING_TOKEN")),
        mlflow_external=not _same_url(mlflow_uri, local["mlflow_url"]),
        s3_endpoint_url=endpoint,
        s3_region=region,
        s3_addressing_style=style,
        s3_access_key=key_id,
        s3_secret_key=key,
        s3_external=not s3_local,
        bucket=svc.bucket or stack.bucket,
        prefix=f"{prefix}/" if prefix else "",
    )


def _as_secret(value: str | None) -> SecretStr | None:
    return SecretStr(value) if value else None


def _check_http(name: str, url: str) -> None:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{name} must be an http:// or https:// URL, got {url!r}")


def prefect_api_url(settings: Settings) -> str:
    """The Prefect API URL the pipeline talks to (settings, then ``PREFECT_API_URL``, then the local stack)."""
    return resolve_services(settings).prefect_api_url
