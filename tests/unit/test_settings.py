"""The one settings object: defaults, YAML file, env vars, precedence and bad values."""

import pytest
from pydantic import ValidationError

from vecaf.settings import Settings, dump_settings, load_settings, resolve_device


def test_defaults_are_the_embedded_models():
    s = Settings()
    assert s.models.pvm == "efficientnet_lite0"
    assert s.models.text_encoder == "all-MiniLM-L6-v2"
    assert s.models.captioner == "imagenet-labels"
    assert s.data.dataset == "fashion-mnist"
    assert (s.stack.prefect_port, s.stack.mlflow_port, s.stack.s3_port) == (4200, 5000, 9000)
    assert s.stack.host == "127.0.0.1"


def test_yaml_then_env_then_kwargs(tmp_path, monkeypatch):
    cfg = tmp_path / "vecaf.yaml"
    cfg.write_text("seed: 7\nmodels:\n  pvm: resnet18\n  batch_size: 16\nstack:\n  mlflow_port: 5111\n")
    s = load_settings(cfg)
    assert (s.seed, s.models.pvm, s.models.batch_size, s.stack.mlflow_port) == (7, "resnet18", 16, 5111)

    monkeypatch.setenv("VECAF_MODELS__PVM", "vit_small_patch16_224")
    monkeypatch.setenv("VECAF_SEED", "3")
    s = load_settings(cfg)
    assert (s.seed, s.models.pvm, s.models.batch_size) == (3, "vit_small_patch16_224", 16)

    s = load_settings(cfg, seed=11)
    assert s.seed == 11


def test_config_env_var_names_the_yaml(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  dataset: digits\n")
    monkeypatch.setenv("VECAF_CONFIG", str(cfg))
    assert Settings().data.dataset == "digits"


def test_missing_yaml_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


def test_yaml_must_be_a_mapping(tmp_path):
    cfg = tmp_path / "list.yaml"
    cfg.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_settings(cfg)


@pytest.mark.parametrize("field, value", [("models", {"batch_size": 0}), ("stack", {"s3_port": 70000})])
def test_out_of_range_values_are_rejected(field, value):
    with pytest.raises(ValidationError):
        Settings(**{field: value})


def test_unknown_key_is_rejected(tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("sed: 1\n")
    with pytest.raises(ValidationError, match="sed"):
        load_settings(cfg)


def test_dump_masks_the_secret_and_round_trips(tmp_path):
    s = Settings(seed=5)
    text = dump_settings(s)
    text = dump_settings(Settings(seed=5, stack={"s3_secret_key": "hidden-value-42"}))
    assert "hidden-value-42" not in text
    assert "seed: 5" in text


def test_resolve_device():
    import torch

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


# --- services: settings, then the clients' usual variables, then the local stack ------------------------

from pydantic import SecretStr  # noqa: E402

from vecaf.services import ensure_local_secrets, read_local_secrets, resolve_services  # noqa: E402
from vecaf.settings import ServiceSettings, StackSettings  # noqa: E402


def test_services_default_to_the_local_stack(tmp_path):
    stack = StackSettings(state_dir=tmp_path / "state", prefect_port=4311, mlflow_port=5311, s3_port=9311)
    r = resolve_services(Settings(stack=stack), environ={})
    assert r.prefect_api_url == "http://127.0.0.1:4311/api" and r.prefect_ui_url == "http://127.0.0.1:4311"
    assert r.mlflow_tracking_uri == "http://127.0.0.1:5311"
    assert r.s3_endpoint_url == "http://127.0.0.1:9311" and r.s3_addressing_style == "path"
    assert not (r.prefect_external or r.mlflow_external or r.s3_external)
    assert (r.s3_access_key, r.prefect_auth_string) == (None, None)  # no secrets file yet, nothing fixed


def test_usual_env_names_are_used_when_services_are_unset(tmp_path):
    environ = {
        "PREFECT_API_URL": "https://prefect.example.org/api",
        "PREFECT_API_AUTH_STRING": "ops:pw",
        "MLFLOW_TRACKING_URI": "https://mlflow.example.org",
        "MLFLOW_TRACKING_TOKEN": "tok",
        "AWS_ENDPOINT_URL": "https://minio.example.org",
        "AWS_ACCESS_KEY_ID": "AKID",
        "AWS_SECRET_ACCESS_KEY": "SECRET",
        "AWS_REGION": "eu-west-1",
    }
    r = resolve_services(Settings(stack=StackSettings(state_dir=tmp_path)), environ=environ)
    assert (r.prefect_api_url, r.prefect_external) == ("https://prefect.example.org/api", True)
    assert r.prefect_auth_string.get_secret_value() == "ops:pw"
    assert (r.mlflow_tracking_uri, r.mlflow_external) == ("https://mlflow.example.org", True)
    assert r.mlflow_token.get_secret_value() == "tok"
    assert (r.s3_endpoint_url, r.s3_region, r.s3_external) == ("https://minio.example.org", "eu-west-1", True)
    assert r.s3_access_key.get_secret_value() == "AKID"
    env = r.client_env()
    assert env["AWS_ENDPOINT_URL_S3"] == env["MLFLOW_S3_ENDPOINT_URL"] == "https://minio.example.org"
    assert env["PREFECT_API_AUTH_STRING"] == "ops:pw" and env["MLFLOW_TRACKING_TOKEN"] == "tok"


def test_services_settings_win_over_env(tmp_path, monkeypatch):
    monkeypatch.setenv("VECAF_SERVICES__MLFLOW_TRACKING_URI", "https://tracking.example.org/")
    monkeypatch.setenv("VECAF_SERVICES__S3_ENDPOINT_URL", "aws")
    monkeypatch.setenv("VECAF_SERVICES__BUCKET", "team-bucket")
    monkeypatch.setenv("VECAF_SERVICES__PREFIX", "/vecaf/prod/")
    s = Settings(stack=StackSettings(state_dir=tmp_path))
    r = resolve_services(s, environ={"MLFLOW_TRACKING_URI": "http://other:5000", "AWS_ENDPOINT_URL_S3": "http://x:1"})
    assert r.mlflow_tracking_uri == "https://tracking.example.org"
    assert (r.s3_endpoint_url, r.s3_external, r.s3_addressing_style) == (None, True, "auto")
    assert (r.bucket, r.prefix) == ("team-bucket", "vecaf/prod/")
    assert r.s3_client_options()["endpoint_url"] is None
    assert "aws_access_key_id" not in r.s3_client_options()  # the standard AWS credential chain


def test_a_bucket_without_endpoint_means_aws(tmp_path):
    s = Settings(stack=StackSettings(state_dir=tmp_path), services=ServiceSettings(bucket="team-bucket"))
    r = resolve_services(s, environ={})
    assert (r.s3_endpoint_url, r.s3_external) == (None, True)


def test_env_url_equal_to_the_local_stack_is_not_external(tmp_path):
    stack = StackSettings(state_dir=tmp_path, prefect_port=4312)
    r = resolve_services(Settings(stack=stack), environ={"PREFECT_API_URL": "http://127.0.0.1:4312/api/"})
    assert not r.prefect_external


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("mlflow_tracking_uri", "ftp://m:21", "services.mlflow_tracking_uri must be an http"),
        ("prefect_api_url", "prefect.example.org/api", "services.prefect_api_url must be an http"),
        ("s3_endpoint_url", "s3://bucket", "services.s3_endpoint_url must be an http"),
        ("s3_addressing_style", "sideways", "s3_addressing_style"),
        ("s3_access_key", "AKID", "must be set together"),
    ],
)
def test_bad_service_settings_are_refused(field, value, match):
    with pytest.raises(ValidationError, match=match):
        ServiceSettings(**{field: value})


def test_bad_url_in_the_usual_env_names_is_refused(tmp_path):
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI must be an http"):
        resolve_services(Settings(stack=StackSettings(state_dir=tmp_path)), environ={"MLFLOW_TRACKING_URI": "file:///x"})


def test_secrets_file_is_random_private_and_overridden_by_settings(tmp_path):
    stack = StackSettings(state_dir=tmp_path / "state")
    first = ensure_local_secrets(stack)
    assert (tmp_path / "state" / "secrets.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert ensure_local_secrets(stack) == first == read_local_secrets(stack)
    other = ensure_local_secrets(StackSettings(state_dir=tmp_path / "other"))
    assert other.s3_secret_key != first.s3_secret_key and other.prefect_auth_string != first.prefect_auth_string
    r = resolve_services(Settings(stack=stack), environ={})
    assert r.s3_secret_key == first.s3_secret_key and r.prefect_auth_string == first.prefect_auth_string
    given = stack.model_copy(update={"s3_access_key": "mine", "s3_secret_key": SecretStr("my-secret")})
    r = resolve_services(Settings(stack=given), environ={"AWS_ACCESS_KEY_ID": "ambient", "AWS_SECRET_ACCESS_KEY": "x"})
    assert (r.s3_access_key.get_secret_value(), r.s3_secret_key.get_secret_value()) == ("mine", "my-secret")


def test_no_fixed_default_secret_in_the_settings():
    s = Settings()
    assert s.stack.s3_secret_key is None and s.stack.s3_access_key is None and s.stack.prefect_auth_string is None


def test_misspelt_services_key_is_refused(monkeypatch):
    monkeypatch.setenv("VECAF_SERVICES__PREFECT_URL", "https://prefect.example.org/api")
    with pytest.raises(ValidationError, match="prefect_url"):
        Settings()
