"""Uncertainty sampling under the current model: ``entropy`` and ``margin``.

The baselines a practitioner reaches for first (Settles, "Active Learning Literature Survey", 2009,
Sec. 3.1): score every pool sample by how unsure the current classifier is about it and take the K
most uncertain ones not in ``exclude``.

- entropy: the K largest predictive entropies H_i = -sum_c p_ic log p_ic (0 log 0 = 0).
- margin: the K smallest margins p_i(1) - p_i(2) between the two most probable classes.

Both read ``probs``, the (N, C) class probabilities of the current model (softmax of its logits), passed
to ``vecaf.select(..., probs=...)``; ``vecaf.train.finetune`` computes them in its pool pass. Ties are
broken by a seeded random order, as for ``topk_loss``, so equal scores give a deterministic,
seed-dependent choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vecaf.selection.baselines import largest_scores
from vecaf.selection.registry import SelectionMethod, register_method


def entropy_scores(probs: torch.Tensor) -> np.ndarray:
    """(N,) predictive entropies -sum_c p log p of (N, C) probabilities (float64; 0 log 0 = 0)."""
    p = probs.to(torch.float64)
    terms = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    return (-terms.sum(dim=1)).cpu().numpy()


def margin_scores(probs: torch.Tensor) -> np.ndarray:
    """(N,) margins p(1) - p(2) between the two most probable classes (float64)."""
    top2 = torch.topk(probs.to(torch.float64), 2, dim=1).values
    return (top2[:, 0] - top2[:, 1]).cpu().numpy()


@register_method("entropy")
@dataclass
class EntropySampling(SelectionMethod):
    """The K samples of largest predictive entropy under the current model (ties in a seeded order)."""

    requires_probs = True

    def select(
        self,
        embeddings: torch.Tensor,
        budget: int,
        *,
        losses: torch.Tensor | None,
        text_embeddings: torch.Tensor | None,
        exclude: np.ndarray,
        seed: int,
        probs: torch.Tensor,
    ) -> np.ndarray:
        return largest_scores(entropy_scores(probs), budget, exclude, seed)


@register_method("margin")
@dataclass
class MarginSampling(SelectionMethod):
    """The K samples of smallest top-1 minus top-2 probability margin (ties in a seeded order)."""

    requires_probs = True

    def select(
        self,
        embeddings: torch.Tensor,
        budget: int,
        *,
        losses: torch.Tensor | None,
        text_embeddings: torch.Tensor | None,
        exclude: np.ndarray,
        seed: int,
        probs: torch.Tensor,
    ) -> np.ndarray:
        return largest_scores(-margin_scores(probs), budget, exclude, seed)
