"""Finetuning objectives as per-sample losses L_i, the input of ODS (Eq. 3, Eq. 7).

- ``cross_entropy``: L_i = -log softmax(z_i)[y_i] (the default objective).
- ``one_vs_all``: the binary objective of Table 3 for a target class c: positive when y_i = c. With
  multi-class logits the binary logit is s_i = z_ic - log sum_{j != c} exp(z_ij), so sigmoid(s_i) is the
  softmax probability of c and L_i = -log sigmoid(s_i) for positives, -log(1 - sigmoid(s_i)) for negatives.
  With one logit per sample (a binary head) s_i is that logit.
- ``weighted_cross_entropy``: L_i = w_{y_i} * CE_i, with given class weights or "balanced" ones
  w_c = N / (C * n_c) (n_c: samples of class c in ``labels``).

``expected_losses`` gives the label-free counterpart the ``vecaf`` selection weighs by default: the
objective's expectation under the model's own prediction, L_bar_i = sum_c p_ic l(z_i, c) with p_i = softmax(z_i)
(for cross-entropy the predictive entropy H(p_i)).

Numpy in gives numpy out (float64); torch in gives torch out, differentiable in the logits, so the
finetuning engine can train on the same objective it selects with.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

OBJECTIVES = ("cross_entropy", "one_vs_all", "weighted_cross_entropy")
SELECTION_LOSSES = ("expected", "observed")


def _inputs(logits: Any, labels: Any, *, allow_1d: bool = False) -> tuple[torch.Tensor, torch.Tensor, bool]:
    is_numpy = not isinstance(logits, torch.Tensor)
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64) if is_numpy else logits)
    if not z.is_floating_point():
        z = z.double()
    y = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    valid_rank = z.ndim == 2 or (allow_1d and z.ndim == 1)
    if not valid_rank or z.shape[0] == 0 or (z.ndim == 2 and z.shape[1] == 0):
        expected = "(N, C) or (N,)" if allow_1d else "(N, C)"
        raise ValueError(f"logits must be a non-empty {expected} array, got shape {tuple(z.shape)}")
    if z.ndim == 2 and z.shape[1] < 2 and not allow_1d:
        raise ValueError(f"logits need at least 2 classes, got shape {tuple(z.shape)}")
    if not torch.isfinite(z).all():
        raise ValueError("logits contain NaN or inf values")
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D (N,) array, got shape {tuple(y.shape)}")
    if y.shape[0] != z.shape[0]:
        raise ValueError(f"labels has {y.shape[0]} entries but logits have {z.shape[0]} rows")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    y = y.to(device=z.device, dtype=torch.long)
    if z.ndim == 2 and z.shape[1] >= 2 and ((y < 0) | (y >= z.shape[1])).any():
        raise ValueError(f"labels must lie in [0, {z.shape[1]}), got values from {int(y.min())} to {int(y.max())}")
    return z, y, is_numpy


def _out(loss: torch.Tensor, is_numpy: bool) -> Any:
    return loss.detach().cpu().numpy().astype(np.float64) if is_numpy else loss


def cross_entropy(logits: Any, labels: Any) -> Any:
    """Per-sample cross-entropy L_i = -log softmax(z_i)[y_i].

    Args:
        logits: (N, C) class scores z.
        labels: (N,) integer labels y in [0, C).

    Returns:
        (N,) losses (numpy float64 for numpy input, a tensor for torch input).
    """
    z, y, is_numpy = _inputs(logits, labels)
    return _out(F.cross_entropy(z, y, reduction="none"), is_numpy)


def one_vs_all(logits: Any, labels: Any, *, target: int) -> Any:
    """Binary loss for a target class (Table 3): positives y_i = target, every other class negative.

    Args:
        logits: (N, C) class scores, or (N,) / (N, 1) binary logits of a one-output head.
        labels: (N,) integer labels.
        target: the positive class.

    Returns:
        (N,) losses -log p_i(target) for positives and -log(1 - p_i(target)) for negatives.
    """
    z, y, is_numpy = _inputs(logits, labels, allow_1d=True)
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise ValueError(f"target must be an integer class index, got {target!r}")
    target = int(target)
    if z.ndim == 1 or z.shape[1] == 1:
        score = z.reshape(-1)
        if target < 0:
            raise ValueError(f"target must be a non-negative class index, got {target}")
    else:
        if not 0 <= target < z.shape[1]:
            raise ValueError(f"target must lie in [0, {z.shape[1]}), got {target}")
        others = torch.cat([z[:, :target], z[:, target + 1 :]], dim=1)
        score = z[:, target] - torch.logsumexp(others, dim=1)
    positive = (y == target).to(score.dtype)
    return _out(F.binary_cross_entropy_with_logits(score, positive, reduction="none"), is_numpy)


def class_weights_balanced(labels: Any, num_classes: int) -> np.ndarray:
    """w_c = N / (C * n_c) (0 for a class absent from ``labels``)."""
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    weights = np.zeros(num_classes)
    present = counts > 0
    weights[present] = y.shape[0] / (num_classes * counts[present])
    return weights


def weighted_cross_entropy(logits: Any, labels: Any, *, class_weights: Any = "balanced") -> Any:
    """Class-weighted per-sample cross-entropy L_i = w_{y_i} * CE_i.

    Args:
        logits: (N, C) class scores.
        labels: (N,) integer labels.
        class_weights: (C,) non-negative finite weights, or "balanced" (N / (C n_c)).

    Returns:
        (N,) losses.
    """
    z, y, is_numpy = _inputs(logits, labels)
    c = z.shape[1]
    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise ValueError(f"class_weights must be 'balanced' or a (C,) array, got {class_weights!r}")
        weights = class_weights_balanced(y.cpu(), c)
    else:
        weights = np.asarray(
            class_weights.detach().cpu() if isinstance(class_weights, torch.Tensor) else class_weights, dtype=np.float64
        )
        if weights.shape != (c,):
            raise ValueError(f"class_weights must have shape ({c},), got {weights.shape}")
        if not np.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("class_weights must be finite and non-negative")
    w = torch.as_tensor(weights, dtype=z.dtype, device=z.device)
    return _out(w[y] * F.cross_entropy(z, y, reduction="none"), is_numpy)


def per_sample_losses(
    logits: Any,
    labels: Any,
    *,
    objective: str = "cross_entropy",
    target: int | None = None,
    class_weights: Any = "balanced",
) -> Any:
    """The ``losses`` vector for ``vecaf.select`` from logits and labels, by objective name.

    Args:
        logits: (N, C) class scores (or (N,) binary logits for ``one_vs_all``).
        labels: (N,) integer labels.
        objective: one of ``OBJECTIVES``.
        target: the positive class, required by ``one_vs_all``.
        class_weights: used by ``weighted_cross_entropy``.

    Returns:
        (N,) non-negative losses.
    """
    if objective == "cross_entropy":
        return cross_entropy(logits, labels)
    if objective == "one_vs_all":
        if target is None:
            raise ValueError("objective 'one_vs_all' needs target (the positive class)")
        return one_vs_all(logits, labels, target=target)
    if objective == "weighted_cross_entropy":
        return weighted_cross_entropy(logits, labels, class_weights=class_weights)
    raise ValueError(f"unknown objective {objective!r}; choose one of {list(OBJECTIVES)}")


def expected_losses(logits: Any, loss: Any = None) -> Any:
    """Per-sample expected loss under the model's own prediction: L_bar_i = sum_c p_ic l(z_i, c), p_i = softmax(z_i).

    The label-free form of the objective, which the ``vecaf`` selection weighs by default in place of the
    observed L_i = l(z_i, y_i) of Eq. 3 (``docs/fidelity.md``): it is large where the model is unsure, and
    bounded by that unsureness, so a sample the model gets confidently wrong (an ambiguous or mislabelled
    image, whose observed loss grows with the logits' scale) does not take the selection's weight.

    Args:
        logits: (N, C) class scores z.
        loss: the objective, a callable (logits (N, C), labels (N,)) -> (N,) losses, e.g. ``cross_entropy``
            or a ``functools.partial`` of ``one_vs_all``; None is cross-entropy, computed in closed form
            as the predictive entropy H(p_i) = -sum_c p_ic log p_ic. A callable is evaluated once per class.

    Returns:
        (N,) non-negative expected losses (numpy float64 for numpy input, a tensor for torch input).
    """
    shape = np.shape(logits)
    z, _, is_numpy = _inputs(logits, np.zeros(shape[0] if shape else 0, dtype=np.int64))
    log_p = torch.log_softmax(z, dim=1)
    p = log_p.exp()
    if loss is None:
        return _out(-(p * log_p).sum(dim=1), is_numpy)
    total = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    for c in range(z.shape[1]):
        labels = torch.full((z.shape[0],), c, dtype=torch.long, device=z.device)
        per_class = torch.as_tensor(loss(z, labels), dtype=z.dtype, device=z.device).reshape(-1)
        total += p[:, c] * per_class
    return _out(total, is_numpy)
