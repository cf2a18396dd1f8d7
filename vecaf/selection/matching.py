"""Matching centroids to pool samples (Sec. 3.1: "the training data with the closest embedding to each
centroid is selected").

Rule: centroids are visited in order of their best cosine to an available sample (highest first, ties
by centroid index); each takes its nearest sample (cosine) that is neither taken by an earlier centroid
nor in ``exclude``. Every centroid gets a distinct sample, so the result always has K unique indices.

In bounded memory: one pass over the pool in N-blocks keeps, for every centroid, its ``candidates``
nearest available samples. Centroids then take their first untaken candidate; a centroid whose
candidates are all taken triggers one more pass (taken samples masked) for itself and the centroids after
it, so the result is exactly the rule above.

With ``neighbours`` = m > 1 and per-sample ``scores`` (e.g. the loss weights p_i), a centroid takes instead
the highest-scoring sample among its m nearest available ones at its turn (ties: the nearer); m = 1 is
the rule above. The pass then keeps at least 2m candidates per centroid, and a centroid with fewer than m
of them untaken triggers the extra pass.
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
    neighbours: int = 1,
    scores: np.ndarray | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> np.ndarray:
    """Each centroid takes its nearest available sample (order: best cosine first), or with ``neighbours``
    = m > 1 the highest-scoring one among its m nearest available samples.

    Args:
        embeddings: (N, D) pool embeddings (each block is normalised on the fly).
        centroids: (K, D) centroids.
        exclude: indices no centroid may take.
        candidates: nearest samples kept per centroid in one pass (at least 2 * ``neighbours``).
        neighbours: m, the neighbourhood a centroid chooses from (default 1: the nearest sample).
        scores: (N,) finite per-sample scores, needed when ``neighbours`` > 1.
        block_bytes: the size cap of one N-block's similarities to the K centroids plus its normalised rows.

    Returns:
        (K,) int64 indices, unique, none in ``exclude``, in centroid order.
    """
    x = embeddings
    theta = normalize_rows(centroids.to(device=x.device, dtype=torch.float32))
    n, k = x.shape[0], theta.shape[0]
    if isinstance(neighbours, bool) or not isinstance(neighbours, (int, np.integer)) or neighbours < 1:
        raise ValueError(f"neighbours must be an integer >= 1, got {neighbours!r}")
    if neighbours > 1:
        scores = None if scores is None else np.asarray(scores, dtype=np.float64)
        if scores is None or scores.shape != (n,) or not np.isfinite(scores).all():
            raise ValueError(f"neighbours > 1 needs scores: {n} finite numbers, one per pool sample")
    unavailable = torch.zeros(n, dtype=torch.bool, device=x.device)
    if exclude is not None and len(exclude):
        unavailable[torch.as_tensor(exclude, dtype=torch.long, device=x.device)] = True
    available = n - int(unavailable.sum())
    if k > available:
        raise ValueError(f"{k} centroids cannot take distinct samples from {available} available ones")
    taken = unavailable.cpu().numpy().copy()
    result = np.full(k, -1, dtype=np.int64)
    m = max(1, min(max(int(candidates), 2 * int(neighbours)), available))
    complete = m == available  # the lists hold every available sample: no extra pass can add one
    vals, idxs = _nearest_available(x, theta, unavailable, m, block_bytes)
    order = np.lexsort((np.arange(k), -vals[0]))
    idxs = idxs[:, order]
    pos = 0
    while pos < k:
        stalled = None
        for j in range(idxs.shape[1]):
            free = idxs[:, j][~taken[idxs[:, j]]]
            if free.size < neighbours and not (complete and free.size):
                stalled = j
                break
            hood = free[:neighbours]
            pick = hood[0] if neighbours == 1 else hood[int(np.argmax(scores[hood]))]
            taken[pick] = True
            result[order[pos + j]] = pick
        if stalled is None:
            break
        pos += stalled
        rest = torch.as_tensor(order[pos:], device=x.device)
        left = n - int(taken.sum())
        m, complete = min(m, left), min(m, left) == left
        _, idxs = _nearest_available(x, theta[rest], torch.as_tensor(taken, device=x.device), m, block_bytes)
    return result
