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
of (b) and (c) (``vecaf.selection.ods_objective`` with the picked samples as centroids, lambda = 1,
tau = 0.07, and the weights both selections optimise, p ~ L^beta with beta = vecaf's ``loss_power``, 0.5
unless ``--ours-options`` sets it), the signed gap (F_b - F_c) / |F_c| (F is minimised, so a negative gap means (b)
reached a better objective than the exact run; goal: gap <= 1 %, i.e. (b) is never more than 1 % worse) and
|F_b - F_c| / |F_c|; since F is a difference of two terms of
similar size, |F_b - F_c| is also given relative to the attraction term A = 1/N sum_i w_i max_s cos / tau
of (c) (w_i = L_i^beta / mean(L^beta)); with several ``--seeds``, each figure's mean and s.d. per size, how many seeds
met the objective goal, and the seed-to-seed s.d. of the exact objective itself; the coverage of each selection,
mean_i min_{s in S} (1 - cos(e_i, e_s)); the overlap |S_b ∩ S_c| / K; the process's peak RSS and, on CUDA,
each selection's peak GPU memory, beside the memory goal 2 x (N x D float32) + the 256 MiB block budget; the
time of one exact assignment pass of the optimiser (N pool rows against E K = 5 K centroids: similarity, max,
scatter-add) and its achieved TFLOP/s (2 N D E K flops), beside the card's float32 and bfloat16 matmul rates
measured in the same run (an 8192^3 product on CUDA, 2048^3 on CPU).

    python benchmarks/selection_speed.py                            # 20000 x 384, K = 200
    python benchmarks/selection_speed.py --sizes 60000x1280x600     # the issue's large size (~20 min plain)
    python benchmarks/selection_speed.py --device cuda --matmul-precision high --skip-exact --plain-max-n 100000 \
        --no-picks --sizes 10000x768x100,100000x768x1000,1281167x768x12812   # scaling curve up to ImageNet-1K at 1 %
    python benchmarks/selection_speed.py --quick                    # smoke run (tiny sizes)

Prints the JSON and writes it to ``benchmarks/results/selection-speed.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
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
BLOCK_BUDGET_MIB = 256  # vecaf.selection.ods.DEFAULT_BLOCK_BYTES, the fixed block budget of goal 3
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
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="seeds of the pool, the losses and every selection (one row per size and seed)")
    p.add_argument("--ours-options", type=json.loads, default={},
                   help='extra vecaf.select options for (b) as JSON, e.g. \'{"tol": 0}\' (default: none)')
    p.add_argument("--clusters", type=_common.positive_int, default=None, help="K_true (default: K)")
    p.add_argument("--spread", type=_common.positive_float, default=1.0, help="cluster spread s")
    p.add_argument("--plain-iters", type=_common.positive_int, default=300, help="Adam steps of the plain run")
    p.add_argument("--device", type=_common.device_name, default="auto")
    p.add_argument("--skip-exact", action="store_true", help="skip (c), the exact-refresh quality reference")
    p.add_argument("--plain-max-n", type=_common.positive_int, default=None,
                   help="skip (a), the plain run, at sizes with N above this (it holds two N x K float32 matrices)")
    p.add_argument("--matmul-precision", choices=["highest", "high", "medium"], default="highest",
                   help="torch.set_float32_matmul_precision for every run (high = TF32 on CUDA)")
    p.add_argument("--no-picks", dest="keep_picks", action="store_false", help="leave the picks out of the JSON")
    p.add_argument("--no-rate", dest="measure_rate", action="store_false",
                   help="skip the timed similarity pass (two extra full passes: hours at ImageNet size on a CPU)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    p.add_argument("--out", default=str(_common.RESULTS_DIR / "selection-speed.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = size_list(QUICK["sizes"])
        args.plain_iters = QUICK["plain_iters"]
    return args


def synthetic_pool(
    n: int, d: int, clusters: int, *, spread: float, seed: int, rows: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded clustered unit embeddings (N, D) float32 and losses (N,) ~ Gamma(2, 1) float32.

    Built ``rows`` rows at a time (the same random stream as one (N, D) draw), so the float64 scratch stays
    small next to the float32 result at ImageNet size.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, clusters, size=n)
    e = np.empty((n, d), dtype=np.float32)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        block = centres[labels[lo:hi]] + spread * rng.standard_normal((hi - lo, d)) / math.sqrt(d)
        e[lo:hi] = block / np.linalg.norm(block, axis=1, keepdims=True)
    losses = rng.gamma(2.0, 1.0, size=n)
    return e, losses.astype(np.float32)


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


def _unit_torch(e: Any, device: str | None = None):
    import torch

    x = torch.as_tensor(e, dtype=torch.float32, device=device)
    return x / x.norm(dim=1, keepdim=True)


def _best_similarity(e: Any, picks: np.ndarray, block: int, device: str | None):
    """max_{s in picks} cos(e_i, e_s) for every i, as a float64 tensor, in row blocks (torch, on ``device``)."""
    import torch

    x = torch.as_tensor(e, dtype=torch.float32, device=device)  # no copy for a float32 pool already there
    chosen = _unit_torch(x[torch.as_tensor(np.asarray(picks), device=x.device)])
    return torch.cat(
        [(_unit_torch(x[lo : lo + block]) @ chosen.T).max(dim=1).values for lo in range(0, x.shape[0], block)]
    ).double()


def coverage(e: Any, picks: np.ndarray, *, block: int = 8192, device: str | None = None) -> float:
    """mean_i min_{s in picks} (1 - cos(e_i, e_s)), in row blocks (``e`` a NumPy array or a torch tensor)."""
    return float((1.0 - _best_similarity(e, picks, block, device)).mean())


def attraction(
    e: Any, picks: np.ndarray, losses: np.ndarray, *, block: int = 8192, device: str | None = None
) -> float:
    """Eq. 7's attraction at the picks: 1/N sum_i w_i max_{s in picks} cos(e_i, e_s) / tau, w_i = L_i / mean(L)
    (pass L^beta as ``losses`` for tempered weights)."""
    import torch

    best = _best_similarity(e, picks, block, device)
    w = torch.as_tensor(np.asarray(losses, dtype=np.float64), device=best.device)
    return float((w / w.mean() * best).mean()) / TEMPERATURE


def matmul_rate_tflops(device: str, dtype_name: str, *, side: int | None = None, repeats: int = 5) -> float:
    """Achieved TFLOP/s of a square side^3 product (3 warm-ups, mean of ``repeats``): the card's matmul rate.

    float32 follows torch's ``float32_matmul_precision`` (TF32 on CUDA when "high"), like the similarity step.
    On a CPU bfloat16 is measured at side 512: CPUs without native bf16 emulate it (2048^3 took ~1 min per product
    on a 2-core AMD EPYC, 8 min for the 8 products, past the smoke test's 5 min).
    """
    import time

    import torch

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    side = side or (8192 if device.startswith("cuda") else 512 if dtype_name == "bfloat16" else 2048)
    a = torch.randn(side, side, device=device).to(dtype)
    b = torch.randn(side, side, device=device).to(dtype)
    for _ in range(3):
        a @ b
    _common.sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _common.sync(device)
    return 2.0 * side**3 * repeats / (time.perf_counter() - t0) / 1e12


def similarity_step_rate(x, k: int, device: str, *, members: int = 5, seed: int = 0) -> dict[str, float]:
    """Time one exact assignment pass of ``vecaf``'s optimiser (all E*K centroids against the N pool rows, in
    blocks: similarity, max, loss-weighted scatter-add) over the pool as ``vecaf.select`` reads it (``ods.pool_rows``:
    the rows in place, 1 / ||x_i|| on the weights), and its achieved TFLOP/s, counting 2 N D E K flops."""
    import time

    import torch

    from vecaf.selection import ods

    generator = torch.Generator().manual_seed(seed)
    x, w = ods.pool_rows(x, device)
    n, d = x.shape
    theta = ods.normalize_rows(torch.randn(members, k, d, generator=generator)).to(x.device)
    rows = ods.refresh_rows(members, k, d, ods.DEFAULT_BLOCK_BYTES)
    ods._refresh(x, w, theta, rows)
    _common.sync(device)
    t0 = time.perf_counter()
    ods._refresh(x, w, theta, rows)
    _common.sync(device)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tflops": 2.0 * n * d * members * k / seconds / 1e12}


def _gpu_peak_mib(device: str) -> float | None:
    import torch

    if not device.startswith("cuda"):
        return None
    return torch.cuda.max_memory_allocated(device) / (1024.0 * 1024.0)


def _gpu_reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _status_mib(field: str) -> float | None:
    """A memory line of /proc/self/status (Linux) in MiB, or None where there is none."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def rss_mib() -> float:
    """Resident set size of this process now, in MiB (the peak where the current value is unavailable)."""
    current = _status_mib("VmRSS")
    return current if current is not None else peak_rss_mib()


def reset_peak_rss() -> bool:
    """Restart the peak-RSS high-water mark at the current RSS (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB since the last ``reset_peak_rss`` (VmHWM; ``ru_maxrss``,
    KiB on Linux and bytes on macOS, where /proc is missing)."""
    peak = _status_mib("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def check_picks(picks: np.ndarray, n: int, k: int, name: str) -> None:
    """ValueError unless ``picks`` holds K unique indices in [0, N)."""
    if picks.shape != (k,) or np.unique(picks).shape[0] != k or picks.min() < 0 or picks.max() >= n:
        raise ValueError(f"{name} returned invalid picks: shape {picks.shape}, expected {k} unique indices < {n}")


def run_size(n: int, d: int, k: int, args: argparse.Namespace, device: str, seed: int) -> dict[str, Any]:
    """The selections at one size and seed and their figures (plain skipped above ``--plain-max-n``)."""
    import torch

    import vecaf
    from vecaf.selection import ods_objective

    e, losses = synthetic_pool(n, d, args.clusters or k, spread=args.spread, seed=seed)
    ours_options = {"method": "vecaf", "losses": losses, "seed": seed, "device": device}
    ours_extra = dict(args.ours_options)
    gpu_peaks: dict[str, float | None] = {}
    rss_peaks: dict[str, float] = {}

    def measured(name: str, fn):
        def call():
            _gpu_reset_peak(device)
            reset_peak_rss()
            out = fn()
            _common.sync(device)
            gpu_peaks[name] = _gpu_peak_mib(device)
            rss_peaks[name] = peak_rss_mib() - args.rss_baseline_mib  # the pool is resident: it counts
            return out

        return call

    runs = {"ours": measured("ours", lambda: vecaf.select(e, k, **ours_options, **ours_extra))}
    with_plain = args.plain_max_n is None or n <= args.plain_max_n
    if with_plain:
        plain = lambda: plain_activeft(e, k, iters=args.plain_iters, seed=seed, device=device)  # noqa: E731
        runs = {"plain": measured("plain", plain), **runs}
    seconds, first = _common.interleaved(runs, repeats=1)
    picks = dict(first)
    row: dict[str, Any] = {
        "n": n, "d": d, "k": k, "clusters": args.clusters or k, "seed": seed,
        "plain_s": seconds["plain"][0] if with_plain else None, "ours_s": seconds["ours"][0],
    }
    if not args.skip_exact:
        exact = measured("exact", lambda: vecaf.select(e, k, **ours_options, refresh=1, tol=0.0))
        row["exact_s"], picks["exact"] = _common.timed(exact)
    for name, chosen in picks.items():
        check_picks(np.asarray(chosen), n, k, name)
    row["ratio_ours_over_plain"] = row["ours_s"] / row["plain_s"] if with_plain else None
    row["goal_ratio_met"] = row["ratio_ours_over_plain"] <= GOAL_RATIO if with_plain else None
    x = torch.as_tensor(e, device=device)
    # F with the weights the selections optimise: p ~ L^beta, beta = vecaf's loss_power (default 0.5)
    row["loss_power"] = float(ours_extra.get("loss_power", default_loss_power()))
    weights = losses.astype(np.float64) ** row["loss_power"]
    for name, chosen in picks.items():
        chosen_t = torch.as_tensor(np.asarray(chosen), device=device)
        row[f"objective_{name}"] = float(ods_objective(x, x[chosen_t], losses=weights, temperature=TEMPERATURE))
        row[f"coverage_{name}"] = coverage(x, chosen)
        row[f"attraction_{name}"] = attraction(x, chosen, weights)
    if "exact" in picks:
        row["objective_rel_diff_ours_vs_exact"] = abs(row["objective_ours"] - row["objective_exact"]) / abs(
            row["objective_exact"]
        )
        row["objective_abs_diff_ours_vs_exact"] = abs(row["objective_ours"] - row["objective_exact"])
        row["objective_abs_diff_over_attraction_exact"] = row["objective_abs_diff_ours_vs_exact"] / row[
            "attraction_exact"
        ]
        row["objective_gap_ours_minus_exact_rel"] = (row["objective_ours"] - row["objective_exact"]) / abs(
            row["objective_exact"]
        )
        row["goal_objective_met"] = row["objective_gap_ours_minus_exact_rel"] <= GOAL_OBJECTIVE_REL
        row["overlap_ours_exact"] = np.intersect1d(picks["ours"], picks["exact"]).shape[0] / k
    if args.measure_rate:
        step = similarity_step_rate(x, k, device, seed=seed)
        row["similarity_step_s"] = step["seconds"]
        row["similarity_step_tflops"] = step["tflops"]
    row["embedding_mib"] = n * d * 4 / (1024.0 * 1024.0)
    row["memory_goal_mib"] = 2 * row["embedding_mib"] + BLOCK_BUDGET_MIB
    row["gpu_peak_mib"] = gpu_peaks
    row["picks"] = {name: np.asarray(chosen).tolist() for name, chosen in picks.items()} if args.keep_picks else None
    # each run's peak RSS above the process before any pool existed: the caller's pool plus what the run added
    row["rss_peak_above_baseline_mib"] = rss_peaks
    peak = gpu_peaks.get("ours") if device.startswith("cuda") else rss_peaks["ours"]
    row["memory_goal_met"] = peak <= row["memory_goal_mib"]
    del x
    return row


def default_loss_power() -> float:
    """beta of the ``vecaf`` strategy's loss weights p ~ L^beta when the caller passes none."""
    import dataclasses

    from vecaf.selection.methods import VeCAF

    return float(next(f.default for f in dataclasses.fields(VeCAF) if f.name == "loss_power"))


def warm_up(device: str) -> None:
    """One untimed tiny run of (a) and (b): lazy imports (and on CUDA the context, cuBLAS handles) out of the timings."""
    import vecaf

    e, losses = synthetic_pool(512, 32, 8, spread=1.0, seed=0)
    plain_activeft(e, 8, iters=3, seed=0, device=device)
    vecaf.select(e, 8, method="vecaf", losses=losses, seed=0, device=device, max_iters=3)


def seed_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size over its seeds: mean and sample s.d. of the ratio, the objectives, |F_b - F_c| / |F_c| and the
    overlap, and how far the exact objective itself moves from seed to seed (s.d. / |mean|)."""
    out = []
    sizes = sorted({(r["n"], r["d"], r["k"]) for r in rows}, key=lambda s: [r["n"] for r in rows].index(s[0]))
    for n, d, k in sizes:
        group = [r for r in rows if (r["n"], r["d"], r["k"]) == (n, d, k)]
        entry: dict[str, Any] = {"n": n, "d": d, "k": k, "seeds": [r["seed"] for r in group]}
        for key in ("ratio_ours_over_plain", "objective_ours", "objective_exact", "objective_rel_diff_ours_vs_exact",
                    "objective_gap_ours_minus_exact_rel",
                    "objective_abs_diff_over_attraction_exact", "overlap_ours_exact", "coverage_ours", "coverage_exact"):
            values = [r[key] for r in group if r.get(key) is not None]
            if values:
                arr = np.asarray(values, dtype=np.float64)
                entry[key] = {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if arr.size > 1 else 0.0}
        gaps = [r["objective_gap_ours_minus_exact_rel"] for r in group if "objective_gap_ours_minus_exact_rel" in r]
        if gaps:
            entry["seeds_ours_at_most_1pct_worse"] = f"{sum(g <= GOAL_OBJECTIVE_REL for g in gaps)}/{len(gaps)}"
        exact = entry.get("objective_exact")
        if exact and len(group) > 1:
            entry["exact_objective_seed_sd_over_abs_mean"] = exact["sd"] / abs(exact["mean"])
        out.append(entry)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every size; the report holds the machine, the settings and one row per size."""
    _common.setup_path()
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_float32_matmul_precision(args.matmul_precision)
    machine = _common.machine_info()
    machine["matmul_tflops_measured"] = {
        "float32": matmul_rate_tflops(device, "float32"),
        "bfloat16": matmul_rate_tflops(device, "bfloat16"),
    }
    started = _common.utc_now()
    warm_up(device)
    args.rss_baseline_mib = rss_mib()  # the process after imports and the warm-up, before any pool exists
    peak_resettable = reset_peak_rss()
    rows = [run_size(n, d, k, args, device, seed) for n, d, k in args.sizes for seed in args.seeds]
    machine["load_average_at_end"] = _common.load_average()
    return {
        "benchmark": "selection-speed",
        "started": started,
        "finished": _common.utc_now(),
        "machine": machine,
        "device": device,
        "seeds": args.seeds,
        "ours_options": args.ours_options,
        "quick": bool(args.quick),
        "spread": args.spread,
        "plain_iters": args.plain_iters,
        "plain_max_n": args.plain_max_n,
        "matmul_precision": args.matmul_precision,
        "temperature": TEMPERATURE,
        "goal_ratio": GOAL_RATIO,
        "goal_objective_rel": GOAL_OBJECTIVE_REL,
        "rss_baseline_mib": args.rss_baseline_mib,
        "rss_peak_per_run": peak_resettable,
        "sizes": rows,
        "per_size": seed_summary(rows),
        "method": (
            "one process; plain and ours timed back to back (interleaved, one round), exact after; "
            "objective = Eq. 7 (weights L^loss_power, lambda 1, tau 0.07) at the picked samples; "
            "coverage = mean cosine distance to the nearest pick; overlap = |ours ∩ exact| / K"
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run, print the JSON, write it to ``--out``."""
    return _common.run_and_report(parse_args, run, argv)


if __name__ == "__main__":
    main()
