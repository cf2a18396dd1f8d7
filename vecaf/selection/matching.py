"""Matching centroids to pool samples (Sec. 3.1: "the training data with the closest embedding to each
centroid is selected").

Rule: centroids are visited in order of their best cosine to an available sample (highest first, ties
by centroid index); each takes its nearest sample (cosine) that is neither taken by an earlier centroid
nor in ``exclude``. Every centroid gets a distinct sample, so the result always has K unique indices.

In bounded memory: one pass over the pool in N-blocks keeps, for every centroid, its ``candidates``
nearest available samples. Centroids then take their first untaken candidate; a centroid whose
candidates are all taken triggers one more pass (taken samples masked) for itself and the centroids after
it, so the result is exactly the rule above.
"""

from __future__ import annotations

import numpy as np
import torch

from vecaf.selection.ods import DEFAULT_BLOCK_BYTES, normalize_rows, rows_per_block


def _nearest_available(
    x: torch.Tensor, theta: torch.Tensor, unavailable: torch.Tensor, m: int, block_bytes: int
) -> tuple[np.ndarray, np.ndarray]:
    """For each centroid, its m most similar available samples: (m, R) cosines and indices, best first."""
    r = theta.shape[0]
    rows = rows_per_block(r + x.shape[1], block_bytes)  # the similarity block and the normalised rows together
    best_val = torch.full((0, r), -float("inf"), device=x.device)
    best_idx = torch.zeros((0, r), dtype=torch.long, device=x.device)
    for start in range(0, x.shape[0], rows):
        sims = normalize_rows(x[start : start + rows].float()) @ theta.T
        sims.masked_fill_(unavailable[start : start + rows, None], -float("inf"))
        val, idx = sims.topk(min(m, sims.shape[0]), dim=0)
        val = torch.cat([best_val, val])
        idx = torch.cat([best_idx, idx + start])
        keep_val, keep = val.topk(min(m, val.shape[0]), dim=0)
        best_val, best_idx = keep_val, idx.gather(0, keep)
        del sims  # else the next block's similarities are built while this one is still alive
    return best_val.cpu().numpy(), best_idx.cpu().numpy()


def match_centroids(
    embeddings: torch.Tensor,
    centroids: torch.Tensor,
    *,
    exclude: np.ndarray | None = None,
    candidates: int = 8,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> np.ndarray:
    """Each centroid takes its nearest available sample (order: best cosine first).

    Args:
        embeddings: (N, D) pool embeddings (each block is normalised on the fly).
        centroids: (K, D) centroids.
        exclude: indices no centroid may take.
        candidates: nearest samples kept per centroid in one pass.
        block_bytes: the size cap of one N-block's similarities to the K centroids plus its normalised rows.

    Returns:
        (K,) int64 indices, unique, none in ``exclude``, in centroid order.
    """
    x = embeddings
    theta = normalize_rows(centroids.to(device=x.device, dtype=torch.float32))
    n, k = x.shape[0], theta.shape[0]
    unavailable = torch.zeros(n, dtype=torch.bool, device=x.device)
    if exclude is not None and len(exclude):
        unavailable[torch.as_tensor(exclude, dtype=torch.long, device=x.device)] = True
    available = n - int(unavailable.sum())
    if k > available:
        raise ValueError(f"{k} centroids cannot take distinct samples from {available} available ones")
    taken = unavailable.cpu().numpy().copy()
    result = np.full(k, -1, dtype=np.int64)
    m = max(1, min(int(candidates), available))
    vals, idxs = _nearest_available(x, theta, unavailable, m, block_bytes)
    order = np.lexsort((np.arange(k), -vals[0]))
    vals, idxs = vals[:, order], idxs[:, order]
    pos = 0
    while pos < k:
        stalled = None
        for j in range(vals.shape[1]):
            centroid = order[pos + j]
            for val, idx in zip(vals[:, j], idxs[:, j]):
                if val == -np.inf:
                    break
                if not taken[idx]:
                    taken[idx] = True
                    result[centroid] = idx
                    break
            if result[centroid] < 0:
                stalled = j
                break
        if stalled is None:
            break
        pos += stalled
        rest = torch.as_tensor(order[pos:], device=x.device)
        mask = torch.as_tensor(taken, device=x.device)
        vals, idxs = _nearest_available(x, theta[rest], mask, min(m, n - int(taken.sum())), block_bytes)
    return result
