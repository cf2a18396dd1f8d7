"""Speed benchmarks of the data path and the engine: the scripts run end to end on tiny sizes, helpers by hand.

``benchmarks/extract_speed.py``, ``benchmarks/feast_speed.py`` and ``benchmarks/engine_speed.py`` run with
``--quick`` in subprocesses (started together, to share the wait) writing to a temp folder; the tests check that every figure the
issue asks for is in the JSON as a finite number and that the derived figures agree with the raw ones
(rates r = N / t, ratios recomputed from the per-round seconds). No timing is asserted. The three runs
take ~40 s on two idle cores (mostly importing torch, timm and Feast), hence the ``slow`` mark.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
EXTRACT_NUMBERS = [
    "n_images", "batch_size", "image_size", "embedding_dim", "plain_images_per_s", "ours_images_per_s",
    "ratio_ours_over_plain", "ratio_of_median_rates", "max_abs_diff", "rtol", "atol",
]
FEAST_NUMBERS = [
    "n_rows", "embedding_dim", "compute_images_per_s", "write_rows_per_s", "materialize_rows_per_s",
    "write_and_materialize_rows_per_s", "read_rows_per_s", "apply_s", "lookup_latency_ms_median",
    "lookup_latency_ms_p95", "batch_lookup_rows_per_s", "ratio_store_over_compute",
    "ratio_store_over_compute_without_apply",
]


def _load_bench(filename: str):
    """A benchmark script as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_" + Path(filename).stem, BENCH / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    runs = {
        "extract": [sys.executable, str(BENCH / "extract_speed.py"), "--quick", "--out", str(out / "extract.json")],
        "feast": [sys.executable, str(BENCH / "feast_speed.py"), "--quick", "--out", str(out / "feast.json")],
        "engine": [sys.executable, str(BENCH / "engine_speed.py"), "--quick", "--out", str(out / "engine.json")],
    }
    procs = {
        name: subprocess.Popen(cmd, cwd=out, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, cmd in runs.items()
    }
    outputs = {name: proc.communicate(timeout=600)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name} failed:\n{outputs[name][-4000:]}"
    return {name: json.loads((out / f"{name}.json").read_text()) for name in runs}


@pytest.mark.slow
def test_extract_report_has_every_figure_as_a_number(reports):
    report = reports["extract"]
    for key in EXTRACT_NUMBERS:
        assert _is_number(report[key]), (key, report.get(key))
    assert report["n_images"] == 16 and report["batch_size"] == 8 and report["image_size"] == 32
    assert report["embedding_dim"] == 1280
    assert isinstance(report["allclose"], bool) and isinstance(report["meets_goal"], bool)
    for key in ("load_average_at_start", "cpu", "torch", "cpu_count"):
        assert key in report["machine"]


@pytest.mark.slow
def test_extract_figures_agree_with_the_per_round_seconds(reports):
    report = reports["extract"]
    n = report["n_images"]
    plain_s, ours_s = report["plain"]["seconds_runs"], report["ours"]["seconds_runs"]
    assert len(plain_s) == len(ours_s) == report["repeats"] == 2
    assert report["plain"]["per_s_runs"] == pytest.approx([n / t for t in plain_s])
    assert report["plain_images_per_s"] == pytest.approx((n / plain_s[0] + n / plain_s[1]) / 2)
    assert report["ours_images_per_s"] == pytest.approx((n / ours_s[0] + n / ours_s[1]) / 2)
    paired = [plain_s[0] / ours_s[0], plain_s[1] / ours_s[1]]
    assert report["ratio_ours_over_plain"] == pytest.approx((paired[0] + paired[1]) / 2)
    assert report["ratio_of_median_rates"] == pytest.approx(report["ours_images_per_s"] / report["plain_images_per_s"])


@pytest.mark.slow
def test_extract_embeddings_match_the_plain_loop(reports):
    report = reports["extract"]
    assert report["allclose"] is True
    assert 0.0 <= report["max_abs_diff"] <= report["atol"] + report["rtol"] * report["max_abs_value"]


@pytest.mark.slow
def test_engine_report_rates_follow_from_its_seconds(reports):
    report = reports["engine"]
    settings = report["settings"]
    assert report["device"] == "cpu" and [r["precision"] for r in report["rows"]] == ["float32"]
    images = settings["batches"] * settings["batch_size"]
    for row in report["rows"]:
        engine = row["engine"]
        assert row["plain_images_per_s"] == pytest.approx(images / row["plain_s"])
        assert engine["train_images_per_s"] == pytest.approx(images / engine["seconds"]["train"])
        assert engine["overall_images_per_s"] == pytest.approx(images / engine["seconds"]["total"])
        assert row["ratio_engine_train_over_plain"] == pytest.approx(
            engine["train_images_per_s"] / row["plain_images_per_s"]
        )
        assert 0.0 <= engine["top1"] <= 1.0 and engine["amp"] is False
        for phase in ("pass", "select", "train", "eval", "total"):
            assert _is_number(engine["seconds"][phase]) and engine["seconds"][phase] >= 0
    assert report["compiled"] is None


@pytest.mark.slow
def test_feast_report_has_every_figure_as_a_number(reports):
    report = reports["feast"]
    for key in FEAST_NUMBERS:
        assert _is_number(report[key]), (key, report.get(key))
    assert report["n_rows"] == 48 and report["source"] == "embed" and report["embedding_dim"] == 1280
    for step in ("compute", "write", "apply", "materialize", "read"):
        assert _is_number(report["steps"][step]["rows_per_s"]) and _is_number(report["steps"][step]["seconds"])
    assert "load_average_at_start" in report["machine"]


@pytest.mark.slow
def test_feast_ratio_is_store_time_over_compute_time(reports):
    report = reports["feast"]
    (one,) = report["rounds"]
    expected = (one["write_s"] + one["apply_s"] + one["materialize_s"]) / one["compute_s"]
    assert one["ratio"] == pytest.approx(expected)
    assert report["ratio_store_over_compute"] == pytest.approx(expected)
    assert report["write_rows_per_s"] == pytest.approx(48 / one["write_s"])
    assert report["materialize_rows_per_s"] == pytest.approx(48 / one["materialize_s"])
    assert report["meets_goal"] is (expected <= 1.0)


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("extract_speed.py", ["--n", "0"], "positive integer"),
        ("extract_speed.py", ["--batch-size", "x"], "positive integer"),
        ("extract_speed.py", ["--device", "tpu"], "expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ("feast_speed.py", ["--repeats", "-1"], "positive integer"),
        ("engine_speed.py", ["--batches", "10"], "multiple of the 3 loops"),
        ("engine_speed.py", ["--image-size", "0"], "positive integer"),
        ("feast_speed.py", ["--source", "s3"], "invalid choice"),
        ("feast_speed.py", ["--images-per-s", "100"], "only applies to --source random"),
        ("quality_headroom.py", ["--merge", "a.json", "--relabel", "vecaf-ods"], "--relabel takes OLD=NEW pairs"),
    ],
)
def test_bad_options_are_refused_with_a_message(script, args, message, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--out", str(tmp_path / "x.json")],
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_median_by_hand():
    common = _load_bench("_common.py")
    assert common.median([3.0, 1.0, 2.0]) == 2.0
    assert common.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert common.median([7]) == 7.0
    with pytest.raises(ValueError, match="empty"):
        common.median([])


def test_interleaved_alternates_the_order_and_keeps_the_first_results():
    common = _load_bench("_common.py")
    calls: list[str] = []

    def make(name):
        def fn():
            calls.append(name)
            return f"{name}{len(calls)}"

        return fn

    seconds, first = common.interleaved({"a": make("a"), "b": make("b")}, repeats=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert first == {"a": "a1", "b": "b2"}
    assert [len(v) for v in seconds.values()] == [3, 3] and all(t >= 0 for v in seconds.values() for t in v)
    with pytest.raises(ValueError, match="repeats"):
        common.interleaved({"a": make("a")}, repeats=0)
    with pytest.raises(ValueError, match="no approaches"):
        common.interleaved({}, repeats=1)


def test_cpu_generation_reads_family_model_and_avx512_from_cpuinfo():
    common = _load_bench("_common.py")
    info = common.cpu_generation()
    assert set(info) <= {"family", "model_number", "avx512"}
    if Path("/proc/cpuinfo").exists():
        text = Path("/proc/cpuinfo").read_text()
        flags = next(line for line in text.splitlines() if line.startswith("flags")).split()
        assert info["avx512"] is ("avx512f" in flags)
        family = next(line for line in text.splitlines() if line.startswith("cpu family"))
        assert info["family"] == family.split(":", 1)[1].strip()


def test_machine_info_names_the_cpu_generation_precision_and_when_the_load_was_read():
    from vecaf.selection import ods

    common = _load_bench("_common.py")
    start, end = common.machine_info(), common.machine_info(at="end")
    assert "load_average_at_start" in start and "load_average_at_end" not in start
    assert "load_average_at_end" in end and "load_average_at_start" not in end
    assert start["cpu"] == common.cpu_model() and start["cpu_generation"] == common.cpu_generation()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert start["selection_precision"] == ods.resolve_precision("auto", device) in ("float32", "bfloat16")


def test_rate_summary_is_n_over_seconds():
    common = _load_bench("_common.py")
    summary = common.rate_summary(100, [2.0, 4.0, 5.0])
    assert summary["per_s_runs"] == [50.0, 25.0, 20.0]
    assert summary["per_s"] == 25.0


def test_save_npz_replaces_the_cache_whole_or_leaves_the_old_one(tmp_path):
    common = _load_bench("_common.py")
    path = tmp_path / "cache" / "features.npz"
    common.save_npz(path, features=np.arange(6, dtype=np.float32).reshape(2, 3), ids=np.array(["a", "b"]))
    stored = np.load(path)
    np.testing.assert_array_equal(stored["features"], [[0, 1, 2], [3, 4, 5]])
    assert list(stored["ids"]) == ["a", "b"]

    class Unwritable:
        def __array__(self, dtype=None, copy=None):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        common.save_npz(path, features=np.zeros((2, 3), dtype=np.float32), ids=Unwritable())
    np.testing.assert_array_equal(np.load(path)["features"], [[0, 1, 2], [3, 4, 5]])  # the old cache, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["features.npz"]  # no temporary file left


# --- quality_headroom.py (issue 14) -----------------------------------------------------------------------


def test_headroom_time_to_accuracy_by_hand():
    headroom = _load_bench("quality_headroom.py")
    loops = [
        {"end_batches": 10, "batches": 10, "seconds": {"pass": 1.0, "select": 4.0, "train": 2.0, "eval": 9.0}},
        {"end_batches": 20, "batches": 10, "seconds": {"pass": 1.0, "select": 6.0, "train": 3.0, "eval": 9.0}},
    ]
    curve = [[0, 0.1, 0], [5, 0.3, 0], [10, 0.5, 0], [15, 0.6, 0], [20, 0.7, 0]]
    run = {"curve": curve, "loops": loops}
    assert headroom.time_to_accuracy(run, 0.05) == 0.0  # before any training
    assert headroom.time_to_accuracy(run, 0.3) == pytest.approx(1 + 4 + 2 * 5 / 10)
    assert headroom.time_to_accuracy(run, 0.5) == pytest.approx(1 + 4 + 2)
    assert headroom.time_to_accuracy(run, 0.6) == pytest.approx(7 + 1 + 6 + 3 * 5 / 10)
    assert headroom.time_to_accuracy(run, 0.7) == pytest.approx(7 + 10)
    assert headroom.time_to_accuracy(run, 0.9) is None


def test_headroom_validation_split_is_stratified_disjoint_and_seeded():
    headroom = _load_bench("quality_headroom.py")
    labels = np.repeat(np.arange(4), 60)
    pool, held = headroom.validation_split(labels, per_class=5, seed=1)
    assert np.intersect1d(pool, held).size == 0 and pool.size + held.size == 240
    assert np.bincount(labels[held]).tolist() == [5, 5, 5, 5]
    np.testing.assert_array_equal(held, headroom.validation_split(labels, per_class=5, seed=1)[1])
    assert not np.array_equal(held, headroom.validation_split(labels, per_class=5, seed=2)[1])
    # a small pool (--quick's 300 per class) keeps most of each class: at most a twelfth is held out
    small = np.repeat(np.arange(3), [300, 24, 11])
    pool, held = headroom.validation_split(small, per_class=500, seed=0)
    assert np.bincount(small[held]).tolist() == [25, 2, 1] and np.bincount(small[pool]).tolist() == [275, 22, 10]


def test_quality_validation_set_is_disjoint_from_the_pool_and_stratified():
    """quality.py --validation evaluates on training images the pool never holds, 10 per class for 100."""
    quality = _load_bench("quality.py")
    from vecaf.data import load_dataset

    pool = load_dataset("fashion-mnist", split="train", limit=200, seed=0)
    held = quality.validation_set(pool, 100)
    assert len(held) == 100 and held.split == "train" and not set(held.ids) & set(pool.ids)
    assert np.bincount(held.labels, minlength=10).tolist() == [10] * 10
    # the images are the training split's own: id "fashion-mnist/train/<index>" names the row they came from
    whole = load_dataset("fashion-mnist", split="train")
    index = int(held.ids[7].rsplit("/", 1)[1])
    np.testing.assert_array_equal(held.images[7], whole.images[index])
    assert held.labels[7] == whole.labels[index]


@pytest.mark.slow
def test_headroom_quick_run_summary_follows_from_its_runs(tmp_path):
    """--quick end to end (subsets of the splits, 60 batches): every method and ratio summarised, paired diffs
    and time-to-accuracy recomputed from the raw runs."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "quality_headroom.py"), "--quick", "--out", str(tmp_path),
         "--cache", str(tmp_path / "cache")],
        env=_env(), capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "quality-headroom-quick.json").read_text())
    headroom = _load_bench("quality_headroom.py")
    summary, runs = report["summary"], report["runs"]
    assert report["settings"]["quick"] is True and report["inputs"]["pool_size"] == 3000
    for method in headroom.METHODS:
        for ratio in (0.01, 0.02):
            cell = summary[f"{method}@{ratio:g}"]
            group = [r for r in runs if r["method"] == method and r["ratio"] == ratio]
            assert cell["seeds"] == len(group) == 1
            assert cell["top1_mean"] == pytest.approx(np.mean([r["top1"] for r in group]))
            assert _is_number(cell["top1_se"]) and 0.0 <= cell["top1_mean"] <= 1.0
            if method != "full":
                assert [len(p) for p in group[0]["picks"]] == [round(ratio * 3000)] * 3
            if method != "vecaf":
                ref = next(r for r in runs if r["method"] == "vecaf" and r["ratio"] == ratio)
                assert cell["paired_vs_vecaf"]["mean"] == pytest.approx(ref["top1"] - group[0]["top1"])
            for target, tta in cell["time_to_accuracy_s"].items():
                (b,) = cell["b2a"][target]["per_seed"]
                (t,) = tta["per_seed"]
                assert (b is None) == (t is None)
                if t is not None:
                    assert 0.0 <= t <= group[0]["seconds"]["wall"]


@pytest.mark.slow
def test_headroom_vecaf_cea_runs_vecaf_with_the_pool_captions(tmp_path):
    """--methods vecaf-cea: method vecaf given the pool's caption embeddings (captioned once, cached), so its
    picks differ from plain vecaf's with the same seed."""
    part = tmp_path / "part.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "quality_headroom.py"), "--quick", "--methods", "vecaf", "vecaf-cea",
         "--ratios", "0.01", "--partial", str(part), "--cache", str(tmp_path / "cache")],
        env=_env(), capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = {r["method"]: r for r in json.loads(part.read_text())["runs"]}
    assert set(runs) == {"vecaf", "vecaf-cea"}
    assert runs["vecaf-cea"]["selection_loss"] == "expected" and 0.0 <= runs["vecaf-cea"]["top1"] <= 1.0
    assert [len(p) for p in runs["vecaf-cea"]["picks"]] == [30] * 3
    assert runs["vecaf-cea"]["picks"] != runs["vecaf"]["picks"]
    (cached,) = (tmp_path / "cache").glob("*_imagenet-labels_all-MiniLM-L6-v2.npz")
    stored = np.load(cached)
    assert stored["text"].shape[0] == stored["captions"].shape[0] == 3000 and np.isfinite(stored["text"]).all()


def test_loop_protocol_paired_final_by_hand():
    """Final-loop top-1 of each setting minus the first's, seed by seed: mean and s.e. worked by hand."""
    loop_protocol = _load_bench("loop_protocol.py")
    first = {"setting": {"a": 1}, "per_seed": [[[0.5, 1.0], [0.60, 0.9]], [[0.5, 1.0], [0.70, 0.8]], [[0.4, 1.1], [0.65, 0.9]]]}
    other = {"setting": {"a": 2}, "per_seed": [[[0.5, 1.0], [0.62, 0.9]], [[0.5, 1.0], [0.66, 0.8]], [[0.4, 1.1], [0.68, 0.9]]]}
    (row,) = loop_protocol.paired_final([first, other])
    # differences +0.02, -0.04, +0.03: mean 0.0033..., sample sd sqrt(((0.0167)^2 + (0.0433)^2 + (0.0267)^2) / 2)
    assert row["mean"] == pytest.approx(0.01 / 3)
    assert row["se"] == pytest.approx(np.sqrt((0.05**2 + 0.13**2 + 0.08**2) / 9 / 2) / np.sqrt(3))
    assert row["per_seed"] == [0.02, -0.04, 0.03] and row["seeds"] == 3 and row["minus"] == {"a": 1}


# --- selection_profile.py (issue 14: VeCAF's selection at the headroom pool, float32 vs bfloat16) -----------


@pytest.mark.slow
def test_selection_profile_quick_ratio_and_phases_follow_from_its_runs(tmp_path):
    out = tmp_path / "profile.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "selection_profile.py"), "--quick", "--out", str(out)],
        env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    per = report["per_precision"]
    assert report["ratio_bfloat16_over_float32"] == pytest.approx(per["bfloat16"]["wall_s"] / per["float32"]["wall_s"])
    for precision, cell in per.items():
        (run,) = [r for r in report["runs"] if r["precision"] == precision]
        assert sum(run["phases_s"].values()) == pytest.approx(run["wall_s"])
        assert run["calls"]["refresh"] == run["refreshes"] and run["calls"]["debias"] == 1
        assert run["calls"]["diversity"] == run["iterations"] + 1  # one per Adam step, plus the final objective
        assert len(set(run["picks"])) == report["pool"]["k"] == 20
    for key in ("objective_gap", "objective_gap_over_attraction", "overlap"):
        assert all(_is_number(v) for v in report[key]["per_seed"])
    assert "load_average_at_start" in report["started"]


def test_headroom_merge_keeps_the_first_run_of_each_method_ratio_and_seed():
    headroom = _load_bench("quality_headroom.py")
    runs = [{"method": "vecaf", "ratio": 0.01, "seed": 0, "top1": 0.5}, {"method": "vecaf", "ratio": 0.02, "seed": 0, "top1": 0.6},
            {"method": "vecaf", "ratio": 0.01, "seed": 0, "top1": 0.7}, {"method": "random", "ratio": 0.01, "seed": 0, "top1": 0.4}]
    assert [r["top1"] for r in headroom.unique_runs(runs)] == [0.5, 0.6, 0.4]


def _quality_run(method, seed, top1, *, select=0.0):
    """A run as quality.py --mode full records it: 3 loops of 10 batches, seconds under "total"."""
    loops = [{"end_batches": 10 * (i + 1), "batches": 10, "seconds": {"pass": 1.0, "select": select, "train": 2.0}}
             for i in range(3)]
    curve = [[0, 0.1, 1.0], [10, top1 - 0.2, 1.0], [20, top1 - 0.1, 1.0], [30, top1, 1.0]]
    return {"method": method, "ratio": 0.01, "seed": seed, "top1": top1, "loop_top1": [top1 - 0.2, top1 - 0.1, top1],
            "curve": curve, "loops": loops, "seconds": {"total": 9.0 + 3 * select, "select": 3 * select}}


def test_headroom_merges_quality_full_mode_reports_with_relabelled_methods(tmp_path):
    """quality.py --mode full reports merge into quality-headroom-full.json: vecaf-ods counts as VeCAF, the
    paired differences and time-to-accuracy follow from the runs (worked by hand below)."""
    headroom = _load_bench("quality_headroom.py")
    settings = {"mode": "full", "pool_size": 50, "test_size": 20, "batch_budget": 30}
    for seed, (v, r) in enumerate([(0.80, 0.70), (0.90, 0.75)]):
        part = {"settings": settings, "seconds": {"total": 30.0}, "runs": [_quality_run("vecaf-ods", seed, v, select=4.0),
                                                                            _quality_run("random", seed, r)]}
        (tmp_path / f"q{seed}.json").write_text(json.dumps(part))
    report = headroom.main(["--merge", str(tmp_path / "q0.json"), str(tmp_path / "q1.json"),
                            "--relabel", "vecaf-ods=vecaf", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "quality-headroom-full.json").read_text())["summary"] == report["summary"]
    assert "full mode" in report["protocol"] and report["settings"]["methods"] == ["random", "vecaf"]
    vecaf, random_ = report["summary"]["vecaf@0.01"], report["summary"]["random@0.01"]
    assert random_["paired_vs_vecaf"]["mean"] == pytest.approx(((0.80 - 0.70) + (0.90 - 0.75)) / 2)
    assert random_["paired_vs_vecaf"]["se"] == pytest.approx(0.025)  # diffs 0.10, 0.15: sd 0.0354 / sqrt 2
    assert vecaf["seconds_mean"]["wall"] == pytest.approx(21.0)  # "total" stands in for the wall time
    # no full-data run: targets 0.5 / 0.7. Seed 0 of VeCAF reaches 0.7 at batch 20, in loop 2 after its pass and
    # selection: loop 1 (1 + 4 + 2) + loop 2's pass and selection (1 + 4) + all 10 of its batches (2 s) = 14 s
    assert vecaf["time_to_accuracy_s"]["0.7000"]["per_seed"][0] == pytest.approx(14.0)
    assert vecaf["time_to_accuracy_s"]["0.7000"]["per_seed"][1] == pytest.approx(7.0)  # 0.70 at batch 10


def test_headroom_merge_records_where_each_part_ran_and_warns_when_the_machines_differ(tmp_path, capsys):
    """Two parts from CPUs of different generations (ODS in bfloat16 on one, float32 on the other): the merged
    report lists each part's machine in order, and the log says their pairings cross machines."""
    headroom = _load_bench("quality_headroom.py")
    settings = {"mode": "full", "pool_size": 50, "test_size": 20, "batch_budget": 30}
    zen5 = {"cpu": "AMD EPYC", "cpu_generation": {"family": "26", "model_number": "2", "avx512": True},
            "selection_precision": "bfloat16", "cuda": None, "load_average_at_end": [1.0, 1.0, 1.0]}
    zen3 = {**zen5, "cpu_generation": {"family": "25", "model_number": "1", "avx512": False},
            "selection_precision": "float32"}
    paths = []
    for seed, where in enumerate([zen5, zen3, zen5]):
        part = {"settings": settings, "seconds": {"total": 30.0}, "machine": where,
                "runs": [_quality_run("vecaf-ods", seed, 0.8), _quality_run("random", seed, 0.7)]}
        paths.append(tmp_path / f"q{seed}.json")
        paths[-1].write_text(json.dumps(part))
    report = headroom.main(["--merge", *map(str, paths[:2]), "--relabel", "vecaf-ods=vecaf", "--out", str(tmp_path)])
    assert [m["selection_precision"] for m in report["part_machines"]] == ["bfloat16", "float32"]
    assert report["part_machines"][1]["cpu_generation"]["family"] == "25"
    assert "load_average_at_end" not in report["part_machines"][0]  # in seconds' load list, not here
    assert "ran on different machines" in capsys.readouterr().err
    report = headroom.main(["--merge", str(paths[0]), str(paths[2]), "--relabel", "vecaf-ods=vecaf", "--out", str(tmp_path)])
    assert report["part_machines"] == [report["part_machines"][0]] * 2
    assert "ran on different machines" not in capsys.readouterr().err


# --- loss_weighting_probe.py (issue 14: which weights VeCAF's selection should use) ---------------------------


def test_probe_temperature_is_the_grid_point_of_least_held_out_nll():
    probe = _load_bench("loss_weighting_probe.py")
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(200, 4)) * 8.0)
    labels = torch.from_numpy(rng.integers(0, 4, size=200))
    mask = np.arange(200) % 3 != 0
    grid = np.exp(np.linspace(np.log(0.05), np.log(200), 120))
    nll = []
    for t in grid:  # a plain loop over the held rows
        total = 0.0
        for i in np.flatnonzero(mask):
            z = logits[i].numpy() / t
            total += np.log(np.exp(z - z.max()).sum()) + z.max() - z[int(labels[i])]
        nll.append(total / mask.sum())
    assert probe.fit_temperature(logits, labels, mask) == pytest.approx(grid[int(np.argmin(nll))])
    # random labels: the best temperature flattens these sharp logits
    assert probe.fit_temperature(logits, labels, mask) > 8.0


def test_probe_merge_summarises_the_seeds(tmp_path):
    probe = _load_bench("loss_weighting_probe.py")
    parts = []
    for seed, (a, b) in enumerate([(0.70, 0.80), (0.74, 0.84)]):
        row = {"per_loop": a, "cumulative": b, "misclassified": 0.5 + seed / 10, "loss_percentile": 0.8,
               "margin_percentile": 0.1, "select_s": 2.0 + seed}
        part = {"seed": seed, "loop1_top1": 0.6, "variants": {"vent:0.5": row, "random": dict(row, per_loop=0.6)}}
        path = tmp_path / f"p{seed}.json"
        path.write_text(json.dumps(part))
        parts.append(path)
    report = probe.merge(parts, tmp_path)
    cell = report["summary"]["vent:0.5"]
    assert cell["seeds"] == [0, 1] and cell["per_loop"]["mean"] == pytest.approx(0.72)
    assert cell["cumulative"]["mean"] == pytest.approx(0.82) and cell["select_s"]["per_seed"] == [2.0, 3.0]
    assert report["summary"]["random"]["per_loop"]["mean"] == pytest.approx(0.6)
    assert json.loads((tmp_path / "loss-weighting-probe.json").read_text())["summary"] == report["summary"]


def test_headroom_merge_refuses_parts_of_different_protocols(tmp_path):
    """Runs at lr 5e-4 and 2e-3 must not be averaged into one cell; seeds and methods may differ."""
    headroom = _load_bench("quality_headroom.py")
    base = {"mode": "full", "pool_size": 5000, "batch_budget": 300, "optimizer": {"name": "SGD", "lr": 5e-4}}
    assert headroom.protocol_mismatch([base, {**base, "seeds": [3], "methods": ["random"]}]) == ""
    other = {**base, "optimizer": {"name": "SGD", "lr": 2e-3}}
    assert headroom.protocol_mismatch([base, other]).startswith("optimizer: ")
    paths = []
    for i, settings in enumerate((base, other)):
        paths.append(tmp_path / f"part{i}.json")
        paths[-1].write_text(json.dumps({"settings": settings, "seconds": {"total": 1.0},
                                         "runs": [_quality_run("random", i, 0.5)]}))
    with pytest.raises(SystemExit, match="different protocols"):
        headroom.main(["--merge", *map(str, paths), "--out", str(tmp_path)])


def test_headroom_merge_reads_a_missing_validation_or_quick_key_as_false():
    """quality-headroom.json predates the ``validation`` and ``quick`` keys: it ran the test split at full size."""
    headroom = _load_bench("quality_headroom.py")
    old = {"mode": "head", "lr": 0.05, "cumulative": False}
    assert headroom.protocol_mismatch([old, {**old, "validation": False, "quick": False}]) == ""
    assert headroom.protocol_mismatch([old, {**old, "validation": True}]) == "validation: false vs true"
    assert headroom.protocol_mismatch([old, {**old, "quick": True}]) == "quick: false vs true"


def test_headroom_merge_names_quality_py_validation_parts_as_validation():
    """quality.py --validation records ``evaluated_on`` (not ``validation``): its merged summary must still be
    named -validation, or a validation run would read as a test-split result."""
    headroom = _load_bench("quality_headroom.py")
    assert headroom.on_validation({"validation": True})
    assert headroom.on_validation({"evaluated_on": "validation (training split, disjoint from the pool)"})
    assert not headroom.on_validation({"evaluated_on": "test split"})
    assert not headroom.on_validation({})


def test_probe_variant_names_carry_vecaf_options():
    probe = _load_bench("loss_weighting_probe.py")
    assert probe.parse_vecaf_variant("vent:0.5") == ("vent", 0.5, {})
    assert probe.parse_vecaf_variant("vuni") == ("vuni", 1.0, {})
    assert probe.parse_vecaf_variant("vmar:2/lam=0.25/max_iters=100") == ("vmar", 2.0, {"lam": 0.25, "max_iters": 100})
    with pytest.raises(SystemExit, match="bad option 'beta=3'"):
        probe.parse_vecaf_variant("vent:0.5/beta=3")
    with pytest.raises(SystemExit, match="bad option 'lam'"):
        probe.parse_vecaf_variant("vent:0.5/lam")
