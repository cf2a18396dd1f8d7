"""Cross-attentive Embedding Augmentation (CEA, Sec. 3.2, Eq. 8-10) and OOD caption steering (Sec. 3.3).

Eq. 8 (attention over the K rows given):   alpha_i = exp(||e_i - t_i||^2) / sum_j exp(||e_j - t_j||^2)
Eq. 9 (augmentation):                      e_i^aug = e_i - eta * alpha_i * (e_i - t_i)
Eq. 10 (forward mixing):                   f(e_i) -> f((1 - lam_bw) e_i^aug + lam_bw e_i)

``augment`` is Eq. 8-9 exactly, over the rows it is given. For back-propagation alpha and t are
constants (Sec. 3.2): with torch inputs the result carries a gradient to ``e`` only,
d e^aug_i / d e_i = (1 - eta alpha_i) I, and ``mix`` (Eq. 10) keeps that.

Text and image spaces differ (e.g. a 384-d MiniLM caption embedding and a 1280-d EfficientNet feature):
``fit_projection`` fits a ridge regression text -> image on the pool (closed form, with intercept, on
L2-normalised rows) and ``TextProjection`` applies it; only spaces that are already aligned (CLIP image and
text towers) may skip it.

For selection over a pool of N rows (``pool_augment``) the softmax of Eq. 8 runs over the N rows, so each
alpha_i is O(1/N) and a fixed eta would make CEA vanish as the pool grows. The selection path therefore
calls Eq. 8-9 with the step eta * N: an average-attention sample moves a fraction eta of the way to its
text embedding whatever N is, and samples whose image and text disagree more move further.

OOD steering (Sec. 3.3): ``steer_captions`` appends a domain prompt such as "It's a snowy day!" to every
caption before text encoding; fit the projection on the un-steered captions so the prompt's direction
is carried into the image space instead of being absorbed by the intercept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_MIB = 1 << 20


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _as_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


def _pair(image: Any, text: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
    is_numpy = not isinstance(image, torch.Tensor)
    e = _as_tensor(image)
    t = _as_tensor(text)
    if not e.is_floating_point():
        e = e.double()
    for name, value in (("image_embeddings", e), ("text_embeddings", t)):
        if value.ndim != 2 or value.shape[0] == 0 or value.shape[1] == 0:
            raise ValueError(f"{name} must be a non-empty 2-D (K, D) array, got shape {tuple(value.shape)}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} contains NaN or inf values")
    if e.shape != t.shape:
        raise ValueError(
            f"image_embeddings {tuple(e.shape)} and text_embeddings {tuple(t.shape)} must have the same shape; "
            "map text into the image space first (vecaf.cea.fit_projection)"
        )
    return e, t.to(device=e.device, dtype=e.dtype), is_numpy


def _check_eta(eta: Any) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(float(eta)):
        raise ValueError(f"eta must be a finite number, got {eta!r}")
    return float(eta)


def attention(image_embeddings: Any, text_embeddings: Any) -> np.ndarray | torch.Tensor:
    """Eq. 8: alpha_i = softmax_i(||e_i - t_i||^2) over the K rows given (no gradient).

    Args:
        image_embeddings: (K, D) e.
        text_embeddings: (K, D) t, in the same space as e.

    Returns:
        (K,) alpha, summing to 1 (numpy for numpy input, a detached tensor for torch input).
    """
    e, t, is_numpy = _pair(image_embeddings, text_embeddings)
    alpha = torch.softmax(((e.detach() - t.detach()) ** 2).sum(dim=1), dim=0)
    return alpha.numpy() if is_numpy else alpha


def augment(image_embeddings: Any, text_embeddings: Any, *, eta: float) -> tuple[Any, Any]:
    """Eq. 8-9: e^aug_i = e_i - eta * alpha_i * (e_i - t_i), alpha = softmax over the K rows of ||e_i - t_i||^2.

    Args:
        image_embeddings: (K, D) e (numpy or torch).
        text_embeddings: (K, D) t in the same space (project first when it is not).
        eta: the fixed step size.

    Returns:
        (e_aug, alpha): (K, D) and (K,), numpy for numpy input. With torch input, e_aug is
        differentiable in e only: alpha and t are held constant (Sec. 3.2).
    """
    eta = _check_eta(eta)
    e, t, is_numpy = _pair(image_embeddings, text_embeddings)
    t = t.detach()
    alpha = torch.softmax(((e.detach() - t) ** 2).sum(dim=1), dim=0)
    e_aug = e - eta * alpha[:, None] * (e - t)
    if is_numpy:
        return e_aug.numpy(), alpha.numpy()
    return e_aug, alpha


def mix(image_embeddings: Any, augmented: Any, lam_bw: float) -> Any:
    """Eq. 10: (1 - lam_bw) * e_aug + lam_bw * e, the input the head sees; lam_bw = 1 disables CEA.

    ``augmented`` comes from ``augment``, so no gradient reaches alpha or t through it.

    Args:
        image_embeddings: (K, D) e.
        augmented: (K, D) e_aug.
        lam_bw: the balancing weight, in [0, 1].

    Returns:
        (K, D) mixed embeddings, numpy or torch like the inputs.
    """
    if isinstance(lam_bw, bool) or not isinstance(lam_bw, (int, float)) or not 0.0 <= float(lam_bw) <= 1.0:
        raise ValueError(f"lam_bw must be a number in [0, 1], got {lam_bw!r}")
    if tuple(image_embeddings.shape) != tuple(augmented.shape):
        raise ValueError(
            f"image_embeddings {tuple(image_embeddings.shape)} and augmented {tuple(augmented.shape)} differ in shape"
        )
    lam_bw = float(lam_bw)
    return (1.0 - lam_bw) * augmented + lam_bw * image_embeddings


@dataclass
class TextProjection:
    """A ridge map from text space to image space: P(t) = unit((unit(t) - t_mean) W + e_mean).

    Attributes:
        weight: (Dt, D) W.
        text_mean: (Dt,) mean of the unit text rows it was fitted on.
        image_mean: (D,) mean of the unit image rows it was fitted on.
    """

    weight: torch.Tensor
    text_mean: torch.Tensor
    image_mean: torch.Tensor

    @property
    def text_dim(self) -> int:
        return self.weight.shape[0]

    @property
    def image_dim(self) -> int:
        return self.weight.shape[1]

    def __call__(self, text: Any) -> Any:
        """Map (N, Dt) text embeddings to unit (N, D) vectors in image space (numpy or torch like the input)."""
        is_numpy = not isinstance(text, torch.Tensor)
        t = torch.as_tensor(np.asarray(text) if is_numpy else text)
        if t.ndim != 2 or t.shape[1] != self.text_dim:
            raise ValueError(f"text must be (N, {self.text_dim}) for this projection, got shape {tuple(t.shape)}")
        w = self.weight.to(device=t.device)
        out = _unit((_unit(t.to(w.dtype)) - self.text_mean.to(t.device)) @ w + self.image_mean.to(t.device))
        out = out.to(torch.float32)
        return out.numpy() if is_numpy else out


def fit_projection(
    text_embeddings: Any, image_embeddings: Any, *, ridge: float = 1e-2, block_bytes: int = 256 * _MIB
) -> TextProjection:
    """Closed-form ridge regression from text to image space on paired pool rows (with intercept).

    W = (Tc^T Tc + r I)^{-1} Tc^T Ec on L2-normalised rows centred by their means, r = ridge * tr(Tc^T Tc) / Dt
    (the ridge is relative to the mean eigenvalue, so it does not depend on N). Sums are accumulated in
    float64 over row blocks.

    Args:
        text_embeddings: (N, Dt) caption embeddings (un-steered captions for OOD steering).
        image_embeddings: (N, D) image embeddings of the same samples.
        ridge: relative ridge strength (> 0).
        block_bytes: rows are processed in blocks of about this many bytes.

    Returns:
        The fitted ``TextProjection``.
    """
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not float(ridge) > 0:
        raise ValueError(f"ridge must be a positive number, got {ridge!r}")
    t_all = _as_tensor(text_embeddings)
    e_all = _as_tensor(image_embeddings)
    if t_all.ndim != 2 or e_all.ndim != 2 or t_all.shape[0] == 0:
        raise ValueError(
            "text_embeddings and image_embeddings must be non-empty 2-D arrays, "
            f"got {tuple(t_all.shape)} and {tuple(e_all.shape)}"
        )
    if t_all.shape[0] != e_all.shape[0]:
        raise ValueError(f"text_embeddings has {t_all.shape[0]} rows but image_embeddings has {e_all.shape[0]}")
    n, dt = t_all.shape
    d = e_all.shape[1]
    device = e_all.device
    tt = torch.zeros((dt, dt), dtype=torch.float64, device=device)
    te = torch.zeros((dt, d), dtype=torch.float64, device=device)
    t_sum = torch.zeros(dt, dtype=torch.float64, device=device)
    e_sum = torch.zeros(d, dtype=torch.float64, device=device)
    rows = max(1, int(block_bytes) // (8 * (dt + d)))
    for start in range(0, n, rows):
        tb = _unit(t_all[start : start + rows].to(device=device, dtype=torch.float64))
        eb = _unit(e_all[start : start + rows].to(dtype=torch.float64))
        tt += tb.T @ tb
        te += tb.T @ eb
        t_sum += tb.sum(dim=0)
        e_sum += eb.sum(dim=0)
    t_mean, e_mean = t_sum / n, e_sum / n
    tt_c = tt - n * torch.outer(t_mean, t_mean)
    te_c = te - n * torch.outer(t_mean, e_mean)
    strength = float(ridge) * max(float(torch.trace(tt_c)) / dt, 1e-12)
    weight = torch.linalg.solve(tt_c + strength * torch.eye(dt, dtype=torch.float64, device=device), te_c)
    return TextProjection(weight=weight, text_mean=t_mean, image_mean=e_mean)


def pool_augment(
    image_unit: torch.Tensor,
    text: torch.Tensor,
    *,
    eta: float,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    inverse_norms: torch.Tensor | None = None,
    block_bytes: int = 256 * _MIB,
) -> torch.Tensor:
    """Eq. 8-9 over all N pool rows with step eta * N (see the module docstring), in row blocks.

    Equal to ``augment(image_unit, transform(text), eta=eta * N)[0]``, without holding the projected
    text for the whole pool.

    Args:
        image_unit: (N, D) unit image embeddings (the compute device's copy), or raw rows with
            ``inverse_norms``.
        text: (N, Dt) text embeddings.
        eta: the pool-normalised step.
        transform: maps a block of text rows to unit image-space rows (a ``TextProjection``, or
            normalisation for aligned spaces).
        inverse_norms: (N,) 1 / ||e_i||: each raw row is scaled to unit norm as its block is read, so
            the pool needs no normalised copy.
        block_bytes: rows are processed in blocks of about this many bytes.

    Returns:
        (N, D) float32 augmented embeddings.
    """
    eta = _check_eta(eta)
    transform = transform if transform is not None else _unit
    n, d = image_unit.shape
    rows = max(1, int(block_bytes) // (4 * (d + text.shape[1])))

    def projected(start: int) -> torch.Tensor:
        block = text[start : start + rows].to(device=image_unit.device, dtype=torch.float32)
        return transform(block).to(dtype=torch.float32)

    def image(start: int) -> torch.Tensor:
        block = image_unit[start : start + rows]
        return block if inverse_norms is None else block * inverse_norms[start : start + rows, None]

    dist = torch.empty(n, dtype=torch.float64, device=image_unit.device)
    for start in range(0, n, rows):
        dist[start : start + rows] = ((image(start) - projected(start)) ** 2).sum(dim=1)
    scaled_alpha = torch.exp(dist - torch.logsumexp(dist, dim=0) + math.log(n)).to(torch.float32)
    out = torch.empty(image_unit.shape, dtype=torch.float32, device=image_unit.device)
    for start in range(0, n, rows):
        e = image(start)
        out[start : start + rows] = e - eta * scaled_alpha[start : start + rows, None] * (e - projected(start))
    return out


def steer_captions(captions: Sequence[str], prompt: str | None) -> list[str]:
    """Append an OOD domain prompt to every caption (Sec. 3.3), e.g. "a photo of a sneaker. It's a snowy day!".

    Args:
        captions: the captions, one per image.
        prompt: the domain phrase; None or "" leaves the captions as they are.

    Returns:
        The steered captions (a new list).
    """
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise ValueError("captions must be a sequence of strings (one per image)")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if prompt is None or not prompt.strip():
        return list(captions)
    steered = []
    for caption in captions:
        text = caption.rstrip()
        if text and text[-1] not in ".!?":
            text += "."
        steered.append(f"{text} {prompt.strip()}".strip())
    return steered
