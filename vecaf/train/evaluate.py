"""Evaluation of a finetuning run: top-1, per-class accuracy, loss and batches-to-accuracy (B2A).

The paper reports top-1 accuracy after a fixed number of training batches (Table 1) and B2A, the number of
training batches a method needs to reach a target top-1 accuracy (Sec. 4.2, Fig. 5: B2A@90 on CIFAR-10,
B2A@65 on Caltech101, B2A@45/50 on ImageNet). Accuracies here are fractions in [0, 1]; B2A is read from the
evaluation curve, so its resolution is the evaluation interval.

    top1      = (1/M) sum_m [argmax_c z_mc == y_m]
    acc_c     = (1/M_c) sum_{m: y_m = c} [argmax z_m == c]      (NaN when class c is absent)
    B2A(a)    = min { b : top1(b) >= a }  over the evaluated batch counts b, None if never reached
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "EvalPoint",
    "batches_to_accuracy",
    "classification_metrics",
    "per_class_accuracy",
    "top1_accuracy",
]


@dataclass
class EvalPoint:
    """One evaluation on the test split.

    Attributes:
        batches: training batches done when it was taken (0 = before training).
        top1: top-1 accuracy in [0, 1].
        loss: mean of the run's objective over the test split.
        loop: index of the loop it belongs to (0-based; -1 before the first loop).
        per_class: per-class accuracy (C,), NaN for a class absent from the test split.
    """

    batches: int
    top1: float
    loss: float
    loop: int = -1
    per_class: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (per-class accuracy as a list with None for absent classes)."""
        out = asdict(self)
        out["per_class"] = _nan_to_none(self.per_class)
        return out


def _nan_to_none(values: np.ndarray | None) -> list[float | None] | None:
    if values is None:
        return None
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, dtype=np.float64)]


def _predictions(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim == 2:
        return scores.argmax(axis=1)
    if scores.ndim == 1:
        return scores.astype(np.int64)
    raise ValueError(f"scores must be logits (M, C) or predicted labels (M,), got shape {scores.shape}")


def top1_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy: the share of rows whose arg-max class is the label.

    Args:
        scores: logits (M, C) or predicted labels (M,).
        labels: true labels (M,).

    Returns:
        (1/M) sum_m [argmax_c z_mc == y_m], a fraction in [0, 1].
    """
    preds = _predictions(scores)
    labels = np.asarray(labels)
    if preds.shape[0] != labels.shape[0]:
        raise ValueError(f"scores have {preds.shape[0]} rows but labels have {labels.shape[0]}")
    if labels.shape[0] == 0:
        raise ValueError("cannot compute an accuracy over an empty test split")
    return float(np.mean(preds == labels))


def per_class_accuracy(scores: np.ndarray, labels: np.ndarray, *, num_classes: int) -> np.ndarray:
    """Accuracy within each true class.

    Args:
        scores: logits (M, C) or predicted labels (M,).
        labels: true labels (M,) in [0, num_classes).
        num_classes: C.

    Returns:
        (C,) array, acc_c = (1/M_c) sum_{m: y_m=c} [pred_m == c]; NaN where M_c = 0.
    """
    preds = _predictions(scores)
    labels = np.asarray(labels, dtype=np.int64)
    if preds.shape[0] != labels.shape[0]:
        raise ValueError(f"scores have {preds.shape[0]} rows but labels have {labels.shape[0]}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    hits = np.bincount(labels[preds == labels], minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)


def classification_metrics(
    logits: np.ndarray, labels: np.ndarray, *, losses: np.ndarray, num_classes: int
) -> dict[str, Any]:
    """Top-1, per-class accuracy and mean loss of one evaluation.

    Args:
        logits: (M, C) model outputs.
        labels: (M,) true labels.
        losses: (M,) per-sample objective values.
        num_classes: C.

    Returns:
        ``{"top1": float, "loss": float, "per_class": (C,) array}``.
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.shape[0] != np.asarray(labels).shape[0]:
        raise ValueError(f"losses have {losses.shape[0]} rows but labels have {np.asarray(labels).shape[0]}")
    return {
        "top1": top1_accuracy(logits, labels),
        "loss": float(losses.mean()),
        "per_class": per_class_accuracy(logits, labels, num_classes=num_classes),
    }


def batches_to_accuracy(
    curve: Iterable[EvalPoint] | Sequence[tuple[int, float] | tuple[int, float, float]], target: float
) -> int | None:
    """B2A: the fewest training batches after which the evaluated top-1 reached ``target``.

    Args:
        curve: evaluation points ``EvalPoint`` or tuples ``(batches, top1[, loss])``, any order.
        target: top-1 accuracy to reach, a fraction in (0, 1].

    Returns:
        min { b : top1(b) >= target }, or None when no evaluation reached it.
    """
    if not 0.0 < float(target) <= 1.0:
        raise ValueError(f"target accuracy must be a fraction in (0, 1], got {target} (use 0.9, not 90)")
    reached = []
    for point in curve:
        batches, top1 = (point.batches, point.top1) if isinstance(point, EvalPoint) else (point[0], point[1])
        if top1 >= target:
            reached.append(int(batches))
    return min(reached) if reached else None
