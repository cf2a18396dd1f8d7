"""A finetuned classifier stored without pickle: ``config.json`` (the architecture) + ``model.safetensors``.

    from vecaf.models.classifier import classifier_config, save_classifier, load_classifier
    config = classifier_config(pvm, model, class_names=names, mode="head", image_size=64)
    save_classifier(model, config, "out/")            # out/config.json, out/model.safetensors
    model, config = load_classifier("out/")           # rebuilt with timm, weights checked key by key

Loading never unpickles anything: the configuration is JSON, the weights are a safetensors file (a header
of names, dtypes and shapes, then raw tensor bytes), and the network is rebuilt by
``timm.create_model(<arch>, pretrained=False, num_classes=C)`` from the configuration, so a stored file
can describe tensors but never run code. The weights must name exactly the rebuilt network's tensors,
each with its shape; the first difference is named in the error.

The configuration (format ``vecaf-classifier``, version 1):

- ``arch``: the timm architecture (``PVM.arch``, e.g. ``tf_efficientnet_lite0``); ``pvm``: the PVM name;
- ``num_classes`` C and ``class_names`` (C names, in label order); ``mode`` ('head' or 'full');
- ``head``: ``{"in_features": D, "out_features": C}`` of the linear classifier;
- ``input_size`` ``[3, S, S]`` and ``data_config`` (timm preprocessing: mean, std, interpolation, crop);
- ``weights``: the weights file's name and ``weights_sha256``, its SHA-256 (checked at load).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CLASSIFIER_FORMAT",
    "CLASSIFIER_FORMAT_VERSION",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "build_classifier",
    "check_classifier_config",
    "classifier_config",
    "load_classifier",
    "save_classifier",
]

CLASSIFIER_FORMAT = "vecaf-classifier"
CLASSIFIER_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_MODES = ("head", "full")


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def classifier_config(
    pvm: Any,
    model: nn.Module,
    *,
    class_names: Sequence[str],
    mode: str,
    image_size: int | None = None,
) -> dict[str, Any]:
    """The JSON configuration of a classifier finetuned from ``pvm`` (``vecaf.models.PVM``).

    Args:
        pvm: the PVM the model was finetuned from (its ``arch``, ``name`` and preprocessing).
        model: the trained timm classifier (backbone + C-way linear head).
        class_names: the C class names, in label order.
        mode: 'head' (frozen backbone, trained head) or 'full'.
        image_size: the input side S the model was trained at (None: the PVM's own).

    Returns:
        The configuration (JSON-ready) that :func:`build_classifier` rebuilds the network from.
    """
    import timm

    arch = getattr(pvm, "arch", "") or ""
    if not arch or not timm.is_model(arch):
        raise ValueError(f"PVM {getattr(pvm, 'name', pvm)!r} has no timm architecture ({arch!r}): it cannot be stored")
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, nn.Linear):
        kind = type(classifier).__name__
        raise ValueError(f"the model's classifier is {kind}, not a linear head: it cannot be stored")
    names = [str(n) for n in class_names]
    if classifier.out_features != len(names):
        raise ValueError(f"the head has {classifier.out_features} outputs but {len(names)} class names were given")
    data_config = _plain(dict(pvm.transform(image_size=image_size).data_config))
    config = {
        "format": CLASSIFIER_FORMAT,
        "format_version": CLASSIFIER_FORMAT_VERSION,
        "arch": arch,
        "pvm": str(pvm.name),
        "num_classes": len(names),
        "class_names": names,
        "mode": mode,
        "head": {"in_features": int(classifier.in_features), "out_features": int(classifier.out_features)},
        "input_size": list(data_config["input_size"]),
        "data_config": data_config,
        "weights": WEIGHTS_FILE,
    }
    check_classifier_config(config)
    return config


def check_classifier_config(config: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the field unless ``config`` is a valid version-1 classifier configuration."""
    if not isinstance(config, Mapping):
        raise ValueError(f"a classifier configuration is a JSON object, got {type(config).__name__}")
    if config.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"format must be {CLASSIFIER_FORMAT!r}, got {config.get('format')!r}")
    if config.get("format_version") != CLASSIFIER_FORMAT_VERSION:
        raise ValueError(f"format_version must be {CLASSIFIER_FORMAT_VERSION}, got {config.get('format_version')!r}")
    arch = config.get("arch")
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"arch must be a timm architecture name, got {arch!r}")
    c = config.get("num_classes")
    if isinstance(c, bool) or not isinstance(c, int) or c <= 0:
        raise ValueError(f"num_classes must be a positive integer, got {c!r}")
    names = config.get("class_names")
    if not isinstance(names, list) or len(names) != c or not all(isinstance(n, str) for n in names):
        raise ValueError(f"class_names must be a list of {c} strings, got {names!r}")
    if config.get("mode") not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {config.get('mode')!r}")
    head = config.get("head")
    if not isinstance(head, Mapping) or head.get("out_features") != c or not isinstance(head.get("in_features"), int):
        raise ValueError(f"head must be {{'in_features': D, 'out_features': {c}}}, got {head!r}")
    size = config.get("input_size")
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size)):
        raise ValueError(f"input_size must be [3, S, S], got {size!r}")
    if not isinstance(config.get("data_config"), Mapping):
        raise ValueError("data_config (the preprocessing) is missing")
    if config.get("weights") != WEIGHTS_FILE:
        raise ValueError(f"weights must be {WEIGHTS_FILE!r}, got {config.get('weights')!r}")


def build_classifier(config: Mapping[str, Any]) -> nn.Module:
    """The untrained network a configuration describes: ``timm.create_model(arch, num_classes=C)``, eval mode."""
    import timm

    check_classifier_config(config)
    if not timm.is_model(config["arch"]):
        raise ValueError(f"arch {config['arch']!r} is not a timm architecture of this timm ({timm.__version__})")
    model = timm.create_model(config["arch"], pretrained=False, num_classes=int(config["num_classes"]))
    classifier = model.get_classifier()
    head = config["head"]
    if not isinstance(classifier, nn.Linear) or classifier.in_features != head["in_features"]:
        raise ValueError(f"timm's {config['arch']} has classifier {classifier!r}, the configuration says {dict(head)}")
    return model.eval()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_classifier(model: nn.Module, config: Mapping[str, Any], folder: str | Path) -> dict[str, Any]:
    """Write ``config.json`` and ``model.safetensors`` into ``folder`` (created).

    The model is checked against the configuration first (:func:`build_classifier` must give the same tensor
    names and shapes), so what is saved can be loaded back.

    Returns:
        The configuration as written (with ``weights_sha256``).
    """
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    _check_state(state, build_classifier(config).state_dict(), what="the model to save")
    weights = out / WEIGHTS_FILE
    save_file(state, str(weights), metadata={"format": CLASSIFIER_FORMAT})
    written = {**dict(config), "weights_sha256": _sha256(weights)}
    (out / CONFIG_FILE).write_text(json.dumps(written, indent=1, sort_keys=True))
    return written


def _check_state(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *, what: str) -> None:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{what} does not fit the configured network: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)})"
        )
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise ValueError(f"{what}: tensor {key} has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}")


def load_classifier(folder: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a classifier saved by :func:`save_classifier` (no pickle; strict names, shapes and checksum).

    Args:
        folder: a folder holding ``config.json`` and ``model.safetensors``.

    Returns:
        (model on the CPU in eval mode, configuration).

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: an invalid configuration, a checksum that differs, or weights that do not fit (named).
    """
    from safetensors.torch import load_file

    root = Path(folder)
    config_path, weights_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not a {CLASSIFIER_FORMAT} folder")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc
    check_classifier_config(config)
    expected_sha = config.get("weights_sha256")
    if expected_sha is not None and _sha256(weights_path) != expected_sha:
        raise ValueError(f"{weights_path} does not match the SHA-256 recorded in {config_path}")
    model = build_classifier(config)
    state = load_file(str(weights_path), device="cpu")
    _check_state(state, model.state_dict(), what=str(weights_path))
    model.load_state_dict(state, strict=True)
    return model.eval(), config
