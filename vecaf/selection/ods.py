"""Objective-aware Data Selection (ODS, Sec. 3.1, Eq. 3-7) with hand-written gradients.

For one selection model theta (K centroids) over a pool of N embeddings e_i with losses L_i the
objective is Eq. 7 with the loss weights of Eq. 3 (tempered by an exponent beta) and a temperature tau::

    F(theta) = -(1/tau) sum_i p_i <e_i, theta^{c_i}>  +  (lam/K) sum_k log sum_{j != k} exp(<theta_k, theta_j>/tau)

    p_i = L_i^beta / sum_j L_j^beta,   c_i = argmax_k <e_i, theta_k>,   <.,.> = cosine.

beta = 1 is Eq. 3 as written (Z = sum L); the ``vecaf`` strategy uses beta = ``loss_power`` (default
0.5, see ``vecaf.selection.methods``). tau = 1 gives the literal cosines of Eq. 7; tau = 0.07 and constant
L give ActiveFT's objective. The centroids are free vectors P normalised on use (theta = P / ||P||),
optimised with Adam (lr 1e-3).

The gradient is written by hand. The nearest-centroid assignment makes the attraction gradient a
scatter-add: dF/dtheta_k = -(1/(N tau)) S_k with S_k = sum_{i: c_i = k} w_i e_i (w = N p), and the
diversity gradient is (lam/(K tau)) (A + A^T) theta with A the row softmax of theta theta^T / tau (zero
diagonal). Both go through the normalisation Jacobian (I - theta theta^T) / ||P||.

Speed without changing the answer much: S (and the assignments) only change when a sample's nearest
centroid changes, so the N x K similarity is recomputed ("refresh") on an adaptive schedule: every
iteration at first; the interval doubles (up to 32) after a refresh where fewer than 2 % of the
assignments moved, and halves after one where more than 5 % moved.
Between refreshes an iteration costs O(K^2 D) instead of O(N K D). The stale-assignment objective
tracked between refreshes is an upper bound on the exact one (each sample's best similarity can only
be higher than its similarity to the stale centroid). The E ensemble members run as one batched
computation: an (E*K, D) centroid matrix against each block of N rows, batched K x K products, one Adam.
Every N-block x (E*K) similarity block (with the block's weighted rows) or K-block x K block is kept
under ``block_bytes``, and the pool is read as the caller holds it: no normalised copy, since the
argmax is scale-free and each row's 1 / ||x_i|| rides on its weight (``pool_rows``). Memory is the pool,
the blocks and O(E K D) centroid state.

``precision="bfloat16"`` (what "auto" picks where bfloat16 products are native, ``fast_bfloat16``) takes each
refresh's argmax from a bfloat16 product (refreshes measured 1.7-3.8x faster on such a CPU), and checks every move in
float32: a sample changes centroid only when the new one is nearer in float32, so bfloat16 rounding never moves
a sample by itself, and S, the objective and the gradient stay float32. The approximation: a sample whose
nearest centroid beats its current one by less than bfloat16's error (~1 % of the cosine) may keep the current
one. ``precision="float32"`` is the exact computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

MIB = 1 << 20
DEFAULT_BLOCK_BYTES = 256 * MIB
MAX_REFRESH_INTERVAL = 32
GROW_BELOW = 0.02
SHRINK_ABOVE = 0.05
PRECISIONS = ("auto", "float32", "bfloat16")


def rows_per_block(width: int, block_bytes: int, *, itemsize: int = 4) -> int:
    """How many rows of a (rows, width) float block fit in ``block_bytes`` (at least one)."""
    return max(1, int(block_bytes) // max(1, int(width) * itemsize))


def refresh_rows(members: int, k: int, d: int, block_bytes: int) -> int:
    """N-rows per assignment block: its (rows, E K) similarities and its (rows, D) weighted rows (the
    scatter-add operand) together stay under ``block_bytes``."""
    return rows_per_block(members * k + d, block_bytes)


def fast_bfloat16(device: torch.device | str) -> bool:
    """Whether bfloat16 matrix products are native on ``device``: a CUDA card of compute capability >= 8,
    or a CPU whose flags list avx512_bf16 or amx_bf16 (elsewhere bfloat16 is emulated and slower)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """"auto" -> "bfloat16" where ``fast_bfloat16(device)``, else "float32"; the others as given.

    Raises:
        ValueError: ``precision`` is not one of ``PRECISIONS``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if fast_bfloat16(device) else "float32"
    return precision


def nearest_centroids(
    xb: torch.Tensor,
    flat: torch.Tensor,
    members: int,
    k: int,
    *,
    screen: torch.Tensor | None = None,
    old: torch.Tensor | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """max_k and argmax_k <x_i, theta_ek> for each row of ``xb`` and each member e.

    Args:
        xb: (rows, D) float32 rows.
        flat: (E K, D) float32 centroids, member-major.
        members: E.
        k: K.
        screen: None for the float32 product (exact); or ``flat`` in bfloat16: the argmax of the bfloat16
            product is taken, and where it differs from ``old`` both candidates are compared in float32 and
            the sample moves only if the new centroid is really nearer (no move on bfloat16 rounding alone).
        old: (rows, E) the previous assignment, or None (then the bfloat16 argmax is taken as it is).
        block_bytes: size cap of the float32 check's gathered rows.

    Returns:
        best (rows, E) float32 similarities and arg (rows, E) centroid indices in [0, K). With ``screen``,
        ``best`` is the float32 similarity where a move was checked and the bfloat16 one elsewhere; the
        assigned similarity is within twice bfloat16's error (8 significant bits, ~1 % of ||x_i||) of the
        true maximum.
    """
    rows = xb.shape[0]
    if screen is None:
        return (xb @ flat.T).view(rows, members, k).max(dim=2)
    best, arg = (xb.to(screen.dtype) @ screen.T).view(rows, members, k).max(dim=2)
    best = best.float()
    if old is None:
        return best, arg
    row, member = (arg != old).nonzero(as_tuple=True)
    step = rows_per_block(3 * xb.shape[1], block_bytes)
    for start in range(0, row.numel(), step):
        r, e = row[start : start + step], member[start : start + step]
        xr = xb[r]
        new_sim = (xr * flat[e * k + arg[r, e]]).sum(dim=1)
        old_sim = (xr * flat[e * k + old[r, e]]).sum(dim=1)
        stay = old_sim >= new_sim
        arg[r[stay], e[stay]] = old[r[stay], e[stay]]
        best[r, e] = torch.maximum(new_sim, old_sim)
    return best, arg


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def pool_rows(
    x: torch.Tensor, device: torch.device | str, *, block_bytes: int = DEFAULT_BLOCK_BYTES
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool as the optimiser reads it: float32 rows on ``device`` and their inverse norms 1 / ||x_i||.

    No normalised copy of the pool is made: argmax_k <x_i, theta_k> is the same for x_i and x_i / ||x_i||,
    and every other use of a row is p_i x_i / ||x_i||, so the weights carry the 1 / ||x_i|| instead
    (``optimize_ods`` with w_i / ||x_i||). ``x`` itself is returned when it already is float32 on
    ``device``; otherwise one float32 copy is made there.

    Raises:
        ValueError: when a row is all zeros (its cosine to anything is undefined).
    """
    rows = x.to(device=device, dtype=torch.float32)
    inverse = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
    step = rows_per_block(rows.shape[1], block_bytes)
    for start in range(0, rows.shape[0], step):
        norms = rows[start : start + step].norm(dim=1)
        if not bool((norms > 0).all()):
            row = start + int((norms <= 0).nonzero()[0, 0])
            raise ValueError(f"embeddings row {row} is all zeros: its cosine similarity (Eq. 4, 7) is undefined")
        inverse[start : start + step] = norms.reciprocal_()
    return rows, inverse


def unit_fixed_centroids(fixed: torch.Tensor, width: int, device: torch.device | str) -> torch.Tensor:
    """f_l / ||f_l|| as float32 on ``device``, after checking the fixed centroids' shape.

    Raises:
        ValueError: ``fixed`` is empty, not (M, ``width``), or has an all-zero row.
    """
    if fixed.ndim != 2 or fixed.shape[0] == 0 or fixed.shape[1] != width:
        raise ValueError(f"fixed centroids must be a non-empty (M, {width}) array, got shape {tuple(fixed.shape)}")
    fixed = fixed.to(device=device, dtype=torch.float32)
    norms = fixed.norm(dim=1, keepdim=True)
    if not bool((norms > 0).all()):
        raise ValueError("a fixed centroid is all zeros: its cosine similarity is undefined")
    return fixed / norms


def covered_similarities(
    x: torch.Tensor, fixed: torch.Tensor, *, block_bytes: int = DEFAULT_BLOCK_BYTES
) -> torch.Tensor:
    """covered_i = max_l <x_i, f_l / ||f_l||>: each row's similarity to its nearest fixed centroid f_l.

    On the scale of the row as given (||x_i|| times the cosine for raw rows, ``pool_rows``), the scale of
    the nearest-centroid similarities it is compared with in ``_refresh``.

    Raises:
        ValueError: ``fixed`` is empty, of another width than ``x``, or has an all-zero row.
    """
    unit = unit_fixed_centroids(fixed, x.shape[1], x.device)
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    step = rows_per_block(unit.shape[0] + x.shape[1], block_bytes)
    for start in range(0, x.shape[0], step):
        out[start : start + step] = (x[start : start + step].float() @ unit.T).max(dim=1).values
    return out


def _check_power(power: object) -> float:
    """The exponent beta of the loss weights as a float: finite and > 0 (``ValueError`` otherwise)."""
    if isinstance(power, (bool, np.bool_)) or not isinstance(power, (int, float, np.integer, np.floating)):
        raise ValueError(f"loss_power must be a finite number > 0, got {power!r}")
    if not math.isfinite(float(power)) or float(power) <= 0.0:
        raise ValueError(f"loss_power must be a finite number > 0, got {power!r}")
    return float(power)


def loss_weights(
    losses: torch.Tensor | None, n: int, device: torch.device | str, *, power: float = 1.0
) -> torch.Tensor:
    """w_i = L_i^beta / mean(L^beta) with beta = ``power``, so p_i = w_i / N = L_i^beta / sum_j L_j^beta.

    beta = 1 is Eq. 3 with Z = sum L; a smaller beta flattens the weights towards uniform (beta -> 0).
    Uniform when L is None or all zero; constant L gives w = 1 for any beta.

    Raises:
        ValueError: ``power`` is not a finite number > 0.
    """
    power = _check_power(power)
    if losses is None:
        return torch.ones(n, dtype=torch.float32, device=device)
    losses = torch.as_tensor(losses, dtype=torch.float64)
    if power != 1.0:
        # numpy's power is correctly rounded (power 0.5 is exactly np.sqrt), so pre-powered losses with
        # power 1 give the same weights bit for bit; a pool whose L^beta overflows uses (L / max L)^beta
        values = losses.detach().cpu().numpy()
        with np.errstate(over="ignore"):
            powered = np.power(values, power)
            if not math.isfinite(float(powered.sum())) and np.isfinite(values).all() and values.max() > 0:
                powered = np.power(values / values.max(), power)
        losses = torch.from_numpy(powered)
    total = float(losses.sum())
    if total <= 0.0 or not math.isfinite(total):
        return torch.ones(n, dtype=torch.float32, device=device)
    return (losses * (n / total)).to(device=device, dtype=torch.float32)


def _refresh(
    x: torch.Tensor,
    w: torch.Tensor,
    theta: torch.Tensor,
    rows: int,
    previous: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    screened: bool = False,
    covered: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Exact nearest-centroid assignment of every sample, for every member.

    Args:
        x: (N, D) embeddings (unit rows, or raw rows with w carrying 1 / ||x_i||, see ``pool_rows``).
        w: (N,) loss weights.
        theta: (E, K, D) unit-norm centroids.
        rows: N-rows per similarity block.
        previous: the (assign, sums) of the previous refresh; ``sums`` is then updated in place with the
            samples whose centroid changed instead of being summed again from scratch.
        screened: assign by a bfloat16 product, moves checked in float32 (``nearest_centroids``).
        covered: (N,) or None: each sample's similarity to its nearest fixed centroid, on the scale of
            its row of ``x`` (``covered_similarities``). A sample whose nearest free centroid is not
            nearer (similarity <= covered_i) is covered: it goes to the sink slot K and leaves S_k.
            With ``screened`` the test reads the screened similarity (within bfloat16's error of it).

    Returns:
        assign: (N, E) index of the nearest centroid of each sample in each member; with ``covered``,
            K is added where the sample is covered (the nearest free centroid is ``assign % K``).
        sums: (E, K, D) S_k = sum_{i: c_i = k} w_i e_i; with ``covered`` (E, K + 1, D), row K the sink.
        attraction: (E,) float64 sum_i w_i max_k <x_i, theta_k> (with ``covered``, the max over the fixed
            centroids too: sum_i w_i max(max_k <x_i, theta_k>, covered_i)).
        moved: how many of the N*E assignments differ from ``previous`` (N*E without one).
    """
    members, k, d = theta.shape
    flat = theta.reshape(members * k, d)
    n = x.shape[0]
    slots = k if covered is None else k + 1
    assign = torch.empty((n, members), dtype=torch.long, device=x.device)
    if previous is None:
        old_assign, sums = None, torch.zeros((members, slots, d), dtype=x.dtype, device=x.device)
    else:
        old_assign, sums = previous
    attraction = torch.zeros(members, dtype=torch.float64, device=x.device)
    screen = flat.to(torch.bfloat16) if screened else None
    moved = 0
    for start in range(0, n, rows):
        xb = x[start : start + rows]
        wb = w[start : start + rows]
        old = None if old_assign is None else old_assign[start : start + rows]
        if covered is None:
            best, arg = nearest_centroids(xb, flat, members, k, screen=screen, old=old)
            assign[start : start + rows] = arg
        else:
            free = None if old is None else old.remainder(k)
            best, nearest = nearest_centroids(xb, flat, members, k, screen=screen, old=free)
            sink = best <= covered[start : start + rows, None]
            assign[start : start + rows] = nearest + sink * k
            best = torch.where(sink, covered[start : start + rows, None], best)
            arg = nearest.masked_fill(sink, k)
            old = None if old is None else old.clamp(max=k)
        attraction += (wb[:, None] * best).sum(dim=0, dtype=torch.float64)
        if old_assign is None:
            weighted = wb[:, None] * xb
            for member in range(members):
                sums[member].index_add_(0, arg[:, member], weighted)
            moved += arg.numel()
            continue
        changed = arg != old
        count = int(changed.sum())
        if count == 0:
            continue
        moved += count
        for member in range(members):
            local = changed[:, member].nonzero().squeeze(1)
            if local.numel() == 0:
                continue
            weighted = wb[local, None] * xb[local]
            sums[member].index_add_(0, arg[local, member], weighted)
            sums[member].index_add_(0, old[local, member], weighted, alpha=-1.0)
    return assign, sums, attraction, moved


def _diversity(
    theta: torch.Tensor, temperature: float, block_bytes: int, repel: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """R(theta) = sum_k log sum_{j != k} exp(<theta_k, theta_j>/tau) per member (Eq. 6 without the sign), and dR/dtheta.

    With ``repel`` (M unit fixed centroids f_l) each free centroid's sum also runs over the fixed ones,
    R = sum_k log(sum_{j != k} exp(<theta_k, theta_j>/tau) + sum_l exp(<theta_k, f_l>/tau)), so the free
    centroids are pushed from the fixed ones as from each other (the fixed ones have no term of their own).

    Returns:
        value: (E,) float64.
        grad: (E, K, D) = ((A + A^T) theta + B f) / tau, [A B] the row softmax over the K free (zero
            diagonal) and M fixed columns.
    """
    members, k, _ = theta.shape
    grad = torch.zeros_like(theta)
    value = torch.zeros(members, dtype=torch.float64, device=theta.device)
    if k == 1 and repel is None:
        return value, grad
    columns = k if repel is None else k + repel.shape[0]
    rows = rows_per_block(members * columns, block_bytes // 2)
    theta_t = theta.transpose(1, 2)
    for start in range(0, k, rows):
        block = theta[:, start : start + rows]
        logits = torch.bmm(block, theta_t)
        if repel is not None:
            logits = torch.cat([logits, block @ repel.T], dim=2)
        logits.div_(temperature).diagonal(offset=start, dim1=1, dim2=2).fill_(-math.inf)
        lse = torch.logsumexp(logits, dim=2)
        value += lse.sum(dim=1, dtype=torch.float64)
        attn = logits.sub_(lse[:, :, None]).exp_()
        free = attn[:, :, :k]
        if rows >= k:
            grad += torch.bmm(free + free.transpose(1, 2), theta)
        else:
            grad[:, start : start + rows] += torch.bmm(free, theta)
            grad += torch.bmm(free.transpose(1, 2), block)
        if repel is not None:
            grad[:, start : start + rows] += attn[:, :, k:] @ repel
    return value, grad.div_(temperature)


def _objective_and_theta_grad(
    theta: torch.Tensor,
    sums: torch.Tensor,
    n: int,
    lam: float,
    temperature: float,
    block_bytes: int,
    repel: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7 (stale assignments summarised by ``sums``) per member and its gradient w.r.t. unit theta."""
    k = theta.shape[1]
    div_value, div_grad = _diversity(theta, temperature, block_bytes, repel)
    attraction = (sums * theta).sum(dim=(1, 2), dtype=torch.float64)
    value = -attraction / (n * temperature) + (lam / k) * div_value
    grad = sums.mul(-1.0 / (n * temperature)).add_(div_grad, alpha=lam / k)
    return value, grad


def _through_normalisation(grad_theta: torch.Tensor, theta: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    radial = (grad_theta * theta).sum(dim=-1, keepdim=True)
    return (grad_theta - radial * theta) / norms


def ods_value_and_grad(
    x: torch.Tensor,
    w: torch.Tensor,
    params: torch.Tensor,
    *,
    lam: float,
    temperature: float,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    covered: torch.Tensor | None = None,
    repel: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Eq. 7 and its hand-written gradient w.r.t. the free centroid vectors.

    Args:
        x: (N, D) embeddings: unit rows, or raw rows with ``w`` divided by ||x_i|| (``pool_rows``).
        w: (N,) loss weights w_i = L_i / mean(L) (over ||x_i|| for raw rows).
        params: (E, K, D) free centroid vectors P; theta = P / ||P||.
        lam: diversity weight lambda.
        temperature: tau.
        block_bytes: the size cap of one similarity block.
        covered: (N,) similarities to fixed centroids (``covered_similarities``), or None.
        repel: (M, D) unit fixed centroids in the diversity term (``_diversity``), or None.

    Returns:
        (E,) objective values F(theta) and (E, K, D) dF/dP.
    """
    norms = params.norm(dim=-1, keepdim=True)
    theta = params / norms
    k = theta.shape[1]
    rows = refresh_rows(theta.shape[0], k, theta.shape[2], block_bytes)
    assign, sums, _, _ = _refresh(x, w, theta, rows, covered=covered)
    value, grad_theta = _objective_and_theta_grad(
        theta, sums[:, :k], x.shape[0], lam, temperature, block_bytes, repel
    )
    value = value - _covered_attraction(w, covered, assign, k) / (x.shape[0] * temperature)
    return value, _through_normalisation(grad_theta, theta, norms)


def _covered_attraction(w: torch.Tensor, covered: torch.Tensor | None, assign: torch.Tensor, k: int) -> torch.Tensor:
    """(E,) float64 sum over the covered samples of w_i covered_i: the fixed centroids' share of the
    attraction term, constant between refreshes (zero without fixed centroids)."""
    if covered is None:
        return torch.zeros(assign.shape[1], dtype=torch.float64, device=w.device)
    return ((w * covered).double()[:, None] * (assign >= k)).sum(dim=0)


def ods_objective(
    embeddings: torch.Tensor | np.ndarray,
    centroids: torch.Tensor | np.ndarray,
    *,
    losses: torch.Tensor | np.ndarray | None = None,
    lam: float = 1.0,
    temperature: float = 0.07,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    fixed: torch.Tensor | np.ndarray | None = None,
    repel: bool = False,
) -> np.ndarray | float:
    """Eq. 7 evaluated exactly (nearest-centroid assignment recomputed) for one or several centroid sets.

    With ``fixed`` (M, D) centroids held fixed beside the free ones, each sample's attraction is its
    similarity to the nearest of all K + M centroids, and the diversity term is the free centroids' own.

    Args:
        embeddings: (N, D) embeddings (each row enters as its unit vector; no normalised copy is made).
        centroids: (K, D) or (E, K, D) centroids (normalised here).
        losses: (N,) non-negative losses; None means uniform (ActiveFT's objective).
        lam: diversity weight lambda.
        temperature: tau in both terms.
        block_bytes: the size cap of one similarity block.
        fixed: (M, D) fixed centroids (normalised here), or None.
        repel: the fixed centroids also enter the diversity term (``_diversity``'s ``repel``).

    Returns:
        F(theta) as a float for (K, D) centroids, or an (E,) array.

    Raises:
        ValueError: ``repel`` without ``fixed``.
    """
    x = torch.as_tensor(embeddings, dtype=torch.float32)
    theta = normalize_rows(torch.as_tensor(centroids, dtype=torch.float32))
    single = theta.ndim == 2
    if single:
        theta = theta[None]
    w = loss_weights(None if losses is None else torch.as_tensor(losses), x.shape[0], x.device)
    w *= x.norm(dim=1).clamp_min_(1e-12).reciprocal_()  # the raw rows enter as unit rows (``pool_rows``)
    if repel and fixed is None:
        raise ValueError("repel=True needs the fixed centroids")
    covered = None if fixed is None else covered_similarities(x, torch.as_tensor(fixed), block_bytes=block_bytes)
    rows = refresh_rows(theta.shape[0], theta.shape[1], theta.shape[2], block_bytes)
    _, _, attraction, _ = _refresh(x, w, theta, rows, covered=covered)
    unit = unit_fixed_centroids(torch.as_tensor(fixed), x.shape[1], x.device) if repel else None
    div_value, _ = _diversity(theta, temperature, block_bytes, unit)
    value = (-attraction / (x.shape[0] * temperature) + (lam / theta.shape[1]) * div_value).cpu().numpy()
    return float(value[0]) if single else value


@dataclass
class ODSResult:
    """The optimised centroids of each ensemble member and how the run went.

    Attributes:
        centroids: (E, K, D) unit-norm centroids theta_e*.
        objective: (E,) exact Eq. 7 value of each member at the end.
        iterations: Adam steps taken.
        refreshes: how many times the N x (E*K) assignment was recomputed.
        converged: whether the ``tol`` test stopped the run before ``max_iters``.
        history: (iteration, mean exact objective, fraction of assignments that moved) at each refresh.
        precision: the similarity precision used ("float32" or "bfloat16", see ``optimize_ods``).
    """

    centroids: torch.Tensor
    objective: np.ndarray
    iterations: int
    refreshes: int
    converged: bool
    history: list[tuple[int, float, float]] = field(default_factory=list)
    precision: str = "float32"


def optimize_ods(
    x: torch.Tensor,
    w: torch.Tensor,
    init: torch.Tensor,
    *,
    lam: float = 1.0,
    temperature: float = 0.07,
    lr: float = 1e-3,
    max_iters: int = 300,
    tol: float = 1e-4,
    refresh: str | int = "adaptive",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    precision: str = "float32",
    covered: torch.Tensor | None = None,
    repel: torch.Tensor | None = None,
) -> ODSResult:
    """Minimise Eq. 7 for E independently initialised members at once (Adam on the free centroids).

    Args:
        x: (N, D) embeddings on the compute device: unit rows, or the raw rows with ``w`` divided by
            ||x_i|| (``pool_rows``; the same objective without a normalised copy of the pool).
        w: (N,) loss weights w_i = L_i / mean(L) (over ||x_i|| for raw rows).
        init: (E, K, D) initial centroids (ActiveFT-style: pool samples), normalised here.
        lam: diversity weight lambda.
        temperature: tau, dividing every cosine in both terms.
        lr: Adam learning rate.
        max_iters: the cap on Adam steps.
        tol: stop at a refresh where at most this fraction of the N*E assignments moved and the exact
            objective changed by at most ``tol`` (relative) per iteration since the previous refresh.
            0 disables the test.
        refresh: "adaptive", or a fixed number of iterations between exact assignments (1 = every step).
        block_bytes: the size cap of one N-block x (E*K) or K-block x K similarity block.
        betas: Adam's moment decays.
        eps: Adam's epsilon.
        precision: "float32" (every similarity in float32: the exact computation), "bfloat16" (the
            assignment refreshes take the argmax of a bfloat16 product and check every move in float32,
            see ``nearest_centroids``; sums, gradients and objective stay float32), or "auto" ("bfloat16"
            where ``fast_bfloat16``).
        covered: (N,) each sample's similarity to its nearest fixed centroid (``covered_similarities``),
            or None. Fixed centroids join the assignment of Eq. 7 (its diversity term only through ``repel``): a sample
            nearer to one of them than to every free centroid drops out of S_k, so the free centroids
            model what the fixed ones do not reach. The objective reported is then ``ods_objective``
            with ``fixed``.
        repel: (M, D) unit fixed centroids (``unit_fixed_centroids``) that also enter the diversity term,
            pushing the free centroids away from them (``_diversity``), or None.

    Returns:
        The optimised centroids and the run's record.
    """
    members, k, _ = init.shape
    n = x.shape[0]
    screened = resolve_precision(precision, x.device) == "bfloat16"
    rows = refresh_rows(members, k, init.shape[2], block_bytes)
    params = normalize_rows(init.detach().to(device=x.device, dtype=torch.float32))
    exp_avg = torch.zeros_like(params)
    exp_avg_sq = torch.zeros_like(params)
    beta1, beta2 = betas
    fixed_interval = None if refresh == "adaptive" else int(refresh)
    interval = 1 if fixed_interval is None else fixed_interval
    next_refresh = 0
    assign = None
    sums = None
    last = None
    history: list[tuple[int, float, float]] = []
    refreshes = 0
    converged = False
    step = 0
    for step in range(max_iters):
        norms = params.norm(dim=-1, keepdim=True)
        theta = params / norms
        if step == next_refresh:
            previous = None if assign is None else (assign, sums)
            assign, sums, _, moved_count = _refresh(x, w, theta, rows, previous, screened=screened, covered=covered)
            refreshes += 1
            moved = moved_count / assign.numel()
            fixed_share = _covered_attraction(w, covered, assign, k) / (n * temperature)
            value, grad_theta = _objective_and_theta_grad(theta, sums[:, :k], n, lam, temperature, block_bytes, repel)
            value = value - fixed_share
            exact = float(value.mean())
            history.append((step, exact, moved))
            if last is not None and tol > 0:
                prev_step, prev_value = last
                change = abs(exact - prev_value) / max(abs(exact), 1e-12) / max(1, step - prev_step)
                if moved <= tol and change <= tol:
                    converged = True
                    break
            last = (step, exact)
            if fixed_interval is None:
                if moved > SHRINK_ABOVE:
                    interval = max(1, interval // 2)
                elif moved < GROW_BELOW:
                    interval = min(2 * interval, MAX_REFRESH_INTERVAL)
            next_refresh = step + interval
        else:
            value, grad_theta = _objective_and_theta_grad(theta, sums[:, :k], n, lam, temperature, block_bytes, repel)
            value = value - fixed_share
        grad = _through_normalisation(grad_theta, theta, norms)
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        t = step + 1
        denom = (exp_avg_sq / (1 - beta2**t)).sqrt_().add_(eps)
        params.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**t))
    if converged:
        final_value = value
    else:
        theta = normalize_rows(params)
        final_assign, final_sums, _, _ = _refresh(x, w, theta, rows, screened=screened, covered=covered)
        refreshes += 1
        final_value, _ = _objective_and_theta_grad(
            theta, final_sums[:, :k], n, lam, temperature, block_bytes, repel
        )
        final_value = final_value - _covered_attraction(w, covered, final_assign, k) / (n * temperature)
    return ODSResult(
        centroids=theta,
        objective=final_value.cpu().numpy(),
        iterations=step if converged else max_iters,
        refreshes=refreshes,
        converged=converged,
        history=history,
        precision="bfloat16" if screened else "float32",
    )
