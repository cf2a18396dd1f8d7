"""``benchmarks/selection_speed.py``: one ``--quick`` run end to end, its helpers against hand computations.

The quick run (N = 2000, D = 64, K = 20, 50 plain steps; ~20 s on two idle cores, mostly importing torch)
runs in a subprocess writing to a temp folder; the tests check that every figure is a finite number, that
each selection is K unique pool indices, and that the derived figures (ratio, relative objective
difference, overlap, coverage) agree with the raw ones recomputed here. No timing is asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "selection_speed.py"
NUMBERS = [
    "n", "d", "k", "clusters", "plain_s", "ours_s", "exact_s", "ratio_ours_over_plain", "objective_plain",
    "objective_ours", "objective_exact", "objective_rel_diff_ours_vs_exact", "coverage_plain", "coverage_ours",
    "coverage_exact", "attraction_plain", "attraction_ours", "attraction_exact", "objective_abs_diff_ours_vs_exact",
    "objective_abs_diff_over_attraction_exact", "overlap_ours_exact", "embedding_mib", "memory_goal_mib",
]


def _load_script():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("selection_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "selection.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=out.parent, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_quick_run_reports_every_figure_as_a_finite_number(report):
    assert report["quick"] is True and len(report["sizes"]) == 1
    row = report["sizes"][0]
    for key in NUMBERS:
        assert _is_number(row[key]), (key, row.get(key))
    assert _is_number(report["rss_baseline_mib"]) and report["rss_baseline_mib"] > 0
    # each run's own RSS peak holds at least the pool it reads (2000 x 64 float32)
    assert set(row["rss_peak_above_baseline_mib"]) == {"plain", "ours", "exact"}
    for peak in row["rss_peak_above_baseline_mib"].values():
        assert _is_number(peak) and peak >= row["embedding_mib"] * (1 - 1e-6) - 1.0
    assert isinstance(row["memory_goal_met"], bool)
    assert isinstance(row["goal_ratio_met"], bool) and isinstance(row["goal_objective_met"], bool)
    assert report["machine"]["torch_threads"] >= 1


@pytest.mark.slow
def test_quick_run_picks_are_valid_and_derived_figures_agree(report):
    row = report["sizes"][0]
    n, k = row["n"], row["k"]
    assert (n, row["d"], k) == (2000, 64, 20)
    for name in ("plain", "ours", "exact"):
        picks = row["picks"][name]
        assert len(picks) == k and len(set(picks)) == k
        assert all(isinstance(i, int) and 0 <= i < n for i in picks)
    assert row["ratio_ours_over_plain"] == pytest.approx(row["ours_s"] / row["plain_s"])
    rel = abs(row["objective_ours"] - row["objective_exact"]) / abs(row["objective_exact"])
    assert row["objective_rel_diff_ours_vs_exact"] == pytest.approx(rel)
    signed = (row["objective_ours"] - row["objective_exact"]) / abs(row["objective_exact"])
    assert row["objective_gap_ours_minus_exact_rel"] == pytest.approx(signed)
    assert row["goal_objective_met"] == (signed <= 0.01)
    gap = abs(row["objective_ours"] - row["objective_exact"])
    assert row["objective_abs_diff_over_attraction_exact"] == pytest.approx(gap / row["attraction_exact"])
    shared = len(set(row["picks"]["ours"]) & set(row["picks"]["exact"]))
    assert row["overlap_ours_exact"] == pytest.approx(shared / k)
    for name in ("plain", "ours", "exact"):
        assert 0.0 <= row[f"coverage_{name}"] <= 2.0


@pytest.mark.slow
def test_quick_run_coverage_and_objective_match_an_independent_computation(report):
    module = _load_script()
    row = report["sizes"][0]
    e, losses = module.synthetic_pool(row["n"], row["d"], row["clusters"], spread=report["spread"], seed=row["seed"])
    picks = np.asarray(row["picks"]["ours"])
    x = e.astype(np.float64)
    sim = x @ x[picks].T
    assert row["coverage_ours"] == pytest.approx(float(np.mean(1.0 - sim.max(axis=1))), rel=1e-4)
    tau = report["temperature"]
    assert row["loss_power"] == 0.5  # vecaf's default: the objective uses the weights the selections optimise
    powered = losses.astype(np.float64) ** 0.5
    w = powered / powered.mean()
    attraction = float(np.mean(w * sim.max(axis=1))) / tau
    assert row["attraction_ours"] == pytest.approx(attraction, rel=1e-4)
    c = x[picks] @ x[picks].T / tau
    k = len(picks)
    diversity = np.mean([math.log(sum(math.exp(c[a, b]) for b in range(k) if b != a)) for a in range(k)])
    assert row["objective_ours"] == pytest.approx(-attraction + diversity, rel=1e-3, abs=1e-3)


def test_coverage_matches_a_plain_loop():
    module = _load_script()
    rng = np.random.default_rng(1)
    e = rng.standard_normal((13, 4)).astype(np.float32)
    picks = np.array([2, 7, 11])
    unit = [v / math.sqrt(sum(float(t) ** 2 for t in v)) for v in e]
    expected = 0.0
    for u in unit:
        expected += min(1.0 - sum(float(a) * float(b) for a, b in zip(u, unit[s])) for s in picks)
    assert module.coverage(e, picks, block=5) == pytest.approx(expected / len(e), rel=1e-5)


def test_synthetic_pool_is_seeded_unit_norm_with_positive_losses():
    module = _load_script()
    e, losses = module.synthetic_pool(50, 8, 3, spread=0.5, seed=4)
    again, _ = module.synthetic_pool(50, 8, 3, spread=0.5, seed=4)
    other, _ = module.synthetic_pool(50, 8, 3, spread=0.5, seed=5)
    assert e.shape == (50, 8) and losses.shape == (50,)
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert np.all(losses > 0)
    assert np.array_equal(e, again) and not np.array_equal(e, other)


def test_plain_activeft_returns_k_unique_indices():
    module = _load_script()
    e, _ = module.synthetic_pool(200, 16, 5, spread=0.5, seed=0)
    picks = module.plain_activeft(e, 10, iters=3, seed=0, device="cpu")
    assert picks.shape == (10,) and np.unique(picks).shape[0] == 10
    assert picks.min() >= 0 and picks.max() < 200


def test_size_list_parses_and_rejects_bad_sizes():
    module = _load_script()
    assert module.size_list("20000x384x200, 10x2x3") == [(20000, 384, 200), (10, 2, 3)]
    for bad in ("20000x384", "ax2x3", "10x2x0", "5x2x6", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            module.size_list(bad)


def test_synthetic_pool_in_row_blocks_is_the_same_draw():
    module = _load_script()
    whole, losses = module.synthetic_pool(70, 6, 4, spread=0.7, seed=9, rows=1000)
    blocks, losses_b = module.synthetic_pool(70, 6, 4, spread=0.7, seed=9, rows=16)
    assert np.array_equal(whole, blocks) and np.array_equal(losses, losses_b)


def test_seed_summary_gives_mean_and_sample_sd_per_size():
    module = _load_script()
    rows = [
        {"n": 10, "d": 2, "k": 3, "seed": 0, "ratio_ours_over_plain": 0.2, "objective_exact": -1.0},
        {"n": 10, "d": 2, "k": 3, "seed": 1, "ratio_ours_over_plain": 0.4, "objective_exact": -3.0},
        {"n": 20, "d": 2, "k": 3, "seed": 0, "ratio_ours_over_plain": None, "objective_exact": 5.0},
    ]
    first, second = module.seed_summary(rows)
    assert (first["n"], first["seeds"]) == (10, [0, 1]) and (second["n"], second["seeds"]) == (20, [0])
    assert first["ratio_ours_over_plain"]["mean"] == pytest.approx(0.3)
    assert first["ratio_ours_over_plain"]["sd"] == pytest.approx(0.1414213562)  # sqrt(((0.1)^2 * 2) / 1)
    assert first["exact_objective_seed_sd_over_abs_mean"] == pytest.approx(1.4142135624 / 2.0)
    assert "ratio_ours_over_plain" not in second and second["objective_exact"] == {"mean": 5.0, "sd": 0.0}
