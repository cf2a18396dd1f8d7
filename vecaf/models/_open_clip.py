"""Naming and loading open_clip models for the text encoder and the captioner.

A name ``open_clip:<spec>`` reads as:

- ``open_clip:<model>/<pretrained tag>`` e.g. ``open_clip:ViT-B-32/openai``: open_clip's own weights,
  downloaded, so only with ``allow_hub=True``;
- ``open_clip:<model>/<checkpoint file>`` e.g. ``open_clip:ViT-B-32//data/clip.pt``: a built-in
  architecture with a local state_dict (the path is everything after the first "/");
- ``open_clip:local-dir:<folder>`` or ``open_clip:<folder>``: a folder holding ``open_clip_config.json``
  (``{"model_cfg": ..., "preprocess_cfg": ...}``) and the weights (``open_clip_model.safetensors``,
  ``open_clip_pytorch_model.bin``...), the layout open_clip saves for the hub;
- ``open_clip:hf-hub:<org>/<repo>``: a hub repository (``allow_hub=True``).

The tokenizer is the one open_clip pairs with the model (the bundled CLIP BPE unless the config names a
transformers tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "open_clip:"


@dataclass(frozen=True)
class OpenClipSpec:
    """The parsed parts of an ``open_clip:`` name."""

    model_name: str
    pretrained: str | None
    needs_hub: bool


def parse_spec(name: str) -> OpenClipSpec:
    """Split ``open_clip:<spec>`` into open_clip's ``model_name`` and ``pretrained`` arguments.

    Raises:
        ValueError: an empty spec, an unknown architecture, or a built-in architecture with no weights.
    """
    import open_clip

    body = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    if not body:
        raise ValueError(
            f"{name!r}: expected open_clip:<model>/<pretrained tag or checkpoint file> or open_clip:<folder>"
        )
    if body.startswith("hf-hub:"):
        return OpenClipSpec(body, None, True)
    if body.startswith("local-dir:") or Path(body).is_dir():
        folder = Path(body.removeprefix("local-dir:"))
        _check_folder(name, folder)
        return OpenClipSpec(f"local-dir:{folder}", None, False)
    model_name, _, pretrained = body.partition("/")
    known = open_clip.list_models()
    if model_name not in known:
        raise ValueError(
            f"unknown open_clip model {model_name!r} in {name!r}; known: {', '.join(known)} "
            "(or open_clip:<folder with open_clip_config.json>)"
        )
    if not pretrained:
        tags = [t for m, t in open_clip.list_pretrained() if m == model_name]
        raise ValueError(
            f"{name!r} names no weights: use open_clip:{model_name}/<checkpoint file> or one of its pretrained "
            f"tags {tags} (downloaded, needs allow_hub=True)"
        )
    if Path(pretrained).is_file():
        return OpenClipSpec(model_name, pretrained, False)
    if Path(pretrained).suffix in {".pt", ".pth", ".bin", ".safetensors"} or "/" in pretrained:
        raise FileNotFoundError(f"{name!r}: checkpoint file {pretrained} does not exist")
    return OpenClipSpec(model_name, pretrained, True)


def _check_folder(name: str, folder: Path) -> None:
    if not (folder / "open_clip_config.json").is_file():
        raise FileNotFoundError(f"{name!r}: folder {folder} holds no open_clip_config.json")
    if not any(any(folder.glob(f"*{ext}")) for ext in (".safetensors", ".bin", ".pth")):
        raise FileNotFoundError(f"{name!r}: folder {folder} holds no weights (*.safetensors, *.bin, *.pth)")


def create(name: str, *, allow_hub: bool) -> tuple[Any, Any, Any]:
    """(model in eval mode on CPU, image preprocess, tokenizer) for an ``open_clip:`` name.

    Raises:
        ValueError: the weights need a download and ``allow_hub`` is False, or they do not fit the model.
    """
    import open_clip

    spec = parse_spec(name)
    if spec.needs_hub and not allow_hub:
        raise ValueError(f"{name!r} downloads its weights from a hub; pass allow_hub=True to allow that")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(spec.model_name, pretrained=spec.pretrained)
    except (RuntimeError, KeyError) as exc:
        raise ValueError(f"cannot load {name!r}: {exc}") from exc
    tokenizer = open_clip.get_tokenizer(spec.model_name)
    model.eval()
    return model, preprocess, tokenizer
