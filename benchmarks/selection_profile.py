"""Where VeCAF's selection spends its time at the headroom benchmark's pool, and what bfloat16 saves.

One ``vecaf.select(e, K, method="vecaf", losses=L, seed=s)`` with its defaults (E = 5 members, no
captions) runs twice per seed in one process, interleaved (``precision="float32"``, the exact
computation, and ``precision="bfloat16"``: assignment refreshes by a bfloat16 product with every move
checked in float32, see ``vecaf.selection.ods.nearest_centroids``). Each run is split into its phases by
timing the library functions it calls:

- ``refresh``: the N x (E K) nearest-centroid assignments (``ods._refresh``), with their count;
- ``diversity``: the K x K log-sum-exp term of Eq. 7 and its gradient (``ods._diversity``), with its count;
- ``debias``: aligning the members and theta* (``ensemble.debias``);
- ``match``: nearest available sample per centroid (``matching.match_centroids``);
- ``other``: the rest (pool read, weights, initial samples, Adam updates).

Reported per precision: wall seconds and phases (median over seeds), Adam iterations and refreshes; the
ratio t_bfloat16 / t_float32 of the whole selection and of the refresh phase; and the quality tolerance:
the Eq. 7 objective F at the picked samples (``ods_objective`` with the picks as centroids, weights
L^0.5 as the selection optimises, lambda 1, tau 0.07), the signed gap (F_bf16 - F_f32) / |F_f32|
(F is minimised: negative means bfloat16 did better), the same difference over the attraction term
A = (1/(N tau)) sum_i w_i max_s cos(e_i, e_s) of the float32 picks (F is a difference of two terms of similar
size, so |F| can be small), and the overlap |S_bf16 ∩ S_f32| / K.

Pool: the headroom benchmark's cached Fashion-MNIST EfficientNet-Lite0 64 px features
(``.vecaf/cache/headroom``, N = 60,000, D = 1,280; ``python benchmarks/quality_headroom.py`` creates them),
or, when absent or with ``--quick``, a seeded synthetic clustered pool. Losses: L_i ~ Gamma(2, 1), seeded.

    python benchmarks/selection_profile.py                    # K = 600 (1 % of 60k), seeds 0 1
    python benchmarks/selection_profile.py --k 1200 --seeds 0 # 2 %
    python benchmarks/selection_profile.py --quick            # CI smoke (synthetic 2,000 x 64, K = 20)

Prints the JSON and writes ``benchmarks/results/selection-profile[-quick].json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

_common.setup_path()

FEATURES = _common.REPO / ".vecaf" / "cache" / "headroom" / "fashion-mnist_train_all_efficientnet_lite0_64px.npz"
PHASES = {"refresh": ("ods", "_refresh"), "diversity": ("ods", "_diversity"), "debias": ("ensemble", "debias"),
          "match": ("matching", "match_centroids")}
PRECISIONS = ("float32", "bfloat16")
QUICK = {"n": 2000, "d": 64, "k": 20, "seeds": [0]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=_common.positive_int, default=600, help="budget K (default 600 = 1 %% of 60k)")
    p.add_argument("--n", type=_common.positive_int, help="use the first N pool rows only")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=_common.positive_int, default=1)
    p.add_argument("--quick", action="store_true", help="synthetic 2,000 x 64 pool, K = 20, one seed")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.k, args.seeds = QUICK["k"], QUICK["seeds"]
    suffix = "-quick" if args.quick else ""
    args.out = args.out or _common.RESULTS_DIR / f"selection-profile{suffix}.json"
    return args


def synthetic_pool(n: int, d: int, seed: int = 0) -> np.ndarray:
    """n rows around n // 50 Gaussian centres (non-negative, like pooled ReLU features), float32."""
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.normal(size=(max(2, n // 50), d)))
    return (centres[rng.integers(0, centres.shape[0], n)] + 0.5 * np.abs(rng.normal(size=(n, d)))).astype(np.float32)


def pool(args) -> tuple[np.ndarray, str]:
    if not args.quick and FEATURES.is_file():
        x = np.load(FEATURES)["features"]
        return (x[: args.n] if args.n else x), f"{FEATURES.name} (headroom cache)"
    n = args.n or QUICK["n"]
    return synthetic_pool(n, QUICK["d"]), f"synthetic clustered {n} x {QUICK['d']}"


class PhaseClock:
    """Wraps the library functions of ``PHASES`` so that each call's wall time and count are added up."""

    def __init__(self) -> None:
        from vecaf.selection import ensemble, matching, methods, ods

        self.modules = {"ods": ods, "ensemble": ensemble, "matching": matching, "methods": methods}
        self.seconds = {name: 0.0 for name in PHASES}
        self.calls = {name: 0 for name in PHASES}
        self.result = None
        self._saved: list[tuple[Any, str, Any]] = []

    def _wrap(self, name: str, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1
        return timed

    def __enter__(self) -> "PhaseClock":
        ods = self.modules["ods"]
        for name, (module, attr) in PHASES.items():
            target = self.modules[module]
            self._saved.append((target, attr, getattr(target, attr)))
            setattr(target, attr, self._wrap(name, getattr(target, attr)))
        optimize = ods.optimize_ods

        def keep_result(*a, **kw):
            self.result = optimize(*a, **kw)
            return self.result

        self._saved.append((ods, "optimize_ods", optimize))
        ods.optimize_ods = keep_result
        return self

    def __exit__(self, *exc) -> None:
        for target, attr, fn in reversed(self._saved):
            setattr(target, attr, fn)


def run_once(x: np.ndarray, losses: np.ndarray, k: int, seed: int, precision: str) -> dict[str, Any]:
    import vecaf

    with PhaseClock() as clock:
        t0 = time.perf_counter()
        picks = vecaf.select(x, k, method="vecaf", losses=losses, seed=seed, precision=precision)
        wall = time.perf_counter() - t0
    phases = dict(clock.seconds)
    phases["other"] = wall - sum(phases.values())
    return {"seed": seed, "precision": precision, "wall_s": wall, "phases_s": phases, "calls": dict(clock.calls),
            "iterations": clock.result.iterations, "refreshes": clock.result.refreshes,
            "converged": clock.result.converged, "picks": np.asarray(picks).tolist()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from vecaf.selection import ods

    info = _common.machine_info()
    x, source = pool(args)
    runs = []
    for i, seed in enumerate(args.seeds):
        losses = np.random.default_rng(1000 + seed).gamma(2.0, 1.0, size=x.shape[0])
        order = PRECISIONS if i % 2 == 0 else PRECISIONS[::-1]
        pair = {p: run_once(x, losses, args.k, seed, p) for p in order}
        objective = {p: float(ods.ods_objective(x, x[pair[p]["picks"]], losses=np.sqrt(losses))) for p in PRECISIONS}
        attraction = -float(ods.ods_objective(x, x[pair["float32"]["picks"]], losses=np.sqrt(losses), lam=0.0))
        for p in PRECISIONS:
            pair[p]["objective_at_picks"] = objective[p]
            runs.append(pair[p])
        runs[-1]["gap_vs_float32"] = runs[-2]["gap_vs_float32"] = (objective["bfloat16"] - objective["float32"]) / abs(objective["float32"])
        runs[-1]["gap_over_attraction"] = runs[-2]["gap_over_attraction"] = (objective["bfloat16"] - objective["float32"]) / attraction
        overlap = len(np.intersect1d(pair["bfloat16"]["picks"], pair["float32"]["picks"])) / args.k
        runs[-1]["overlap"] = runs[-2]["overlap"] = overlap
        print(f"seed {seed}: " + ", ".join(f"{p} {pair[p]['wall_s']:.1f}s" for p in PRECISIONS)
              + f", gap {runs[-1]['gap_vs_float32']:+.2e}, overlap {overlap:.3f}", file=sys.stderr, flush=True)
    per = {}
    for p in PRECISIONS:
        mine = [r for r in runs if r["precision"] == p]
        per[p] = {
            "wall_s": _common.median([r["wall_s"] for r in mine]),
            "phases_s": {name: _common.median([r["phases_s"][name] for r in mine]) for name in [*PHASES, "other"]},
            "iterations": [r["iterations"] for r in mine],
            "refreshes": [r["refreshes"] for r in mine],
        }
    f32, b16 = per["float32"], per["bfloat16"]
    report = {
        "benchmark": "selection-profile",
        "started": info,
        "pool": {"source": source, "n": int(x.shape[0]), "d": int(x.shape[1]), "k": args.k, "losses": "Gamma(2, 1), seeded"},
        "options": {"method": "vecaf", "defaults": "E = 5, no captions, loss_power 0.5, lam 1, tau 0.07, adaptive refresh, tol 1e-4"},
        "seeds": args.seeds,
        "fast_bfloat16": ods.fast_bfloat16("cpu"),
        "per_precision": per,
        "ratio_bfloat16_over_float32": b16["wall_s"] / f32["wall_s"],
        "ratio_refresh_bfloat16_over_float32": b16["phases_s"]["refresh"] / f32["phases_s"]["refresh"],
        "objective_gap": {"per_seed": [r["gap_vs_float32"] for r in runs[::2]], "max": max(r["gap_vs_float32"] for r in runs)},
        "objective_gap_over_attraction": {"per_seed": [r["gap_over_attraction"] for r in runs[::2]]},
        "overlap": {"per_seed": [r["overlap"] for r in runs[::2]]},
        "tolerance": "objective at the picks within 1 % of the float32 run's (signed gap <= 0.01)",
        "runs": runs,
        "load_average_at_end": _common.load_average(),
    }
    _common.write_json(report, args.out)
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))
    return report


if __name__ == "__main__":
    main()
