"""``vecaf.models.classifier``: a classifier stored as JSON config + safetensors, rebuilt with timm, no pickle."""

from __future__ import annotations

import json

import pytest
import torch

from vecaf.models import load_pvm
from vecaf.models.classifier import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    build_classifier,
    classifier_config,
    load_classifier,
    save_classifier,
)

NAMES = ["zero", "one", "two"]


@pytest.fixture
def trained(tmp_path):
    """A tiny timm classifier (random weights, 3 classes) saved with its configuration."""
    pvm = load_pvm("test_efficientnet", pretrained=False, num_classes=3)
    torch.manual_seed(1)
    with torch.no_grad():
        pvm.model.get_classifier().weight.normal_()
    config = classifier_config(pvm, pvm.model, class_names=NAMES, mode="head", image_size=32)
    save_classifier(pvm.model, config, tmp_path / "model")
    return pvm.model, tmp_path / "model"


def test_round_trip_gives_the_same_logits(trained):
    model, folder = trained
    loaded, config = load_classifier(folder)
    assert config["class_names"] == NAMES and config["input_size"] == [3, 32, 32]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])


def test_weights_are_not_a_pickle(trained):
    _, folder = trained
    head = (folder / WEIGHTS_FILE).read_bytes()[:64]
    assert not head.startswith(b"\x80") and not head.startswith(b"PK")  # neither a pickle nor a torch.save zip
    header_len = int.from_bytes((folder / WEIGHTS_FILE).read_bytes()[:8], "little")
    header = json.loads((folder / WEIGHTS_FILE).read_bytes()[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == "vecaf-classifier"


def test_changed_weights_fail_the_checksum(trained):
    _, folder = trained
    data = bytearray((folder / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (folder / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load_classifier(folder)


def test_weights_of_another_shape_are_refused_by_name(trained, tmp_path):
    model, folder = trained
    config = json.loads((folder / CONFIG_FILE).read_text())
    other = build_classifier({**config, "num_classes": 4, "class_names": NAMES + ["three"],
                              "head": {**config["head"], "out_features": 4}})  # fmt: skip
    with pytest.raises(ValueError, match=r"classifier\.weight has shape \(4, \d+\), expected \(3, \d+\)"):
        save_classifier(other, config, tmp_path / "bad")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("format", "pickle", "format must be"),
        ("num_classes", 0, "num_classes must be a positive integer"),
        ("class_names", ["a"], "class_names must be a list of 3 strings"),
        ("mode", "both", "mode must be one of"),
        ("arch", "not_a_timm_model", "not a timm architecture"),
    ],
)
def test_bad_configuration_is_named(trained, field, value, message):
    _, folder = trained
    config = json.loads((folder / CONFIG_FILE).read_text())
    config[field] = value
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_classifier(folder)
