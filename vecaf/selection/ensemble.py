"""Ensemble debiasing of the selection model (Sec. 3.1): theta* = theta_1 - Sigma^{-1} (theta_1 - mu).

E selection models are optimised from independent initialisations. Their centroids are unordered sets,
so centroid k of member e is first *aligned* to centroid k of the reference member theta_1 by matching on
cosine (Hungarian, ``scipy.optimize.linear_sum_assignment``; or greedy mutual-best rounds for very large
K). Then, per centroid k, mu_k is the mean of the aligned member centroids, and

    theta*_k = theta_1k - Sigma^{-1} (theta_1k - mu_k),   re-normalised to unit length.

Sigma is one D x D covariance pooled over all centroids: the within-centroid deviations
theta_ek - mu_k of every member and centroid (K (E - 1) degrees of freedom; a per-centroid D x D
covariance from E = 5 members has rank <= 4). It is shrunk towards the identity with the Ledoit-Wolf
intensity rho, and expressed in units of its own mean variance m = tr(S) / D:

    Sigma = (1 - rho) S / m + rho I.

The unit matters: the formula subtracts Sigma^{-1} (theta_1 - mu) from a unit vector, so a covariance in
raw units (variances ~1e-3) would multiply the deviation by ~1e3 and throw theta* to the far side of mu.
In units of m, Sigma = I gives theta* = mu (the ensemble mean), and an eigen-direction of variance s
keeps a fraction (1 - 1/s) of theta_1's deviation from mu. With ``shrinkage="auto"`` rho is the
Ledoit-Wolf estimate floored at 1/2, the smallest rho for which every factor (1 - 1/s) lies in [-1, 1):
theta* is then never farther from mu than theta_1 is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from vecaf.selection.ods import DEFAULT_BLOCK_BYTES, normalize_rows, rows_per_block

HUNGARIAN_MAX_K = 4096
AUTO_SHRINKAGE_FLOOR = 0.5


def hungarian_match(reference: torch.Tensor, other: torch.Tensor) -> np.ndarray:
    """perm with other[perm[k]] matched to reference[k], maximising the summed cosine (Hungarian)."""
    cost = (normalize_rows(reference) @ normalize_rows(other).T).double().cpu().numpy()
    rows, cols = linear_sum_assignment(cost, maximize=True)
    perm = np.empty(reference.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm


def greedy_match(
    reference: torch.Tensor, other: torch.Tensor, *, block_bytes: int = DEFAULT_BLOCK_BYTES
) -> np.ndarray:
    """Greedy matching on cosine, in bounded memory.

    Rounds of mutual best pairs: every unmatched reference row whose best unmatched ``other`` row has it
    as its own best is matched, then the rest is matched again. This gives the same pairs as sorting all
    K^2 pairs by cosine and taking them greedily (for distinct cosines), without the K^2 table.

    Returns:
        perm with other[perm[k]] matched to reference[k].
    """
    ref = normalize_rows(reference)
    oth = normalize_rows(other)
    k = ref.shape[0]
    perm = np.full(k, -1, dtype=np.int64)
    free_ref = torch.arange(k, device=ref.device)
    free_oth = torch.arange(k, device=ref.device)
    while free_ref.numel():
        cand = oth[free_oth]
        rows = rows_per_block(cand.shape[0], block_bytes)
        row_best = torch.empty(free_ref.numel(), dtype=torch.long, device=ref.device)
        col_val = torch.full((cand.shape[0],), -float("inf"), device=ref.device)
        col_best = torch.zeros(cand.shape[0], dtype=torch.long, device=ref.device)
        for start in range(0, free_ref.numel(), rows):
            sims = ref[free_ref[start : start + rows]] @ cand.T
            row_best[start : start + rows] = sims.argmax(dim=1)
            val, arg = sims.max(dim=0)
            better = val > col_val
            col_val = torch.where(better, val, col_val)
            col_best = torch.where(better, arg + start, col_best)
        mutual = col_best[row_best] == torch.arange(free_ref.numel(), device=ref.device)
        perm[free_ref[mutual].cpu().numpy()] = free_oth[row_best[mutual]].cpu().numpy()
        keep_oth = torch.ones(free_oth.numel(), dtype=torch.bool, device=ref.device)
        keep_oth[row_best[mutual]] = False
        free_ref = free_ref[~mutual]
        free_oth = free_oth[keep_oth]
    return perm


def align_members(centroids: torch.Tensor, *, reference: int = 0, method: str = "auto") -> torch.Tensor:
    """Reorder every member's centroids so that row k matches row k of the reference member.

    Args:
        centroids: (E, K, D) centroids of E members.
        reference: the index of theta_1.
        method: "hungarian", "greedy", or "auto" (Hungarian up to K = 4096, greedy beyond).

    Returns:
        (E, K, D) aligned centroids (the reference member unchanged).
    """
    if method not in ("auto", "hungarian", "greedy"):
        raise ValueError(f"align must be 'auto', 'hungarian' or 'greedy', got {method!r}")
    k = centroids.shape[1]
    use_hungarian = method == "hungarian" or (method == "auto" and k <= HUNGARIAN_MAX_K)
    aligned = centroids.clone()
    for member in range(centroids.shape[0]):
        if member == reference:
            continue
        match = hungarian_match if use_hungarian else greedy_match
        perm = match(centroids[reference], centroids[member])
        aligned[member] = centroids[member][torch.as_tensor(perm, device=centroids.device)]
    return aligned


def ledoit_wolf_shrinkage(deviations: torch.Tensor) -> float:
    """Ledoit-Wolf (2004) intensity rho for shrinking the covariance of zero-mean rows towards m I.

    With S = X^T X / n and m = tr(S) / p: rho = min(b, d) / d, d = ||S - m I||_F^2,
    b = (sum_i ||x_i||^4 - n ||S||_F^2) / n^2.
    """
    x = deviations.double()
    n, p = x.shape
    cov = x.T @ x / n
    mean_var = torch.trace(cov) / p
    d2 = float(((cov - mean_var * torch.eye(p, dtype=x.dtype, device=x.device)) ** 2).sum())
    if d2 <= 0.0:
        return 1.0
    b2 = float(((x * x).sum(dim=1) ** 2).sum() - n * (cov**2).sum()) / n**2
    return float(min(max(b2, 0.0), d2) / d2)


def debias(
    centroids: torch.Tensor,
    *,
    reference: int = 0,
    shrinkage: float | str = "auto",
    align: str = "auto",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """theta* = theta_1 - Sigma^{-1}(theta_1 - mu) over aligned members (Sec. 3.1), re-normalised.

    Args:
        centroids: (E, K, D) optimised centroids of the E members.
        reference: which member is theta_1.
        shrinkage: rho in Sigma = (1 - rho) S / m + rho I, a float in [0, 1], or "auto" (Ledoit-Wolf
            estimate floored at 1/2).
        align: the matching used to align members to theta_1 ("auto", "hungarian", "greedy").

    Returns:
        (K, D) unit-norm debiased centroids theta*, and a record (shrinkage used, mean variance m).
    """
    if centroids.ndim != 3:
        raise ValueError(f"centroids must be (E, K, D), got shape {tuple(centroids.shape)}")
    members, k, d = centroids.shape
    if not 0 <= reference < members:
        raise ValueError(f"reference member {reference} is not in [0, {members})")
    if not (shrinkage == "auto" or (isinstance(shrinkage, (int, float)) and 0.0 <= float(shrinkage) <= 1.0)):
        raise ValueError(f"shrinkage must be 'auto' or a number in [0, 1], got {shrinkage!r}")
    theta = normalize_rows(centroids.double())
    theta_1 = theta[reference]
    if members == 1:
        return theta_1.float(), {"shrinkage": None, "mean_variance": 0.0}
    aligned = align_members(theta, reference=reference, method=align)
    mu = aligned.mean(dim=0)
    deviations = (aligned - mu).reshape(members * k, d)
    cov = deviations.T @ deviations / (k * (members - 1))
    mean_var = float(torch.trace(cov)) / d
    if mean_var <= 0.0:
        return theta_1.float(), {"shrinkage": None, "mean_variance": 0.0}
    rho = float(shrinkage) if shrinkage != "auto" else max(ledoit_wolf_shrinkage(deviations), AUTO_SHRINKAGE_FLOOR)
    sigma = (1.0 - rho) * cov / mean_var + rho * torch.eye(d, dtype=cov.dtype, device=cov.device)
    try:
        factor = torch.linalg.cholesky(sigma)
    except RuntimeError:
        raise ValueError(
            f"the shrunk covariance is singular with shrinkage={rho}; use a larger shrinkage or 'auto'"
        ) from None
    correction = torch.cholesky_solve((theta_1 - mu).T, factor).T
    theta_star = theta_1 - correction
    norms = theta_star.norm(dim=1, keepdim=True)
    theta_star = torch.where(norms > 1e-12, theta_star / norms.clamp_min(1e-12), theta_1)
    return theta_star.float(), {"shrinkage": rho, "mean_variance": mean_var}
