"""Captioners: images and their class names -> one caption each (the captions behind t_i of CEA, Eq. 8-9).

The paper (Sec. 3.2) prompts a multimodal LLM with "Please describe the image within one sentence. The
description contains the keyword {class_name}." and, for out-of-distribution targets (Sec. 3.3), edits the
captions with a domain phrase such as "It's a snowy day!".

Names (:func:`list_captioners`):

- ``imagenet-labels`` (default, no download): the caption is built from the PVM's own ImageNet-1k top-k
  predictions, "a photo of a {class_name}, resembling a {p_1}, a {p_2} or a {p_3}", where p_1..p_k are the
  short names of the k largest logits (duplicate names collapsed). It carries per-image semantics from a
  real pretrained network while needing nothing beyond the PVM.
- ``hf:<folder or hub id>``: a transformers image-to-text model (BLIP, GIT, LLaVA-style, VisionEncoderDecoder)
  loaded with ``AutoModelForImageTextToText``, greedy (or beam) decoding. ``prompt_mode``: "chat" wraps the
  paper's prompt in the processor's chat template (instruction models, LLaVA-style); "prefix" passes the
  prompt as a text prefix the caption continues (BLIP, GIT; e.g. prompt="a photo of a {class_name},");
  "none" captions unconditionally (in "prefix" mode the caption is the prefix followed by its continuation,
  in "chat" mode only the answer); "auto" is "chat" when the processor has a chat template, else "none"
  (plain captioning models are not instruction-tuned and would continue the instruction as text).
- ``open_clip:<CoCa spec>``: an open_clip CoCa model (``coca_ViT-B-32``...), greedy decoding from its
  start token with its multimodal decoder, written here because open_clip's own ``generate`` needs
  transformers' removed ``BeamSearchScorer``.

Every caption contains its class name: when a model's text lacks it (case-insensitive), the caption becomes
"a photo of a {class_name}: {text}". An OOD suffix (e.g. "It's a snowy day!") is appended as a new sentence
(the caption is closed with a period first unless it already ends in . ! or ?).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vecaf.models import _open_clip
from vecaf.models._runtime import batches, check_batch_size, checked_texts, device_of, inference
from vecaf.models.pvm import PVM, embed, load_pvm, to_rgb

PAPER_PROMPT = "Please describe the image within one sentence. The description contains the keyword {class_name}."
DEFAULT_CAPTIONER = "imagenet-labels"
HF_ALIASES = {
    "blip-base": "hf:Salesforce/blip-image-captioning-base",
    "blip-large": "hf:Salesforce/blip-image-captioning-large",
    "git-base": "hf:microsoft/git-base-coco",
    "llava-1.5-7b": "hf:llava-hf/llava-1.5-7b-hf",
}
COCA_ALIASES = {"coca": "open_clip:coca_ViT-B-32/mscoco_finetuned_laion2b_s13b_b90k"}
_PROMPT_MODES = ("auto", "chat", "prefix", "none")


def list_captioners() -> list[str]:
    """Known captioner names; ``hf:<folder or hub id>`` and ``open_clip:<CoCa spec>`` name any other."""
    return [DEFAULT_CAPTIONER, *HF_ALIASES, *COCA_ALIASES, "hf:<folder or hub id>", "open_clip:<CoCa model>/<weights>"]


def article(word: str) -> str:
    """'an' before a vowel letter, else 'a'."""
    return "an" if word[:1].lower() in "aeiou" and word[:1] else "a"


def with_article(word: str) -> str:
    """'a cat', 'an espresso'."""
    return f"{article(word)} {word}"


def join_alternatives(words: Sequence[str]) -> str:
    """'a X', 'a X or a Y', 'a X, a Y or a Z' (articles added)."""
    items = [with_article(w) for w in words]
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} or {items[-1]}"


def ensure_keyword(caption: str, class_name: str) -> str:
    """The caption if it contains ``class_name`` (case-insensitive), else "a photo of a {class_name}: {caption}"."""
    caption = " ".join(caption.split())
    if class_name.lower() in caption.lower():
        return caption
    return f"a photo of {with_article(class_name)}: {caption}" if caption else f"a photo of {with_article(class_name)}"


def append_sentence(caption: str, sentence: str) -> str:
    """caption + " " + sentence, closing the caption with a period first unless it ends in . ! or ?."""
    caption = caption.rstrip()
    end = "" if not caption or caption.endswith((".", "!", "?")) else "."
    return f"{caption}{end} {sentence}".strip()


class Captioner(abc.ABC):
    """Images (+ class names) -> captions, each containing its class name, OOD suffix appended.

    Attributes:
        name: the name it was loaded under.
        ood_suffix: text appended to every caption (None: nothing).
    """

    name: str
    ood_suffix: str | None

    def caption(
        self, images: Sequence[Any], class_names: Sequence[str], *, batch_size: int = 32, progress: bool = False
    ) -> list[str]:
        """One caption per image, in order.

        Args:
            images: PIL images (any mode) or uint8 arrays.
            class_names: the class name of each image (same length).
            batch_size: images per forward pass.
            progress: show a progress bar.

        Returns:
            N strings; caption i contains ``class_names[i]`` and ends with the OOD suffix if one is set.

        Raises:
            ValueError: the lengths differ, a class name is not a non-empty string.
        """
        check_batch_size(batch_size)
        names = checked_texts(class_names, "class_names")
        images = list(images)
        if len(images) != len(names):
            raise ValueError(f"got {len(images)} images but {len(names)} class names; give one class name per image")
        for i, c in enumerate(names):
            if not c.strip():
                raise ValueError(f"class_names[{i}] is empty")
        if not images:
            return []
        raw = self._generate([to_rgb(im) for im in images], names, batch_size=batch_size, progress=progress)
        out = [ensure_keyword(text, c) for text, c in zip(raw, names)]
        if self.ood_suffix:
            out = [append_sentence(text, self.ood_suffix) for text in out]
        return out

    @abc.abstractmethod
    def _generate(self, images: list[Any], class_names: list[str], *, batch_size: int, progress: bool) -> list[str]:
        """Raw model text for each image."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, ood_suffix={self.ood_suffix!r})"


class ImageNetLabelCaptioner(Captioner):
    """"a photo of a {class_name}, resembling a {p_1}, a {p_2} or a {p_3}" from the PVM's ImageNet top-k."""

    def __init__(
        self, pvm: PVM, *, top_k: int, ood_suffix: str | None, device: str, image_size: int | None, name: str
    ) -> None:
        if pvm.class_names is None:
            raise ValueError(
                f"captioner {name!r} needs a PVM with an ImageNet-1k head; {pvm.name!r} has {pvm.num_classes} "
                "classes without names"
            )
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= len(pvm.class_names):
            raise ValueError(f"top_k must be an integer in 1..{len(pvm.class_names)}, got {top_k!r}")
        self.name = name
        self.pvm = pvm
        self.top_k = top_k
        self.ood_suffix = ood_suffix
        self.device = device
        self.image_size = image_size

    def top_predictions(self, images: list[Any], *, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """(N, k) class indices of the k largest logits per image, largest first (ties: lower index)."""
        _, logits = embed(
            self.pvm, images, batch_size=batch_size, device=self.device, image_size=self.image_size,
            progress=progress, return_logits=True,
        )  # fmt: skip
        return np.argsort(-logits, axis=1, kind="stable")[:, : self.top_k]

    def _generate(self, images: list[Any], class_names: list[str], *, batch_size: int, progress: bool) -> list[str]:
        names = self.pvm.class_names
        assert names is not None
        out = []
        for row, cls in zip(self.top_predictions(images, batch_size=batch_size, progress=progress), class_names):
            alternatives = list(dict.fromkeys(names[j] for j in row))
            out.append(f"a photo of {with_article(cls)}, resembling {join_alternatives(alternatives)}")
        return out


class TransformersCaptioner(Captioner):
    """A transformers image-to-text model, prompted as ``prompt_mode`` says (see the module docstring)."""

    def __init__(
        self,
        name: str,
        source: str,
        *,
        local: bool,
        device: torch.device,
        ood_suffix: str | None,
        prompt: str,
        prompt_mode: str,
        max_new_tokens: int,
        num_beams: int,
    ) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        kwargs: dict[str, Any] = {"local_files_only": True} if local else {}
        try:
            model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"cannot load image-to-text model {name!r} from {source}: {exc}") from exc
        processor = None
        try:
            candidate = AutoProcessor.from_pretrained(source, **kwargs)
            if hasattr(candidate, "image_processor") and hasattr(candidate, "tokenizer"):
                processor = candidate
        except (OSError, ValueError, KeyError, TypeError):
            processor = None
        if processor is not None:
            self.image_processor, self.tokenizer = processor.image_processor, processor.tokenizer
        else:
            try:
                self.image_processor = AutoImageProcessor.from_pretrained(source, **kwargs)
                self.tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            except (OSError, ValueError, KeyError) as exc:
                raise ValueError(
                    f"{name!r}: no processor, nor an image processor and a tokenizer, in {source}: {exc}"
                ) from exc
        if prompt_mode == "auto":
            prompt_mode = "chat" if processor is not None and getattr(processor, "chat_template", None) else "none"
        if prompt_mode == "chat" and (processor is None or not getattr(processor, "chat_template", None)):
            raise ValueError(f"prompt_mode='chat' but {name!r} has no processor with a chat template")
        if prompt_mode == "prefix" and processor is None:
            raise ValueError(f"prompt_mode='prefix' but {name!r} has no processor taking text and images")
        if prompt_mode in ("chat", "prefix"):
            _check_prompt(prompt)
        self.name = name
        self.device = device
        self.model = model.to(device).eval()
        self.processor = processor
        self.prompt = prompt
        self.prompt_mode = prompt_mode
        self.ood_suffix = ood_suffix
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        if self.tokenizer.pad_token is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if prompt_mode != "none" and not getattr(model.config, "is_encoder_decoder", False):
            self.tokenizer.padding_side = "left"

    def _inputs(self, images: list[Any], class_names: list[str]) -> tuple[dict[str, Any], list[str]]:
        prompts = [self.prompt.format(class_name=c) for c in class_names] if self.prompt_mode != "none" else []
        if self.prompt_mode == "chat":
            texts = [
                self.processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                    add_generation_prompt=True,
                    tokenize=False,
                )
                for p in prompts
            ]
            inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        elif self.prompt_mode == "prefix":
            inputs = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        else:
            inputs = {"pixel_values": self.image_processor(images, return_tensors="pt")["pixel_values"]}
        return dict(inputs), prompts

    def _generate(self, images: list[Any], class_names: list[str], *, batch_size: int, progress: bool) -> list[str]:
        out: list[str] = []
        pairs = list(zip(images, class_names))
        with inference():
            for chunk in batches(pairs, batch_size, progress=progress, desc=f"caption {self.name}"):
                imgs, names = [p[0] for p in chunk], [p[1] for p in chunk]
                inputs, prompts = self._inputs(imgs, names)
                inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
                generated = self.model.generate(
                    **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=self.num_beams
                )
                input_ids = inputs.get("input_ids")
                if (
                    input_ids is not None
                    and generated.shape[1] >= input_ids.shape[1]
                    and torch.equal(generated[:, : input_ids.shape[1]], input_ids)
                ):
                    generated = generated[:, input_ids.shape[1] :]
                texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
                for text, prompt in zip(texts, prompts or [""] * len(texts)):
                    continuation = _strip_prefix(text, prompt)
                    out.append(f"{prompt} {continuation}".strip() if self.prompt_mode == "prefix" else continuation)
        return out


def _strip_prefix(text: str, prompt: str) -> str:
    text = " ".join(text.split())
    prompt = " ".join(prompt.split())
    if prompt and text.lower().startswith(prompt.lower()):
        text = text[len(prompt) :].strip()
    return text


def _check_prompt(prompt: str) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string (it may use {class_name})")
    try:
        prompt.format(class_name="x")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"prompt may only use the field {{class_name}}: {prompt!r} ({exc})") from exc


class CocaCaptioner(Captioner):
    """An open_clip CoCa model: greedy decoding from the start token, at most ``max_new_tokens`` tokens,
    never emitting the start or padding token (as open_clip's own generator)."""

    def __init__(
        self, name: str, *, allow_hub: bool, device: torch.device, ood_suffix: str | None, max_new_tokens: int
    ) -> None:
        import open_clip

        model, preprocess, tokenizer = _open_clip.create(name, allow_hub=allow_hub)
        if not isinstance(model, open_clip.CoCa):
            raise ValueError(
                f"{name!r} is a {type(model).__name__}, not a CoCa model: only CoCa generates captions "
                "(use it as a text encoder instead)"
            )
        self.name = name
        self.device = device
        self.model = model.to(device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.ood_suffix = ood_suffix
        self.sot = int(getattr(tokenizer, "sot_token_id", 49406))
        self.eot = int(getattr(tokenizer, "eot_token_id", 49407))
        self.max_len = max(1, min(max_new_tokens, int(model.context_length) - 1))
        self.banned = sorted({self.sot, int(getattr(model, "pad_id", 0))} - {self.eot})

    def _decode(self, tokens: list[int]) -> str:
        kept = [t for t in tokens if t not in (self.sot, self.eot)]
        text = self.tokenizer.decode(kept) if hasattr(self.tokenizer, "decode") else ""
        return text.replace("<start_of_text>", "").replace("<end_of_text>", "").strip()

    def generate_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Greedy token ids (B, 1 + T) for preprocessed images x (B, 3, H, W): the start token, then at
        each step the argmax of the decoder's next-token logits (start and padding tokens excluded), the
        end token repeated once a row has ended."""
        latent, embs = self.model._encode_image(x)
        tokens = torch.full((len(x), 1), self.sot, dtype=torch.long, device=x.device)
        done = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.max_len):
            out_dict = self.model(x, text=tokens, image_latent=latent, image_embs=embs, output_labels=False)
            scores = out_dict["logits"][:, -1].float()
            scores[:, self.banned] = float("-inf")
            nxt = torch.where(done, torch.full_like(done, self.eot, dtype=torch.long), scores.argmax(dim=-1))
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= nxt == self.eot
            if bool(done.all()):
                break
        return tokens

    def _generate(self, images: list[Any], class_names: list[str], *, batch_size: int, progress: bool) -> list[str]:
        out: list[str] = []
        with inference():
            for chunk in batches(images, batch_size, progress=progress, desc=f"caption {self.name}"):
                x = torch.stack([self.preprocess(im) for im in chunk]).to(self.device)
                for row in self.generate_tokens(x).cpu().tolist():
                    cut = row.index(self.eot) if self.eot in row else len(row)
                    out.append(self._decode(row[:cut]))
        return out


def load_captioner(
    name: str = DEFAULT_CAPTIONER,
    *,
    pvm: PVM | None = None,
    ood_suffix: str | None = None,
    allow_hub: bool = False,
    device: str = "auto",
    top_k: int = 3,
    prompt: str = PAPER_PROMPT,
    prompt_mode: str = "auto",
    max_new_tokens: int = 30,
    num_beams: int = 1,
    image_size: int | None = None,
) -> Captioner:
    """Load a captioner by name.

    Args:
        name: ``imagenet-labels``, ``hf:<folder or hub id>``, ``open_clip:<CoCa spec>`` or an alias
            (:func:`list_captioners`).
        pvm: the PVM whose ImageNet predictions ``imagenet-labels`` uses (None: the default PVM).
        ood_suffix: appended to every caption, e.g. "It's a snowy day!" (Sec. 3.3).
        allow_hub: allow downloading a model named by a hub id or a pretrained tag.
        device: 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'.
        top_k: k, the number of ImageNet predictions named by ``imagenet-labels``.
        prompt: the instruction (chat/prefix modes), with ``{class_name}``; default the paper's.
        prompt_mode: "auto", "chat", "prefix" or "none" (transformers models; see the module docstring).
        max_new_tokens: the longest generated caption, in tokens.
        num_beams: beam width for transformers models (1: greedy).
        image_size: PVM input side for ``imagenet-labels`` (None: the PVM's).

    Returns:
        A :class:`Captioner`.

    Raises:
        ValueError: unknown name (the known ones are listed), a hub model without ``allow_hub``, bad options.
        FileNotFoundError: a named folder or checkpoint does not exist.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"captioner name must be a non-empty string, got {name!r}")
    if ood_suffix is not None and (not isinstance(ood_suffix, str) or not ood_suffix.strip()):
        raise ValueError(f"ood_suffix must be a non-empty string or None, got {ood_suffix!r}")
    if prompt_mode not in _PROMPT_MODES:
        raise ValueError(f"prompt_mode must be one of {_PROMPT_MODES}, got {prompt_mode!r}")
    for arg, value in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    suffix = ood_suffix.strip() if ood_suffix else None
    resolved = HF_ALIASES.get(name, COCA_ALIASES.get(name, name))
    if resolved in (DEFAULT_CAPTIONER, "imagenet"):
        device_of(device)
        return ImageNetLabelCaptioner(
            pvm if pvm is not None else load_pvm(),
            top_k=top_k, ood_suffix=suffix, device=device, image_size=image_size, name=name,
        )  # fmt: skip
    dev = device_of(device)
    if resolved.startswith(_open_clip.PREFIX):
        return CocaCaptioner(
            resolved, allow_hub=allow_hub, device=dev, ood_suffix=suffix, max_new_tokens=max_new_tokens
        )
    if resolved.startswith("hf:"):
        source = resolved[len("hf:") :]
        if not source:
            raise ValueError("'hf:' must be followed by a model folder or a hub id")
        local = Path(source).is_dir()
        if not local:
            if Path(source).is_absolute() or source.startswith("."):
                raise FileNotFoundError(f"captioner folder {source} does not exist")
            if not allow_hub:
                raise ValueError(
                    f"captioner {name!r} is not a local folder and would be downloaded from the hub; pass "
                    "allow_hub=True to allow that, or hf:<folder> with a saved model"
                )
        return TransformersCaptioner(
            name, source, local=local, device=dev, ood_suffix=suffix, prompt=prompt, prompt_mode=prompt_mode,
            max_new_tokens=max_new_tokens, num_beams=num_beams,
        )  # fmt: skip
    raise ValueError(f"unknown captioner {name!r}; known: {', '.join(list_captioners())}")
