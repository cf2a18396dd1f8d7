"""The network the engine trains, its classification head, and the frozen-backbone feature mode.

The engine sees a classifier as two parts (Sec. 3.2): the embedding e = f(x) (timm's
``forward_head(forward_features(x), pre_logits=True)``) and the head z = W e + b. Splitting them lets the
forward pass apply CEA (Eq. 10) between the two:

    z = W [ (1 - lam_bw) e_aug + lam_bw e ] + b,    e_aug = e - s (e - t),  s = eta alpha     (Eq. 9-10)

``full`` mode trains f and W together; ``head`` mode computes e once with the frozen backbone (eval mode,
so no dropout and fixed batch-norm statistics) and trains only W, b on the cached features.

A model whose head does not output the dataset's C classes (an ImageNet head for Fashion-MNIST, or no
head at all) gets a fresh C-way linear head, initialised from a seeded generator with PyTorch's default
Linear distribution U(-1/sqrt(D), 1/sqrt(D)), and the engine says so.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from vecaf.train.rows import as_rows

__all__ = ["Network", "extract_features", "init_linear_", "make_head", "prepare_backbone"]


def _timm_like(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("forward_features", "forward_head", "get_classifier", "reset_classifier"))


def _head_outputs(model: nn.Module) -> int | None:
    classifier = model.get_classifier()
    if isinstance(classifier, nn.Identity):
        return None
    count = getattr(model, "num_classes", None)
    if isinstance(count, int) and count > 0:
        return count
    out = getattr(classifier, "out_features", None)
    return int(out) if isinstance(out, int) else None


def init_linear_(layer: nn.Linear, *, seed: int) -> nn.Linear:
    """Re-initialise a linear layer in place from a seeded generator.

    W_ij, b_i ~ U(-1/sqrt(D), 1/sqrt(D)) with D = in_features (PyTorch's default Linear distribution).
    """
    gen = torch.Generator().manual_seed(int(seed))
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        layer.weight.copy_(torch.empty(layer.weight.shape).uniform_(-bound, bound, generator=gen))
        if layer.bias is not None:
            layer.bias.copy_(torch.empty(layer.bias.shape).uniform_(-bound, bound, generator=gen))
    return layer


def prepare_backbone(model: nn.Module, num_classes: int, *, seed: int) -> tuple[nn.Module, str | None]:
    """A copy of a timm-style classifier whose head outputs ``num_classes`` logits.

    Args:
        model: a timm model (``forward_features``, ``forward_head``, ``get_classifier``, ``reset_classifier``).
        num_classes: C, the dataset's class count.
        seed: seed of the new head's initialisation.

    Returns:
        (copy, note): the copy (the caller's model is not changed) and a sentence saying the head was
        replaced, or None when the head already had C outputs.
    """
    if not _timm_like(model):
        raise ValueError(
            f"{type(model).__name__} is not a timm-style classifier: full mode needs forward_features, "
            "forward_head(pre_logits=True), get_classifier and reset_classifier (any timm model has them)"
        )
    net = copy.deepcopy(model)
    outputs = _head_outputs(net)
    if outputs == num_classes:
        return net, None
    before = "no classifier head" if outputs is None else f"a {outputs}-way classifier head"
    net.reset_classifier(num_classes)
    classifier = net.get_classifier()
    if isinstance(classifier, nn.Linear):
        init_linear_(classifier, seed=seed)
    note = (
        f"the model had {before} but the dataset has {num_classes} classes: the head was replaced by a new "
        f"{num_classes}-way linear head (seeded initialisation)"
    )
    return net, note


def make_head(model: nn.Module | None, num_features: int, num_classes: int, *, seed: int) -> tuple[nn.Linear, str | None]:
    """The linear head that ``head`` mode trains: a copy of the model's own when it fits, else a new one.

    Args:
        model: the timm-style model whose classifier to start from, or None for a new head.
        num_features: D, the embedding size.
        num_classes: C.
        seed: seed of a new head's initialisation.

    Returns:
        (head, note): a ``nn.Linear(D, C)`` and a sentence when a model's head was replaced (else None).
    """
    if model is not None and _timm_like(model):
        classifier = model.get_classifier()
        fits = (
            isinstance(classifier, nn.Linear)
            and classifier.in_features == num_features
            and classifier.out_features == num_classes
        )
        if fits:
            return copy.deepcopy(classifier), None
        outputs = _head_outputs(model)
        before = "no classifier head" if outputs is None else f"a {outputs}-way classifier head"
        head = init_linear_(nn.Linear(num_features, num_classes), seed=seed)
        return head, (
            f"the model had {before} but the dataset has {num_classes} classes: a new {num_classes}-way "
            "linear head is trained on the frozen features (seeded initialisation)"
        )
    return init_linear_(nn.Linear(num_features, num_classes), seed=seed), None


def install_head(model: nn.Module, head: nn.Linear) -> nn.Module:
    """A copy of ``model`` whose classifier is ``head`` (so the head-mode result classifies images)."""
    net = copy.deepcopy(model)
    if _head_outputs(net) != head.out_features or not isinstance(net.get_classifier(), nn.Linear):
        net.reset_classifier(head.out_features)
    net.get_classifier().load_state_dict(head.state_dict())
    return net


class Network(nn.Module):
    """Embedding, CEA mixing (Eq. 10) and head in one module, so DDP and ``torch.compile`` see one forward.

    Args:
        backbone: the timm-style model (full mode; its own classifier is the head), or None (head mode:
            the inputs are already embeddings e). Taken over, not copied: it is put in channels-last memory
            layout whatever layout it came in, since the float kernels, so a seed's result, depend on the
            layout (``vecaf.models.embed`` leaves a model channels-last), and channels-last ran the full-mode
            benchmark's run 1.8x faster on a 2-core AMD EPYC (145 against 266 s; ``docs/engine.md``).
        head: the linear head (head mode), or None (full mode).
        mixer: ``mixer(e, t, s) -> e_mix``, the CEA forward mixing (Eq. 9-10) with the per-sample step
            s = eta alpha and t constant.
    """

    def __init__(
        self,
        backbone: nn.Module | None,
        head: nn.Module | None,
        mixer: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if (backbone is None) == (head is None):
            raise ValueError("Network needs exactly one of backbone (full mode) and head (head mode)")
        self.backbone = None if backbone is None else backbone.to(memory_format=torch.channels_last)
        self.head = head
        self.mixer = mixer

    def classifier(self) -> nn.Module:
        """The layer mapping e to logits."""
        return self.head if self.head is not None else self.backbone.get_classifier()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """e = f(x), the pre-logits embedding (the identity in head mode)."""
        if self.backbone is None:
            return x
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor | None = None,
        step: torch.Tensor | None = None,
        features: bool = False,
    ) -> torch.Tensor:
        """Logits W e_mix + b; e_mix = e without text, Eq. 10 with it.

        Args:
            x: images (full mode) or embeddings (head mode, or ``features=True``).
            text: (B, D) text embeddings t in the image space (constants), or None for no CEA.
            step: (B,) per-sample step s = eta alpha of Eq. 9 (constants; 0 for a sample without text).
            features: x already holds embeddings (skip the backbone).
        """
        e = x if features else self.embed(x)
        if text is not None:
            if self.mixer is None:
                raise ValueError("text embeddings given but the network has no CEA mixer")
            e = self.mixer(e, text.to(e.dtype), step.to(e.dtype))
        return self.classifier()(e)


def extract_features(
    model: nn.Module,
    inputs: torch.Tensor | Any,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    transform: Callable[[Any], torch.Tensor] | None = None,
) -> np.ndarray:
    """Pre-logits embeddings e = f(x) of a frozen timm-style backbone (eval mode), in input order.

    Args:
        model: the backbone (timm-style).
        inputs: normalised images (N, 3, H, W), or a dataset whose items are ``(id, image, label)`` with
            ``transform`` turning each image into a (3, H, W) tensor.
        batch_size: images per forward pass.
        device: where to run.
        transform: image -> tensor, for a dataset of raw images.

    Returns:
        (N, D) float32 array.
    """
    if not _timm_like(model):
        raise ValueError(f"{type(model).__name__} is not a timm-style model (forward_features / forward_head)")
    rows = as_rows(inputs, transform=transform, name="inputs")
    dev = torch.device(device)
    was_training = model.training
    model.to(dev).eval()
    out: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                x = rows.take(np.arange(start, min(start + batch_size, len(rows)))).to(dev)
                e = model.forward_head(model.forward_features(x), pre_logits=True)
                out.append(e.float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
