"""The parametric strategies: ``vecaf`` (ODS + ensemble debiasing + optional CEA) and ``activeft``.

``vecaf`` (Sec. 3.1-3.2):
  1. e: L2-normalised image embeddings. With ``text_embeddings``, CEA (Eq. 8-9) augments them towards
     the captions' embeddings, mapped into image space by a ridge projection fitted on the pool (or given,
     or skipped when ``text_aligned``); ODS then models the augmented pool.
  2. The loss weights are tempered: p_i = L_i^beta / sum_j L_j^beta with beta = ``loss_power``
     (default 0.5; beta = 1 is Eq. 3 as written, p_L = L / sum L; uniform when L is constant or all zero).
     E members, each initialised on K distinct pool samples drawn with probability p, minimise Eq. 7
     with p as the attraction weights, with Adam (``vecaf.selection.ods``).
  3. theta_1 is the member with the lowest objective; the others are aligned to it and
     theta* = theta_1 - Sigma^{-1}(theta_1 - mu) (``vecaf.selection.ensemble``).
  4. Each centroid of theta* takes its nearest available sample of the original (un-augmented)
     embeddings (``vecaf.selection.matching``), never one in ``exclude``; with ``match_neighbours`` = m > 1,
     the sample of the largest loss weight p_i among its m nearest available ones instead.

``activeft`` (ActiveFT, Xie et al. 2023): the same optimiser with uniform weights, one member, centroids
initialised on uniformly drawn samples, no debiasing; the same matching.

The objective models the whole pool (samples chosen in earlier loops are still part of the training
distribution, with their current losses); ``exclude`` only removes samples from initialisation and
matching. With ``labelled_centroids=True`` the samples in ``exclude`` are fixed centroids of Eq. 7 instead
(``vecaf.selection.ods.optimize_ods``'s ``covered``): the pool they already reach leaves the attraction term.
With ``labelled_repulsion=True`` they also enter the diversity term, pushing the new centroids away from them.

Which losses: ``vecaf.train.finetune`` passes the expected loss under the current model's own prediction,
sum_c p_ic l(z_i, c) (``vecaf.objectives.expected_losses``), by default, and the observed l(z_i, y_i) of Eq. 3
with ``selection_loss="observed"``; this module weighs whatever ``losses`` it is given (``docs/fidelity.md``).

Why beta = 0.5 by default: with beta = 1 the picks of loops 2-3 concentrate on the high-loss, confusable
classes (fewer classes covered per loop), and VeCAF fell below random and ActiveFT in the head-mode
benchmark; beta = 0.5 gained 3.9 +- 1.2 top-1 points on a validation split (``benchmarks/NOTES.md``,
"Why VeCAF loses in head mode"). Pass ``loss_power=1.0`` for the paper's Eq. 3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vecaf import cea
from vecaf.selection import ensemble, matching, ods
from vecaf.selection.baselines import allowed_mask, check_block_bytes, resolve
from vecaf.selection.registry import SelectionMethod, register_method


def _number(name: str, value: Any, *, low: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if float(value) < low or (low_open and float(value) == low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")


def _integer(name: str, value: Any, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def initial_indices(weights: np.ndarray, allowed: np.ndarray, k: int, members: int, seed: int) -> np.ndarray:
    """(members, k) distinct allowed sample indices per member, drawn without replacement with p ~ weights.

    Successive sampling by the Gumbel top-k trick (seeded). Samples of zero weight come after every
    positive-weight sample, in random order, if a member needs more than there are.
    """
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(allowed)
    w = weights[candidates].astype(np.float64)
    positive = w > 0
    log_w = np.where(positive, np.log(np.where(positive, w, 1.0)), 0.0)
    out = np.empty((members, k), dtype=np.int64)
    for member in range(members):
        keys = log_w + rng.gumbel(size=candidates.shape[0])
        keys = np.where(positive, keys, keys - 1e6)
        top = np.argpartition(-keys, k - 1)[:k] if k < candidates.shape[0] else np.arange(candidates.shape[0])
        top = top[np.argsort(-keys[top], kind="stable")]
        out[member] = candidates[top]
    return out


@dataclass
class _ParametricBase(SelectionMethod):
    lam: float = 1.0
    temperature: float = 0.07
    lr: float = 1e-3
    max_iters: int = 300
    tol: float = 1e-4
    device: str = "auto"
    refresh: str | int = "adaptive"
    block_bytes: int = ods.DEFAULT_BLOCK_BYTES
    precision: str = "auto"

    def _check(self) -> None:
        _number("lam", self.lam, low=0.0)
        _number("temperature", self.temperature, low=0.0, low_open=True)
        _number("lr", self.lr, low=0.0, low_open=True)
        _integer("max_iters", self.max_iters, low=1)
        _number("tol", self.tol, low=0.0)
        if self.refresh != "adaptive":
            _integer("refresh", self.refresh, low=1)
        check_block_bytes(self.block_bytes)
        if self.precision not in ods.PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(map(repr, ods.PRECISIONS))}, got {self.precision!r}")

    def _optimize(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        init: np.ndarray,
        covered: torch.Tensor | None = None,
        repel: torch.Tensor | None = None,
    ) -> ods.ODSResult:
        """Eq. 7 from the samples ``init``; ``w`` carries 1 / ||x_i|| for raw rows (``ods.pool_rows``);
        ``covered``, ``repel``: fixed centroids in the assignment and the diversity term (``ods.optimize_ods``)."""
        start = x[torch.as_tensor(init, device=x.device)]
        return ods.optimize_ods(
            x,
            w,
            start,
            lam=float(self.lam),
            temperature=float(self.temperature),
            lr=float(self.lr),
            max_iters=int(self.max_iters),
            tol=float(self.tol),
            refresh=self.refresh,
            block_bytes=int(self.block_bytes),
            precision=self.precision,
            covered=covered,
            repel=repel,
        )


@register_method("vecaf")
@dataclass
class VeCAF(_ParametricBase):
    """VeCAF selection: ODS (Eq. 7) on CEA-augmented embeddings, E-member debiasing, nearest matching.

    The loss weights are p_i = L_i^beta / sum_j L_j^beta (beta = ``loss_power``); they draw the members'
    initial samples and weight the attraction term of Eq. 7. beta = 1 is Eq. 3 as written (p_L = L / sum L).

    Attributes:
        lam: diversity weight lambda of Eq. 7 (default 1.0, ActiveFT's balance).
        loss_power: beta, the exponent of the losses in p (default 0.5, which flattens Eq. 3's weights;
            1.0 gives Eq. 3 exactly; finite and > 0).
        ensemble: E, the number of independently initialised members (default 5, Sec. 3.1).
        temperature: tau dividing every cosine in both terms of Eq. 7 (default 0.07, as ActiveFT; 1.0
            gives the paper's literal cosines).
        lr: Adam learning rate (default 1e-3, Sec. 4.1).
        max_iters: cap on Adam steps (default 300, ActiveFT's).
        tol: convergence test (default 1e-4): stop at an assignment refresh where at most this fraction
            of assignments moved and the objective changed by at most this (relative) per iteration.
        eta: CEA step for selection (default 0.5): Eq. 8-9 over the N pool rows with step eta * N, so an
            average-attention sample moves a fraction eta towards its text embedding.
        device: "auto" (CUDA when present), "cpu", "cuda", ...
        text_aligned: the text embeddings already live in the image space (same D, e.g. CLIP towers):
            no projection (default False: a ridge projection text -> image is fitted on the pool).
        projection: a ``vecaf.cea.TextProjection`` fitted beforehand (e.g. on un-steered captions for OOD
            steering); overrides fitting and ``text_aligned``.
        ridge: relative ridge strength of the fitted projection (default 1e-2).
        shrinkage: rho of the covariance (1 - rho) S / m + rho I, or "auto" (Ledoit-Wolf, floored at 1/2).
        align: member alignment, "auto" (Hungarian up to K = 4096, else greedy), "hungarian", "greedy".
        refresh: "adaptive" assignment refreshes, or a fixed interval (1 = exact every step).
        block_bytes: size cap of one similarity block (default 256 MiB).
        precision: "auto" (default: bfloat16 assignment products where they are native, float32 elsewhere),
            "bfloat16", or "float32" (the exact computation); see ``vecaf.selection.ods.optimize_ods``.
        match_neighbours: m, the neighbourhood a centroid takes its sample from: 1 (default) is the
            nearest available sample (Sec. 3.1); m > 1 takes the one of the largest loss weight p_i among
            its m nearest available samples (``vecaf.selection.matching``).
        labelled_centroids: hold the samples in ``exclude`` (the earlier loops' picks) as fixed centroids
            of Eq. 7: a sample nearer to one of them than to every free centroid is covered and leaves
            the attraction term, so the K new centroids model what the labelled set does not reach
            (meant for the cumulative protocol, where the earlier picks stay in the training set;
            default False: the objective models the whole pool, as the paper's).
        labelled_repulsion: the samples in ``exclude`` also enter the diversity term of Eq. 7 as fixed
            centroids, so the free centroids are pushed from the labelled set as from each other
            (``ods._diversity``'s ``repel``; default False: the diversity term runs over the free ones).
    """

    requires_losses = True
    uses_text = True

    ensemble: int = 5
    eta: float = 0.5
    text_aligned: bool = False
    projection: cea.TextProjection | None = None
    ridge: float = 1e-2
    shrinkage: float | str = "auto"
    align: str = "auto"
    loss_power: float = 0.5
    match_neighbours: int = 1
    labelled_centroids: bool = False
    labelled_repulsion: bool = False

    def __post_init__(self) -> None:
        self._check()
        _integer("ensemble", self.ensemble, low=1)
        _integer("match_neighbours", self.match_neighbours, low=1)
        _number("loss_power", self.loss_power, low=0.0, low_open=True)
        _number("eta", self.eta, low=0.0)
        _number("ridge", self.ridge, low=0.0, low_open=True)
        for name in ("text_aligned", "labelled_centroids", "labelled_repulsion"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.projection is not None and not isinstance(self.projection, cea.TextProjection):
            raise ValueError(f"projection must be a vecaf.cea.TextProjection, got {type(self.projection).__name__}")
        if not (self.shrinkage == "auto" or (isinstance(self.shrinkage, (int, float)) and 0 <= self.shrinkage <= 1)):
            raise ValueError(f"shrinkage must be 'auto' or a number in [0, 1], got {self.shrinkage!r}")
        if self.align not in ("auto", "hungarian", "greedy"):
            raise ValueError(f"align must be 'auto', 'hungarian' or 'greedy', got {self.align!r}")

    def _text_transform(self, text: torch.Tensor, embeddings: torch.Tensor):
        if self.projection is not None:
            if self.projection.text_dim != text.shape[1] or self.projection.image_dim != embeddings.shape[1]:
                raise ValueError(
                    f"projection maps {self.projection.text_dim}-d text to {self.projection.image_dim}-d images, "
                    f"but text_embeddings are {text.shape[1]}-d and embeddings {embeddings.shape[1]}-d"
                )
            return self.projection
        if self.text_aligned:
            if text.shape[1] != embeddings.shape[1]:
                raise ValueError(
                    f"text_aligned=True needs text_embeddings of the image dimension {embeddings.shape[1]}, "
                    f"got {text.shape[1]}; leave text_aligned=False to fit a projection"
                )
            return None
        return cea.fit_projection(text, embeddings, ridge=float(self.ridge), block_bytes=int(self.block_bytes))

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
        x, inverse_norms = ods.pool_rows(embeddings, device, block_bytes=self.block_bytes)
        n = x.shape[0]
        w = ods.loss_weights(losses, n, device, power=float(self.loss_power))
        init = initial_indices(w.cpu().numpy(), allowed_mask(n, exclude), budget, int(self.ensemble), seed)
        if text_embeddings is None:
            x_model, w_model = x, w * inverse_norms
        else:
            transform = self._text_transform(text_embeddings, embeddings)
            x_model = cea.pool_augment(
                x,
                text_embeddings,
                eta=float(self.eta),
                transform=transform,
                inverse_norms=inverse_norms,
                block_bytes=self.block_bytes,
            )
            x_model.div_(x_model.norm(dim=1, keepdim=True).clamp_min_(1e-12))
            w_model = w
        covered = repel = None
        if len(exclude) and (self.labelled_centroids or self.labelled_repulsion):
            fixed = x_model[torch.as_tensor(np.asarray(exclude, dtype=np.int64), device=x_model.device)]
            if self.labelled_centroids:
                covered = ods.covered_similarities(x_model, fixed, block_bytes=self.block_bytes)
            if self.labelled_repulsion:
                repel = ods.unit_fixed_centroids(fixed, x_model.shape[1], x_model.device)
        result = self._optimize(x_model, w_model, init, covered, repel)
        reference = int(np.argmin(result.objective))
        theta_star, _ = ensemble.debias(
            result.centroids, reference=reference, shrinkage=self.shrinkage, align=self.align
        )
        del x_model
        return matching.match_centroids(
            x,
            theta_star.to(device),
            exclude=exclude,
            neighbours=int(self.match_neighbours),
            scores=w.cpu().numpy(),
            block_bytes=self.block_bytes,
        )


@register_method("activeft")
@dataclass
class ActiveFT(_ParametricBase):
    """ActiveFT's parametric selection: Eq. 7 with uniform weights, one model, nearest matching.

    Attributes:
        lam: diversity weight (ActiveFT's balance, default 1.0).
        temperature: tau (default 0.07).
        lr: Adam learning rate (default 1e-3).
        max_iters: cap on Adam steps (default 300).
        tol: convergence test, as for ``vecaf``.
        device: "auto" (CUDA when present), "cpu", "cuda", ...
        refresh: "adaptive" or a fixed refresh interval.
        block_bytes: size cap of one similarity block.
        precision: "auto", "bfloat16" or "float32", as for ``vecaf``.
    """

    def __post_init__(self) -> None:
        self._check()

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
        x, inverse_norms = ods.pool_rows(embeddings, device, block_bytes=self.block_bytes)
        w = inverse_norms  # uniform weights, each raw row entering as its unit vector
        init = initial_indices(np.ones(x.shape[0]), allowed_mask(x.shape[0], exclude), budget, 1, seed)
        result = self._optimize(x, w, init)
        return matching.match_centroids(x, result.centroids[0], exclude=exclude, block_bytes=self.block_bytes)
