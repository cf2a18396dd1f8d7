"""Selection speed: ``vecaf.select(method="vecaf")`` against the plain ActiveFT optimisation, same pool.

The pool is synthetic and seeded: K_true Gaussian clusters on the unit sphere (centres c_j uniform on
S^{D-1}, e_i = normalise(c_{j(i)} + s g_i / sqrt(D)) with g_i ~ N(0, I), s = ``--spread``) and per-sample
losses L_i ~ Gamma(2, 1). At each size (N, D, K) three selections run in one process:

(a) plain: ActiveFT (Xie et al. 2023) as written: theta = ``torch.nn.Parameter`` initialised on K uniformly
    drawn samples, Adam (lr 1e-3), 300 full-batch steps of
        loss(theta) = -1/N sum_i max_k cos(e_i, theta_k) / tau
                      + 1/K sum_k log sum_{j != k} exp(cos(theta_k, theta_j) / tau),   tau = 0.07,
    the full N x K similarity and its gradient through autograd every step; then each centroid, in order,
    takes its most similar sample not taken yet. Float32, torch's default threads.
(b) ours: ``vecaf.select(e, K, method="vecaf", losses=L)`` with its defaults (E = 5 members, CEA off,
    adaptive assignment refreshes, ``tol`` 1e-4).
(c) exact: the same call with ``refresh=1, tol=0`` (assignment recomputed every step, all 300 steps):
    the quality reference for (b).

Reported: wall seconds of each and the ratio t_b / t_a (goal <= 0.5); the Eq. 7 objective F of the picks
of (b) and (c) (``vecaf.selection.ods_objective`` with the picked samples as centroids, the losses L,
lambda = 1, tau = 0.07) and |F_b - F_c| / |F_c| (goal <= 1 %); since F is a difference of two terms of
similar size, |F_b - F_c| is also given relative to the attraction term A = 1/N sum_i w_i max_s cos / tau
of (c) (w_i = L_i / mean(L)); the coverage of each selection,
mean_i min_{s in S} (1 - cos(e_i, e_s)); the overlap |S_b ∩ S_c| / K; the process's peak RSS.

    python benchmarks/selection_speed.py                            # 20000 x 384, K = 200
    python benchmarks/selection_speed.py --sizes 60000x1280x600     # the issue's large size (~20 min plain)
    python benchmarks/selection_speed.py --quick                    # smoke run (tiny sizes)

Prints the JSON and writes it to ``benchmarks/results/selection-speed.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import math
import re
import resource
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

GOAL_RATIO = 0.5
GOAL_OBJECTIVE_REL = 0.01
TEMPERATURE = 0.07
QUICK = {"sizes": "2000x64x20", "plain_iters": 50}


def size_list(text: str) -> list[tuple[int, int, int]]:
    """argparse type: comma-separated NxDxK triples with 1 <= K <= N, else an error naming the value."""
    sizes = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)\s*", part)
        if not match:
            raise argparse.ArgumentTypeError(f"expected sizes like '20000x384x200[,NxDxK...]', got {part!r}")
        n, d, k = (int(g) for g in match.groups())
        if min(n, d, k) < 1 or k > n:
            raise argparse.ArgumentTypeError(f"size {part.strip()!r} needs N, D, K >= 1 and K <= N")
        sizes.append((n, d, k))
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` overrides the sizes and the plain step count with tiny ones."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=size_list, default=size_list("20000x384x200"), help="NxDxK[,NxDxK...]")
    p.add_argument("--seed", type=int, default=0, help="seed of the pool, the losses and every selection")
    p.add_argument("--clusters", type=_common.positive_int, default=None, help="K_true (default: K)")
    p.add_argument("--spread", type=_common.positive_float, default=1.0, help="cluster spread s")
    p.add_argument("--plain-iters", type=_common.positive_int, default=300, help="Adam steps of the plain run")
    p.add_argument("--device", type=_common.device_name, default="auto")
    p.add_argument("--skip-exact", action="store_true", help="skip (c), the exact-refresh quality reference")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    p.add_argument("--out", default=str(_common.RESULTS_DIR / "selection-speed.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = size_list(QUICK["sizes"])
        args.plain_iters = QUICK["plain_iters"]
    return args


def synthetic_pool(n: int, d: int, clusters: int, *, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded clustered unit embeddings (N, D) float32 and losses (N,) ~ Gamma(2, 1) float32."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, clusters, size=n)
    e = centres[labels] + spread * rng.standard_normal((n, d)) / math.sqrt(d)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    losses = rng.gamma(2.0, 1.0, size=n)
    return e.astype(np.float32), losses.astype(np.float32)


def plain_activeft(e: np.ndarray, k: int, *, iters: int, seed: int, device: str) -> np.ndarray:
    """ActiveFT as written: autograd on the full N x K similarity, Adam, then greedy unique matching."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.as_tensor(e, dtype=torch.float32, device=device), dim=1)
    start = torch.randperm(x.shape[0], generator=generator)[:k].to(device)
    theta = torch.nn.Parameter(x[start].clone())
    optimizer = torch.optim.Adam([theta], lr=1e-3)
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=device)
    for _ in range(iters):
        t = F.normalize(theta, dim=1)
        pull = (x @ t.T).max(dim=1).values.mean() / TEMPERATURE
        mutual = (t @ t.T / TEMPERATURE).masked_select(off_diagonal).view(k, k - 1)
        loss = -pull + torch.logsumexp(mutual, dim=1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        sim = x @ F.normalize(theta, dim=1).T
        picks = []
        for j in range(k):
            column = sim[:, j].clone()
            if picks:
                column[torch.as_tensor(picks, device=device)] = -math.inf
            picks.append(int(column.argmax()))
    return np.asarray(picks, dtype=np.int64)


def coverage(e: np.ndarray, picks: np.ndarray, *, block: int = 8192) -> float:
    """mean_i min_{s in picks} (1 - cos(e_i, e_s)), in row blocks."""
    x = e / np.linalg.norm(e, axis=1, keepdims=True)
    chosen = x[picks]
    total = 0.0
    for lo in range(0, x.shape[0], block):
        total += float((1.0 - (x[lo : lo + block] @ chosen.T).max(axis=1)).sum())
    return total / x.shape[0]


def attraction(e: np.ndarray, picks: np.ndarray, losses: np.ndarray, *, block: int = 8192) -> float:
    """Eq. 7's attraction at the picks: 1/N sum_i w_i max_{s in picks} cos(e_i, e_s) / tau, w_i = L_i / mean(L)."""
    x = e / np.linalg.norm(e, axis=1, keepdims=True)
    w = losses.astype(np.float64) / float(np.mean(losses))
    chosen = x[picks]
    total = 0.0
    for lo in range(0, x.shape[0], block):
        total += float((w[lo : lo + block] * (x[lo : lo + block] @ chosen.T).max(axis=1)).sum())
    return total / (x.shape[0] * TEMPERATURE)


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def check_picks(picks: np.ndarray, n: int, k: int, name: str) -> None:
    """ValueError unless ``picks`` holds K unique indices in [0, N)."""
    if picks.shape != (k,) or np.unique(picks).shape[0] != k or picks.min() < 0 or picks.max() >= n:
        raise ValueError(f"{name} returned invalid picks: shape {picks.shape}, expected {k} unique indices < {n}")


def run_size(n: int, d: int, k: int, args: argparse.Namespace, device: str) -> dict[str, Any]:
    """The three selections at one size and their figures."""
    import vecaf
    from vecaf.selection import ods_objective

    e, losses = synthetic_pool(n, d, args.clusters or k, spread=args.spread, seed=args.seed)
    ours_options = {"method": "vecaf", "losses": losses, "seed": args.seed, "device": device}
    seconds, first = _common.interleaved(
        {
            "plain": lambda: plain_activeft(e, k, iters=args.plain_iters, seed=args.seed, device=device),
            "ours": lambda: vecaf.select(e, k, **ours_options),
        },
        repeats=1,
    )
    picks = {"plain": first["plain"], "ours": first["ours"]}
    row: dict[str, Any] = {
        "n": n, "d": d, "k": k, "clusters": args.clusters or k,
        "plain_s": seconds["plain"][0], "ours_s": seconds["ours"][0],
    }
    if not args.skip_exact:
        row["exact_s"], picks["exact"] = _common.timed(lambda: vecaf.select(e, k, **ours_options, refresh=1, tol=0.0))
    for name, chosen in picks.items():
        check_picks(np.asarray(chosen), n, k, name)
    row["ratio_ours_over_plain"] = row["ours_s"] / row["plain_s"]
    row["goal_ratio_met"] = row["ratio_ours_over_plain"] <= GOAL_RATIO
    for name, chosen in picks.items():
        row[f"objective_{name}"] = float(ods_objective(e, e[chosen], losses=losses, temperature=TEMPERATURE))
        row[f"coverage_{name}"] = coverage(e, chosen)
        row[f"attraction_{name}"] = attraction(e, chosen, losses)
    if "exact" in picks:
        row["objective_rel_diff_ours_vs_exact"] = abs(row["objective_ours"] - row["objective_exact"]) / abs(
            row["objective_exact"]
        )
        row["objective_abs_diff_ours_vs_exact"] = abs(row["objective_ours"] - row["objective_exact"])
        row["objective_abs_diff_over_attraction_exact"] = row["objective_abs_diff_ours_vs_exact"] / row[
            "attraction_exact"
        ]
        row["goal_objective_met"] = row["objective_rel_diff_ours_vs_exact"] <= GOAL_OBJECTIVE_REL
        row["overlap_ours_exact"] = np.intersect1d(picks["ours"], picks["exact"]).shape[0] / k
    row["picks"] = {name: np.asarray(chosen).tolist() for name, chosen in picks.items()}
    row["peak_rss_mib_so_far"] = peak_rss_mib()
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every size; the report holds the machine, the settings and one row per size."""
    _common.setup_path()
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = _common.machine_info()
    started = _common.utc_now()
    rows = [run_size(n, d, k, args, device) for n, d, k in args.sizes]
    machine["load_average_at_end"] = _common.load_average()
    return {
        "benchmark": "selection-speed",
        "started": started,
        "finished": _common.utc_now(),
        "machine": machine,
        "device": device,
        "seed": args.seed,
        "quick": bool(args.quick),
        "spread": args.spread,
        "plain_iters": args.plain_iters,
        "temperature": TEMPERATURE,
        "goal_ratio": GOAL_RATIO,
        "goal_objective_rel": GOAL_OBJECTIVE_REL,
        "peak_rss_mib": peak_rss_mib(),
        "sizes": rows,
        "method": (
            "one process; plain and ours timed back to back (interleaved, one round), exact after; "
            "objective = Eq. 7 (losses, lambda 1, tau 0.07) at the picked samples; "
            "coverage = mean cosine distance to the nearest pick; overlap = |ours ∩ exact| / K"
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run, print the JSON, write it to ``--out``."""
    return _common.run_and_report(parse_args, run, argv)


if __name__ == "__main__":
    main()
