"""Baseline strategies: ``random``, ``topk_loss`` and ``coreset`` (k-center greedy).

- random: a seeded permutation of the samples not in ``exclude``; the first K.
- topk_loss: the K largest losses not in ``exclude`` (the lam = 0 sanity check of Sec. 3.1); ties are
  broken by a seeded random order, so equal losses give a deterministic, seed-dependent choice.
- coreset: k-center greedy (Sener & Savarese, 2018) on L2 distances between the embeddings as given:
  each step takes the sample farthest from every centre so far. Samples in ``exclude`` are the
  already-labelled centres; with no ``exclude`` the first centre is a seeded random sample. Distances
  are kept as one (N,) vector, updated one centre at a time in N-blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vecaf.selection.ods import DEFAULT_BLOCK_BYTES, rows_per_block
from vecaf.selection.registry import SelectionMethod, register_method


def resolve(device: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU (``vecaf.settings.resolve_device``)."""
    from vecaf.settings import resolve_device

    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be a string such as 'auto', 'cpu' or 'cuda', got {device!r}")
    return torch.device(resolve_device(str(device)))


def check_block_bytes(block_bytes: int) -> None:
    if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes < 1 << 16:
        raise ValueError(f"block_bytes must be an integer >= 65536, got {block_bytes!r}")


def allowed_mask(n: int, exclude: np.ndarray) -> np.ndarray:
    mask = np.ones(n, dtype=bool)
    mask[exclude] = False
    return mask


@register_method("random")
@dataclass
class RandomSelection(SelectionMethod):
    """Uniform random sampling without replacement (seeded)."""

    def select(
        self,
        embeddings: torch.Tensor,
        budget: int,
        *,
        losses: torch.Tensor | None,
        text_embeddings: torch.Tensor | None,
        exclude: np.ndarray,
        seed: int,
    ) -> np.ndarray:
        candidates = np.flatnonzero(allowed_mask(embeddings.shape[0], exclude))
        rng = np.random.default_rng(seed)
        return rng.permutation(candidates)[:budget].astype(np.int64)


def largest_scores(scores: np.ndarray, budget: int, exclude: np.ndarray, seed: int) -> np.ndarray:
    """The ``budget`` allowed indices with the largest ``scores``, ties in a seeded random order."""
    tie_break = np.random.default_rng(seed).random(scores.shape[0])
    order = np.lexsort((tie_break, -scores))
    order = order[allowed_mask(scores.shape[0], exclude)[order]]
    return order[:budget].astype(np.int64)


@register_method("topk_loss")
@dataclass
class TopKLoss(SelectionMethod):
    """The K samples with the largest losses (ties in a seeded random order)."""

    requires_losses = True

    def select(
        self,
        embeddings: torch.Tensor,
        budget: int,
        *,
        losses: torch.Tensor | None,
        text_embeddings: torch.Tensor | None,
        exclude: np.ndarray,
        seed: int,
    ) -> np.ndarray:
        return largest_scores(losses.cpu().numpy().astype(np.float64), budget, exclude, seed)


@register_method("coreset")
@dataclass
class CoreSet(SelectionMethod):
    """k-center greedy on L2 distances (Sener & Savarese).

    Attributes:
        device: "auto" (CUDA when present), "cpu", "cuda", ...
        block_bytes: the size cap of one block of rows.
    """

    device: str = "auto"
    block_bytes: int = DEFAULT_BLOCK_BYTES

    def __post_init__(self) -> None:
        check_block_bytes(self.block_bytes)

    def select(
        self,
        embeddings: torch.Tensor,
        budget: int,
        *,
        losses: torch.Tensor | None,
        text_embeddings: torch.Tensor | None,
        exclude: np.ndarray,
        seed: int,
    ) -> np.ndarray:
        device = resolve(self.device)
        x = embeddings.to(device=device, dtype=torch.float32)
        n = x.shape[0]
        sq = (x * x).sum(dim=1)
        min_dist = torch.full((n,), float("inf"), device=device)
        if exclude.size:
            centres = x[torch.as_tensor(exclude, device=device)]
            rows = rows_per_block(centres.shape[0], self.block_bytes)
            for start in range(0, n, rows):
                block = x[start : start + rows]
                dist = sq[start : start + rows, None] - 2 * block @ centres.T + (centres * centres).sum(dim=1)[None]
                min_dist[start : start + rows] = dist.clamp_min_(0).min(dim=1).values
        blocked = torch.as_tensor(~allowed_mask(n, exclude), device=device)
        if exclude.size:
            first = int(torch.argmax(min_dist.masked_fill(blocked, -1.0)))
        else:
            first = int(np.random.default_rng(seed).integers(n))
        chosen = [first]
        for _ in range(budget - 1):
            centre = x[chosen[-1]]
            dist = (sq - 2 * (x @ centre) + sq[chosen[-1]]).clamp_min_(0)
            torch.minimum(min_dist, dist, out=min_dist)
            min_dist[chosen[-1]] = -1.0
            min_dist.masked_fill_(blocked, -1.0)
            chosen.append(int(torch.argmax(min_dist)))
        return np.asarray(chosen, dtype=np.int64)
