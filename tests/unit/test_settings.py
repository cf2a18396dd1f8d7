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
    assert "vecaf-secret-key" not in text
    assert "seed: 5" in text


def test_resolve_device():
    import torch

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
