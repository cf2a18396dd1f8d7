"""Quality benchmark with headroom (issue 14): the whole Fashion-MNIST training split as the pool, head mode.

The committed ``quality.py`` protocol (2,000-image pool, 300 batches at lr 5e-4) leaves full-data
finetuning within a point of a random 1 % subset, so it cannot tell selection methods apart. This script
runs ``vecaf.train.finetune(None, pool, test, mode="head", ...)`` exactly as a user would, on:

- pool: all 60,000 training images; test: all 10,000 test images; EfficientNet-Lite0 (ImageNet weights)
  pre-logits features at 64 px, extracted once and cached under ``.vecaf/cache/headroom/``;
- the batch budget, learning rate and batch size chosen by ``--tune`` on a validation split carved from
  the training split (500 images per class, seeded; the other 55,000 are the tuning pool; the test split
  is never read by ``--tune``), with the rule fixed before the grid ran: among the grid cells whose
  full-data top-1 is within 1 point of the best full-data cell, take the one with the largest gap
  full-data minus random 1 %/loop (ties: the smaller budget);
- methods: random, coreset, topk_loss, entropy, margin, activeft, vecaf (``method="vecaf"`` with its
  defaults, ODS without captions), ``vecaf-cea`` (on request: the same with the pool's caption embeddings,
  so CEA in selection, Eq. 8-9, and in the head's forward pass, Eq. 10; the pipeline's default captioner
  and text encoder, cached beside the features) and full-data FT; ratios 1 % and 2 % per loop; L = 3 loops; the
  engine's default per-loop protocol (each loop trains on its own picks).

Per cell: mean +- s.e. of the final test top-1 over seeds, per-loop top-1, B2A (batches to reach 90 % /
95 % of full-data FT's mean final top-1), time-to-accuracy (wall seconds to the same targets, including
the pool passes and selections: the measured seconds of the loops before, plus this loop's pass and
selection, plus its training time pro rata to the batches; evaluation time excluded), and the paired
difference VeCAF minus the method over the seeds both ran (mean +- s.e.). Each run records the load average
at its end (the machine may be shared); a full run also draws the mean curves (``quality-headroom-curves.png``).

    python benchmarks/quality_headroom.py --tune                 # validation grid -> quality-headroom-tuning.json
    python benchmarks/quality_headroom.py                        # -> results/quality-headroom.json
    python benchmarks/quality_headroom.py --seeds 0 2 --partial /tmp/a.json   # part of the seeds
    python benchmarks/quality_headroom.py --merge /tmp/a.json /tmp/b.json     # summary of the parts
    python benchmarks/quality_headroom.py --quick                # CI smoke run (subsets, minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from benchmarks._common import save_npz  # noqa: E402
from benchmarks.quality import b2a, machine, mean_se  # noqa: E402

DATASET = "fashion-mnist"
PVM_NAME = "efficientnet_lite0"
IMAGE_SIZE = 64
METHODS = ["random", "coreset", "topk_loss", "entropy", "margin", "activeft", "vecaf", "full"]
TEXT_METHODS = {"vecaf-cea": "vecaf"}  # method label -> library method run with the pool's caption embeddings
REFERENCE = "vecaf"
# Chosen by --tune on the validation split (results/quality-headroom-tuning.json); see the module docstring.
PROTOCOL = {"batch_budget": 3000, "batch_size": 32, "lr": 5e-2}
VALIDATION_PER_CLASS = 500
PROTOCOL_TEXT = {
    "head": "issue 14: whole Fashion-MNIST training split as pool, whole test split, head mode, "
            "EfficientNet-Lite0 64 px features; protocol chosen on a validation split (--tune)",
    "full": "issue 14, full mode on the CPU: quality.py --mode full runs merged (whole network finetuned on "
            "64 px images; pool, test and budget in settings)",
}
PLOT_TITLE = {
    "head": "Headroom benchmark: Fashion-MNIST 60k pool, head mode, 3 loops (mean test top-1)",
    "full": "Full mode on the CPU: Fashion-MNIST, 3 loops (mean test top-1)",
}
VALIDATION_SEED = 12345
TUNE_GRID = {"batch_budget": [300, 1500, 3000], "lr": [5e-4, 5e-3, 5e-2, 2e-1], "batch_size": [32]}
TUNE_SEEDS = [0, 1]
QUICK = {"pool": 3000, "test": 1000, "batch_budget": 60, "seeds": [0], "eval_points": 6}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tune", action="store_true", help="run the validation grid and write the tuning JSON")
    p.add_argument("--tune-budgets", type=int, nargs="+", default=TUNE_GRID["batch_budget"])
    p.add_argument("--tune-lrs", type=float, nargs="+", default=TUNE_GRID["lr"])
    p.add_argument("--tune-merge", type=Path, nargs="+", help="apply the rule to the union of these tuning JSONs")
    p.add_argument("--quick", action="store_true", help="small smoke run on subsets (CI)")
    p.add_argument("--methods", nargs="+", default=METHODS,
                   help=f"default: {' '.join(METHODS)}; also {', '.join(TEXT_METHODS)} (with captions)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.02])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--loops", type=int, default=3)
    p.add_argument("--cumulative", action="store_true",
                   help="each loop trains on all picks so far (the pipeline's default); off: the paper's per-loop protocol")
    p.add_argument("--validation", action="store_true",
                   help="run on the tuning pool and the validation split carved from the training split (the test "
                        "split is not read): for choosing defaults")
    p.add_argument("--vecaf-options", type=json.loads, default=None, metavar="JSON",
                   help='finetune keywords for method vecaf only, e.g. \'{"selection_loss": "observed", '
                        '"selection_options": {"loss_power": 0.5}}\' (default: the library defaults)')
    p.add_argument("--batch-budget", type=int, default=PROTOCOL["batch_budget"])
    p.add_argument("--batch-size", type=int, default=PROTOCOL["batch_size"])
    p.add_argument("--lr", type=float, default=PROTOCOL["lr"])
    p.add_argument("--eval-points", type=int, default=30, help="evaluations per run (eval_every = budget / this)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--partial", type=Path, help="write this process's runs here (merge them with --merge)")
    p.add_argument("--merge", type=Path, nargs="+",
                   help="summarise the runs of these partial JSONs (or of quality.py --mode full reports)")
    p.add_argument("--relabel", nargs="+", default=[], metavar="OLD=NEW",
                   help="with --merge: rename methods, e.g. vecaf-ods=vecaf for quality.py's engine-default VeCAF")
    p.add_argument("--tag", default="", help="appended to the output name, e.g. lr5e-4 -> quality-headroom-full-lr5e-4.json")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--cache", type=Path, default=REPO / ".vecaf" / "cache" / "headroom")
    args = p.parse_args(argv)
    if any("=" not in pair for pair in args.relabel):
        p.error(f"--relabel takes OLD=NEW pairs, got {args.relabel}")
    args.relabel = dict(pair.split("=", 1) for pair in args.relabel)
    args.pool_limit = args.test_limit = None
    if args.quick:
        args.pool_limit, args.test_limit = QUICK["pool"], QUICK["test"]
        args.batch_budget, args.seeds, args.eval_points = QUICK["batch_budget"], QUICK["seeds"], QUICK["eval_points"]
    return args


# ----- inputs ------------------------------------------------------------------------------------------------


def cached_split(split: str, limit: int | None, cache: Path, what: str):
    """(the split's dataset, its cache path for ``what``, the stored arrays when their ids still match, else None)."""
    from vecaf.data import load_dataset

    dataset = load_dataset(DATASET, split=split, limit=limit, seed=0)
    tag = "all" if limit is None else f"n{limit}_seed0"
    path = cache / f"{DATASET}_{split}_{tag}_{PVM_NAME}_{IMAGE_SIZE}px{what}.npz"
    stored = np.load(path) if path.is_file() else None
    return dataset, path, stored if stored is not None and list(stored["ids"]) == list(dataset.ids) else None


def load_features(split: str, limit: int | None, cache: Path, log) -> dict[str, Any]:
    """Features, labels and ids of a split (a seeded stratified subset when ``limit``), cached as .npz."""
    cache.mkdir(parents=True, exist_ok=True)
    dataset, path, stored = cached_split(split, limit, cache, "")
    if stored is not None:
        return {"features": stored["features"], "labels": np.asarray(dataset.labels), "seconds": None, "path": str(path)}
    from vecaf.models import embed, load_pvm

    log(f"embedding {len(dataset)} {split} images at {IMAGE_SIZE} px -> {path}")
    t0 = time.perf_counter()
    feats = embed(load_pvm(PVM_NAME), dataset, image_size=IMAGE_SIZE, batch_size=128, device="cpu", progress=False)
    seconds = time.perf_counter() - t0
    save_npz(path, features=feats.astype(np.float32), ids=np.array(dataset.ids), labels=np.asarray(dataset.labels))
    return {"features": feats.astype(np.float32), "labels": np.asarray(dataset.labels), "seconds": seconds, "path": str(path)}


def load_text(split: str, limit: int | None, cache: Path, log) -> np.ndarray:
    """Caption embeddings of a split's images (the pipeline's default captioner and text encoder), cached."""
    from benchmarks.quality import CAPTIONER, TEXT_ENCODER
    from vecaf.models import load_captioner, load_pvm, load_text_encoder

    dataset, path, stored = cached_split(split, limit, cache, f"_{CAPTIONER}_{TEXT_ENCODER}")
    if stored is not None:
        return stored["text"]
    log(f"captioning {len(dataset)} {split} images ({CAPTIONER}) and encoding the captions ({TEXT_ENCODER}) -> {path}")
    captioner = load_captioner(CAPTIONER, pvm=load_pvm(PVM_NAME), device="cpu", image_size=IMAGE_SIZE)
    captions = captioner.caption(dataset.images, [dataset.class_names[y] for y in dataset.labels], batch_size=128)
    text = load_text_encoder(TEXT_ENCODER, device="cpu").encode(captions, batch_size=128)
    save_npz(path, text=text, ids=np.array(dataset.ids), captions=np.array(captions))
    return text


def validation_split(labels: np.ndarray, per_class: int = VALIDATION_PER_CLASS, seed: int = VALIDATION_SEED):
    """(tuning pool indices, validation indices): ``per_class`` seeded images of every class held out, at most a
    twelfth of the class (500 of Fashion-MNIST's 6,000; 25 of the 300 per class of --quick's 3,000-image pool)."""
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    held = np.concatenate([rng.permutation(m)[: min(per_class, max(1, m.size // 12))] for m in members])
    held = np.sort(held)
    return np.setdiff1d(np.arange(labels.shape[0]), held), held


def validation_data(train: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The tuning pool as ``train`` and the validation split as ``test`` (for ``run_one``), and their indices."""
    pool_idx, val_idx = validation_split(train["labels"])
    x, y = train["features"], train["labels"]
    return {"train": (x[pool_idx], y[pool_idx]), "test": (x[val_idx], y[val_idx])}, pool_idx, val_idx


# ----- one run -----------------------------------------------------------------------------------------------


def time_to_accuracy(run: dict[str, Any], target: float) -> float | None:
    """Wall seconds (pool passes + selections + training, no evaluation) until the curve first reaches target."""
    reached = b2a(run["curve"], target)
    if reached is None:
        return None
    elapsed, start = 0.0, 0
    for loop in run["loops"]:
        end = loop["end_batches"]
        sec = loop["seconds"]
        before = sec.get("pass", 0.0) + sec.get("select", 0.0)
        if reached <= end:
            if reached <= start:  # reached at the loop's first evaluation (batch 0 before any training)
                return elapsed if reached == 0 else elapsed + before
            share = (reached - start) / max(1, end - start)
            return elapsed + before + share * sec.get("train", 0.0)
        elapsed += before + sec.get("train", 0.0)
        start = end
    return elapsed


def run_one(args, data, *, method: str, ratio: float, seed: int) -> dict[str, Any]:
    from vecaf.train import finetune

    library_method = TEXT_METHODS.get(method, method)
    extra = dict(args.vecaf_options or {}) if library_method == "vecaf" else {}
    if method in TEXT_METHODS:
        extra["text_embeddings"] = data["text"]
    t0 = time.perf_counter()
    result = finetune(
        None, data["train"], data["test"], mode="head", method=library_method, ratio=ratio, loops=args.loops,
        batch_budget=args.batch_budget, batch_size=args.batch_size, lr=args.lr, cumulative=args.cumulative,
        eval_every=max(1, args.batch_budget // args.eval_points), seed=seed, device=args.device, return_model=False,
        **extra,
    )
    wall = time.perf_counter() - t0
    return {
        "method": method,
        "ratio": ratio,
        "seed": seed,
        "top1": result.top1,
        "selection_loss": result.config.get("selection_loss") if library_method == "vecaf" else None,
        "loop_top1": [r.top1 for r in result.loops],
        "curve": [[p.batches, p.top1, p.loss] for p in result.curve],
        "loops": [
            {"end_batches": r.end_batches, "batches": r.batches, "seconds": dict(r.seconds)} for r in result.loops
        ],
        "seconds": {**result.timings, "wall": wall},
        "picks": [r.picks.tolist() for r in result.loops if r.picks is not None],
        "load_average_at_end": list(os.getloadavg()),
    }


# ----- summary -----------------------------------------------------------------------------------------------


def targets_of(runs: list[dict[str, Any]]) -> tuple[list[float], str]:
    full = [r["top1"] for r in runs if r["method"] == "full"]
    if not full:
        return [0.5, 0.7], "fixed 0.5 / 0.7 (no full-data FT run)"
    ref = float(np.mean(full))
    return [round(0.90 * ref, 4), round(0.95 * ref, 4)], f"90% and 95% of full-data FT's mean final top-1 ({ref:.4f})"


def summarize(runs: list[dict[str, Any]], targets: list[float]) -> dict[str, Any]:
    """``summary["<method>@<ratio>"]``: top1_mean/top1_se, loops, B2A, time-to-accuracy, paired diff vs VeCAF."""
    cells: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        cells.setdefault(f"{r['method']}@{r['ratio']:g}", []).append(r)
    out: dict[str, Any] = {}
    for key, group in cells.items():
        group = sorted(group, key=lambda g: g["seed"])
        top1 = mean_se([g["top1"] for g in group])
        loops = [mean_se([g["loop_top1"][i] for g in group]) for i in range(len(group[0]["loop_top1"]))]
        batches = [p[0] for p in group[0]["curve"]]
        mean_curve = [[b, float(np.mean([g["curve"][i][1] for g in group]))] for i, b in enumerate(batches)]
        cell = {
            "method": group[0]["method"],
            "ratio": group[0]["ratio"],
            "seeds": len(group),
            "seed_list": [g["seed"] for g in group],
            "top1_mean": top1[0],
            "top1_se": top1[1],
            "loop_top1": [{"mean": m, "se": e} for m, e in loops],
            "b2a": {},
            "time_to_accuracy_s": {},
            "mean_curve": mean_curve,
            "seconds_mean": {
                k: float(np.mean([g["seconds"].get(k, 0.0) for g in group])) for k in ("wall", "pass", "select", "train", "eval")
            },
        }
        for t in targets:
            per_seed_b = [b2a(g["curve"], t) for g in group]
            per_seed_t = [time_to_accuracy(g, t) for g in group]
            reached = [v for v in per_seed_t if v is not None]
            cell["b2a"][f"{t:.4f}"] = {"per_seed": per_seed_b, "mean_curve": b2a([[b, a, 0.0] for b, a in mean_curve], t)}
            cell["time_to_accuracy_s"][f"{t:.4f}"] = {
                "per_seed": per_seed_t,
                "reached": len(reached),
                "median_of_reached": float(np.median(reached)) if reached else None,
            }
        out[key] = cell
    for key, cell in out.items():
        ref = cells.get(f"{REFERENCE}@{cell['ratio']:g}")
        if ref is None or cell["method"] == REFERENCE:
            continue
        ref_by_seed = {g["seed"]: g["top1"] for g in ref}
        diffs = [ref_by_seed[g["seed"]] - g["top1"] for g in cells[key] if g["seed"] in ref_by_seed]
        m, se = mean_se(diffs)
        cell["paired_vs_vecaf"] = {"mean": m, "se": se, "seeds": len(diffs), "meaning": "vecaf minus this method"}
    return out


def table(summary: dict[str, Any], methods: list[str], ratios: list[float], targets: list[float]) -> str:
    cols = []
    for r in ratios:
        cols += [f"top-1 @ {r:.0%}/loop", f"vecaf - it @ {r:.0%}"]
    cols += [f"B2A {t:.3f} @ {ratios[0]:.0%}" for t in targets] + [f"time to {t:.3f} @ {ratios[0]:.0%}" for t in targets]
    cols += [f"wall s @ {ratios[0]:.0%}"]
    lines = ["| method | " + " | ".join(cols) + " |", "|" + "---|" * (1 + len(cols))]
    for m in methods:
        cells = []
        for r in ratios:
            c = summary.get(f"{m}@{r:g}")
            cells.append("-" if c is None else f"{100 * c['top1_mean']:.2f} ± {100 * c['top1_se']:.2f} ({c['seeds']})")
            pv = None if c is None else c.get("paired_vs_vecaf")
            cells.append("-" if pv is None else f"{100 * pv['mean']:+.2f} ± {100 * pv['se']:.2f}")
        first = summary.get(f"{m}@{ratios[0]:g}")
        for t in targets:
            v = None if first is None else first["b2a"][f"{t:.4f}"]["mean_curve"]
            cells.append("never" if v is None else str(v))
        for t in targets:
            tta = None if first is None else first["time_to_accuracy_s"][f"{t:.4f}"]
            cells.append(
                "-" if tta is None else ("never" if tta["median_of_reached"] is None else
                                         f"{tta['median_of_reached']:.1f} s ({tta['reached']}/{first['seeds']})")
            )
        cells.append("-" if first is None else f"{first['seconds_mean']['wall']:.1f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----- modes -------------------------------------------------------------------------------------------------


def tune(args, log) -> dict[str, Any]:
    """Full-data FT vs random 1 %/loop on the validation split over the grid; the rule picks the protocol."""
    train = load_features("train", args.pool_limit, args.cache, log)
    data, pool_idx, val_idx = validation_data(train)
    grid = []
    for budget in args.tune_budgets:
        for lr in args.tune_lrs:
            for bs in TUNE_GRID["batch_size"]:
                sub = argparse.Namespace(**{**vars(args), "batch_budget": budget, "lr": lr, "batch_size": bs})
                cell = {"batch_budget": budget, "lr": lr, "batch_size": bs}
                for method in ("full", "random"):
                    top = [run_one(sub, data, method=method, ratio=0.01, seed=s)["top1"] for s in TUNE_SEEDS]
                    cell[method] = float(np.mean(top))
                    cell[f"{method}_per_seed"] = top
                cell["gap"] = cell["full"] - cell["random"]
                grid.append(cell)
                log(f"tune {cell}")
    return tuning_report(args, grid, {"pool": int(pool_idx.size), "validation": int(val_idx.size)})


def tuning_report(args, grid: list[dict[str, Any]], sizes: dict[str, int]) -> dict[str, Any]:
    """The rule of the module docstring applied to the grid cells."""
    best_full = max(c["full"] for c in grid)
    eligible = [c for c in grid if c["full"] >= best_full - 0.01]
    chosen = max(eligible, key=lambda c: (round(c["gap"], 6), -c["batch_budget"]))
    return {
        "benchmark": "quality-headroom-tuning",
        "rule": "among cells with full-data top-1 within 1 point of the best, the largest gap full - random 1%/loop "
                "(ties: smaller budget)",
        "validation": {"per_class": VALIDATION_PER_CLASS, "seed": VALIDATION_SEED, **sizes},
        "seeds": TUNE_SEEDS,
        "loops": args.loops,
        "grid": grid,
        "chosen": chosen,
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    if args.tune_merge:
        parts = [json.loads(Path(p).read_text()) for p in args.tune_merge]
        grid = [c for part in parts for c in part["grid"]]
        sizes = {k: parts[0]["validation"][k] for k in ("pool", "validation")}
        report = tuning_report(args, grid, sizes)
        report["parts"] = [str(p) for p in args.tune_merge]
        path = args.out / "quality-headroom-tuning.json"
        path.write_text(json.dumps(report, indent=1))
        log(f"chosen {report['chosen']}; wrote {path}")
        return report
    if args.tune:
        report = tune(args, log)
        path = args.out / f"quality-headroom-tuning{suffix}.json"
        path.write_text(json.dumps(report, indent=1))
        log(f"chosen {report['chosen']}; wrote {path}")
        return report

    settings = {
        "dataset": DATASET, "pvm": PVM_NAME, "image_size": IMAGE_SIZE, "mode": "head", "quick": args.quick,
        "loops": args.loops, "batch_budget": args.batch_budget, "batch_size": args.batch_size, "lr": args.lr,
        "eval_every": max(1, args.batch_budget // args.eval_points), "cumulative": args.cumulative,
        "optimizer": {"name": "SGD", "lr": args.lr, "weight_decay": 1e-4, "momentum": 0.9, "schedule": "cosine"},
        "threads": args.threads, "device": args.device, "validation": args.validation,
        "vecaf_options": args.vecaf_options,
    }
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        mismatch = protocol_mismatch([part["settings"] for part in parts])
        if mismatch:
            raise SystemExit(f"--merge: the parts ran different protocols ({mismatch}); merge each protocol apart")
        runs = unique_runs([normalized_run(r, args.relabel) for part in parts for r in part["runs"]])
        settings = parts[0]["settings"]
        inputs = parts[0].get("inputs", {})
        methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
        # runs kept under another label (e.g. "vecaf_observed": vecaf before selection_loss="expected")
        methods += sorted({r["method"] for r in runs} - set(METHODS))
        ratios = sorted({r["ratio"] for r in runs})
        seconds = {"parts": [part["seconds"] for part in parts],
                   "load_average_at_end_of_parts": [part.get("machine", {}).get("load_average_at_end") for part in parts]}
        part_machines = [part_machine(part) for part in parts]
        if len({json.dumps(m, sort_keys=True) for m in part_machines}) > 1:
            log("--merge: the parts ran on different machines (CPU generation, ODS precision or GPU; see "
                "part_machines): a paired difference is only read between runs of one machine")
    else:
        train = load_features("train", args.pool_limit, args.cache, log)
        if args.validation:
            data, pool_idx, val_idx = validation_data(train)
            inputs = {"pool_size": int(pool_idx.size), "test_size": int(val_idx.size), "split": "validation",
                      "validation": {"per_class": VALIDATION_PER_CLASS, "seed": VALIDATION_SEED}}
        else:
            test = load_features("test", args.test_limit, args.cache, log)
            data = {"train": (train["features"], train["labels"]), "test": (test["features"], test["labels"])}
            inputs = {"pool_size": int(train["labels"].size), "test_size": int(test["labels"].size),
                      "embed_seconds": {"train": train["seconds"], "test": test["seconds"]}}
        methods, ratios = args.methods, args.ratios
        if any(m in TEXT_METHODS for m in methods):
            text = load_text("train", args.pool_limit, args.cache, log)
            data["text"] = text[pool_idx] if args.validation else text
        log(f"settings {settings}; pool {inputs['pool_size']}, test {inputs['test_size']}; seeds {args.seeds}")
        runs = []
        for seed in args.seeds:
            full_run = None
            for ratio in ratios:
                for method in methods:
                    if method == "full":
                        full_run = full_run or run_one(args, data, method="full", ratio=ratios[0], seed=seed)
                        runs.append({**full_run, "ratio": ratio})
                        continue
                    run = run_one(args, data, method=method, ratio=ratio, seed=seed)
                    runs.append(run)
                    log(f"seed {seed} {method}@{ratio:g}: top-1 {run['top1']:.4f} loops "
                        f"{[round(v, 4) for v in run['loop_top1']]} ({run['seconds']['wall']:.1f}s, "
                        f"select {run['seconds'].get('select', 0):.1f}s)")
                    if args.partial:
                        _write(args.partial, settings, inputs, runs, {"total": time.perf_counter() - t_start})
        seconds = {"total": time.perf_counter() - t_start}
        if args.partial:
            _write(args.partial, settings, inputs, runs, seconds)
            log(f"wrote {args.partial}")
            return {"runs": runs}
    targets, rule = targets_of(runs)
    summary = summarize(runs, targets)
    report = {
        "benchmark": "quality-headroom",
        "protocol": PROTOCOL_TEXT[settings.get("mode", "head")],
        "settings": {**settings, "methods": methods, "ratios": ratios, "targets": targets, "target_rule": rule,
                     "seeds": sorted({r["seed"] for r in runs})},
        "inputs": inputs,
        "machine": machine(),
        **({"part_machines": part_machines} if args.merge else {}),
        "seconds": seconds,
        "summary": summary,
        "runs": runs,
    }
    suffix += "-full" if settings.get("mode") == "full" else ""
    suffix += "-validation" if on_validation(settings) else ""
    suffix += "-cumulative" if settings.get("cumulative") else ""
    suffix += f"-{args.tag}" if args.tag else ""
    path = args.out / f"quality-headroom{suffix}.json"
    path.write_text(json.dumps(report, indent=1))
    print(table(summary, methods, ratios, targets), file=sys.stderr)
    log(f"wrote {path}")
    from benchmarks.plots import plot_curves

    figure = plot_curves(summary, methods, ratios, args.out / f"quality-headroom{suffix}-curves.png",
                         title=PLOT_TITLE[settings.get("mode", "head")])
    log(f"wrote {figure}")
    return report


PROTOCOL_KEYS = ("mode", "dataset", "pvm", "image_size", "pool_size", "test_size", "loops", "cumulative", "validation",
                 "evaluated_on", "batch_budget", "batch_size", "lr", "optimizer", "freeze_bn", "quick")
# What a part written before a key existed ran: the test split at full size (quality-headroom.json predates both).
PROTOCOL_DEFAULTS = {"validation": False, "quick": False}


def on_validation(settings: dict[str, Any]) -> bool:
    """Whether a run's settings say it was evaluated on a validation split: this script's ``validation`` or
    ``quality.py --validation``'s ``evaluated_on``."""
    return bool(settings.get("validation")) or str(settings.get("evaluated_on", "")).startswith("validation")


def protocol_mismatch(settings: list[dict[str, Any]]) -> str:
    """The first protocol setting on which the parts differ, as "key: a vs b" ("" when they agree).

    Seeds, methods and ratios may differ between parts; the learning rate, budget, sizes and loop protocol
    may not, or the summary would average runs of different protocols. A key a part lacks takes its
    ``PROTOCOL_DEFAULTS`` value (parts written before the key existed).
    """
    for key in PROTOCOL_KEYS:
        values = [json.dumps(s.get(key, PROTOCOL_DEFAULTS.get(key)), sort_keys=True) for s in settings]
        if len(set(values)) > 1:
            return f"{key}: {' vs '.join(sorted(set(values)))}"
    return ""


def part_machine(part: dict[str, Any]) -> dict[str, Any]:
    """Where a part's runs ran, as far as its ``machine`` says: the CPU model and generation, what ODS's
    precision "auto" resolved to and the GPU (the same seed's figures differ between such machines; a merged
    report's own ``machine`` is where the merge ran)."""
    where = part.get("machine", {})
    return {key: where.get(key) for key in ("cpu", "cpu_generation", "selection_precision", "cuda")}


def normalized_run(run: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """A run with its method renamed by ``names`` (old -> new) and a ``wall`` time (quality.py records ``total``)."""
    seconds = dict(run["seconds"])
    seconds.setdefault("wall", seconds.get("total", 0.0))
    return {**run, "method": names.get(run["method"], run["method"]), "seconds": seconds}


def unique_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first run of each (method, ratio, seed): parts run in parallel may overlap."""
    seen: set[tuple[str, float, int]] = set()
    out = []
    for r in runs:
        key = (r["method"], r["ratio"], r["seed"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _write(path: Path, settings, inputs, runs, seconds) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps({"settings": settings, "inputs": inputs, "runs": runs, "seconds": seconds,
                               "machine": machine()}))
    tmp.replace(path)


if __name__ == "__main__":
    main()
