"""Quality benchmark: the protocol of the paper's Table 1 (and Fig. 4-5), scaled to a CPU machine.

The embedded default PVM (EfficientNet-Lite0, ImageNet weights) is finetuned on Fashion-MNIST in L = 3 loops
under one fixed batch budget shared by every method; each loop selects a ratio r of the pool (1 %, 2 %, 5 %).
Methods: random, topk_loss, coreset, entropy and margin (uncertainty sampling), activeft, VeCAF without CEA (ODS only; ``vecaf-ods`` with the default
tempered weights p ~ L^0.5, ``vecaf-ods-eq3`` with Eq. 3's p = L / sum L), VeCAF (ODS + CEA with the
default captioner and text encoder) and full-data finetuning (random batches from the whole pool). Several
seeds per cell; the table gives mean +- standard error of the final test top-1, and B2A (batches to reach a
target top-1) at two targets.

    python benchmarks/quality.py --mode head            # frozen backbone, cached features: minutes
    python benchmarks/quality.py --mode full            # whole network trains: <= 60 min on 2 CPU cores
    python benchmarks/quality.py --mode head --quick    # smoke run
    python benchmarks/quality.py --mode head --ablation --lam-bw 0.999 0.998 0.995 0.99   # Tables 5 and 6
    python benchmarks/quality.py --mode full --validation --lr 2e-3 --methods random full   # choose a protocol

Writes ``benchmarks/results/quality-<mode>.json`` (``-cumulative`` and ``-quick`` appended for those options) and two plots beside it:
accuracy vs batches (Fig. 4) and B2A per method (Fig. 5); prints the summary JSON.
``--validation`` evaluates on ``--test`` training images outside the pool (the next ones of the pool's
stratified order) instead of the test split, so a learning rate or budget can be chosen without reading it.

Protocol choices (none tuned on the test split): the pool is a seeded stratified subset of the training
split, the test set a seeded stratified subset of the test split; images are resized to 64 px; SGD lr 5e-4 /
wd 1e-4 / momentum 0.9 / one cosine decay (Appendix C) in both modes; batch-norm statistics frozen in full
mode (the engine's default: with train-mode statistics the 1000-image run stayed near chance on a
validation split held out of the training pool, since the head is evaluated with running statistics it was
never trained under). B2A targets are 90 % and 95 % of the full-data finetuning's mean final top-1 (a rule
fixed before the runs, since absolute accuracies differ from the paper's setting). Embeddings, captions and
text embeddings are cached under ``.vecaf/cache/quality/`` keyed by dataset, split, subset size, PVM and
image size, so reruns skip extraction.

Sizes. The selection cost of ODS grows as r N^2 (K = r N centroids against N samples, E = 5 members, up to
300 Adam steps), which bounds the pool on a CPU: head mode uses a 2,000-image pool and the full 10,000-image
test split (5 seeds); full mode a 1,000-image pool, a 500-image test set and B = 30 batches of 32 (3 seeds),
which ran in 18 minutes on the 2-core machine (66 runs of 11-26 s, 2026-11-29; a shared, oversubscribed
machine is several times slower, so the JSON records the measured time and the load average).
"""

from __future__ import annotations

import argparse
import json
import math
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

DATASET = "fashion-mnist"
PVM_NAME = "efficientnet_lite0"
CAPTIONER = "imagenet-labels"
TEXT_ENCODER = "all-MiniLM-L6-v2"
TABLE1_METHODS = [
    "random", "topk_loss", "coreset", "entropy", "margin", "activeft", "vecaf-ods-eq3", "vecaf-ods", "vecaf", "full",
]
METHOD_SPECS: dict[str, dict[str, Any]] = {
    "random": {"method": "random"},
    "topk_loss": {"method": "topk_loss"},
    "coreset": {"method": "coreset"},
    # uncertainty sampling: the engine passes softmax(logits) of the current model as probs
    "entropy": {"method": "entropy"},
    "margin": {"method": "margin"},
    "activeft": {"method": "activeft"},
    "vecaf-ods": {"method": "vecaf"},
    # Eq. 3 as written (p = L / sum L) instead of the default tempered p ~ L^0.5 (docs/fidelity.md)
    "vecaf-ods-eq3": {"method": "vecaf", "selection_options": {"loss_power": 1.0}},
    # the earlier loops' picks held as fixed centroids of Eq. 7 (for --cumulative; docs/fidelity.md)
    "vecaf-ods-lc": {"method": "vecaf", "selection_options": {"labelled_centroids": True}},
    # ... and also pushed from them in Eq. 7's diversity term (docs/fidelity.md)
    "vecaf-ods-lcr": {
        "method": "vecaf", "selection_options": {"labelled_centroids": True, "labelled_repulsion": True},
    },
    "vecaf": {"method": "vecaf", "text": True},
    "full": {"method": "full"},
    # Table 5: ODS = the loss term of Eq. 7 (off: constant losses); CEA = captions in selection and Eq. 10.
    "ods-off/cea-off": {"method": "vecaf", "use_losses": False},
    "ods-on/cea-off": {"method": "vecaf"},
    "ods-off/cea-on": {"method": "vecaf", "use_losses": False, "text": True},
    "ods-on/cea-on": {"method": "vecaf", "text": True},
}
DEFAULTS = {
    "head": {
        "pool": 2000, "test": 10000, "image_size": 64, "batch_budget": 300, "batch_size": 32,
        "eval_every": 10, "seeds": 5, "lr": 5e-4,
    },
    "full": {
        "pool": 1000, "test": 500, "image_size": 64, "batch_budget": 30, "batch_size": 32,
        "eval_every": 5, "seeds": 3, "lr": 5e-4,
    },
}
QUICK = {
    "head": {"pool": 1000, "test": 1000, "batch_budget": 60, "eval_every": 10, "seeds": 2},
    "full": {"pool": 300, "test": 200, "batch_budget": 9, "batch_size": 16, "eval_every": 3, "seeds": 1},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["head", "full"], default="head")
    p.add_argument("--quick", action="store_true", help="small smoke run (written with a -quick suffix)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.02, 0.05], help="selection ratio per loop")
    p.add_argument("--methods", nargs="+", default=TABLE1_METHODS, choices=sorted(METHOD_SPECS))
    p.add_argument("--seeds", type=int, help="seeds per cell (default: 5 head, 3 full)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + seeds - 1")
    p.add_argument("--loops", type=int, default=3)
    p.add_argument("--cumulative", action="store_true",
                   help="each loop trains on all picks so far (finetune(cumulative=True)); default: its own picks")
    p.add_argument("--pool", type=int, help="pool size (stratified subset of the training split)")
    p.add_argument("--validation", action="store_true",
                   help="evaluate on a validation set carved from the training split (disjoint from the pool, "
                        "--test images) instead of the test split, for choosing a protocol; -validation suffix")
    p.add_argument("--test", type=int, help="test size (stratified subset of the test split)")
    p.add_argument("--image-size", type=int, help="input side in pixels")
    p.add_argument("--batch-budget", type=int, help="total training batches B (every method)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--eta", type=float, default=0.5, help="CEA step size (Eq. 9, K-normalised as in vecaf.cea)")
    p.add_argument("--lam-bw-default", type=float, default=0.998, help="lam_bw of Eq. 10 for VeCAF with CEA")
    p.add_argument("--targets", type=float, nargs=2, help="B2A targets (fractions); default 90%%/95%% of full FT")
    p.add_argument("--ablation", action="store_true", help="also run Table 5 (ODS on/off x CEA on/off)")
    p.add_argument("--ablation-ratio", type=float, default=0.01)
    p.add_argument("--lam-bw", type=float, nargs="*", default=[], help="Table 6 sweep values of lam_bw")
    p.add_argument("--sweep-ratio", type=float, default=0.02)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--cache", type=Path, default=REPO / ".vecaf" / "cache" / "quality")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    settings = dict(DEFAULTS[args.mode])
    if args.quick:
        settings.update(QUICK[args.mode])
    for key in ("pool", "test", "image_size", "batch_budget", "batch_size", "eval_every", "seeds", "lr"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    args.settings = settings
    return args


# ----- cached inputs -------------------------------------------------------------------------------------------


def _cache_key(split: str, size: int, image_size: int) -> str:
    return f"{DATASET}_{split}_n{size}_seed0_{PVM_NAME}_{image_size}px"


def load_inputs(args: argparse.Namespace, log) -> dict[str, Any]:
    """Pool and test datasets, their PVM features (cached), and the pool's caption embeddings (cached)."""
    from vecaf.data import load_dataset
    from vecaf.models import embed, load_pvm

    s = args.settings
    args.cache.mkdir(parents=True, exist_ok=True)
    pvm = load_pvm(PVM_NAME)
    pool = load_dataset(DATASET, split="train", limit=s["pool"], seed=0)
    if args.validation:
        test = validation_set(pool, s["test"])
    else:
        test = load_dataset(DATASET, split="test", limit=s["test"], seed=0)
    timings: dict[str, float] = {}
    features = {}
    test_split = "validation" if args.validation else "test"
    for key, split, dataset in (("train", "train", pool), ("test", test_split, test)):
        path = args.cache / f"{_cache_key(split, len(dataset), s['image_size'])}.npz"
        if path.is_file():
            stored = np.load(path)
            if list(stored["ids"]) == list(dataset.ids):
                features[key] = stored["features"]
                continue
        t0 = time.perf_counter()
        log(f"embedding {len(dataset)} {split} images at {s['image_size']} px (cached in {path})")
        feats = embed(pvm, dataset, image_size=s["image_size"], batch_size=128, device=args.device, progress=False)
        timings[f"embed_{split}"] = time.perf_counter() - t0
        save_npz(path, features=feats, ids=np.array(dataset.ids), labels=dataset.labels)
        features[key] = feats
    text = load_text_embeddings(args, pvm, pool, log, timings)
    return {"pvm": pvm, "pool": pool, "test": test, "features": features, "text": text, "timings": timings}


def validation_set(pool, size: int):
    """``size`` training images disjoint from ``pool``: the next ones of the same seeded stratified order.

    The pool is the first ``len(pool)`` images of the training split's stratified order (seed 0), so the
    images ranked ``len(pool) .. len(pool) + size - 1`` are a stratified sample the pool never contains.
    """
    from vecaf.data import ArrayImageDataset, load_dataset

    both = load_dataset(DATASET, split="train", limit=len(pool) + size, seed=0)
    in_pool = set(pool.ids)
    keep = np.array([i not in in_pool for i in both.ids])
    if int(keep.sum()) != size:
        raise RuntimeError(f"validation set: expected {size} images outside the pool, found {int(keep.sum())}")
    return ArrayImageDataset(
        both.images[keep], name=both.name, split="train", ids=[i for i, k in zip(both.ids, keep) if k],
        labels=both.labels[keep], class_names=both.class_names,
    )


def load_text_embeddings(args, pvm, pool, log, timings) -> np.ndarray:
    """Captions of every pool image by the default captioner, encoded by the default text encoder (cached)."""
    from vecaf.models import load_captioner, load_text_encoder

    s = args.settings
    key = f"{_cache_key('train', len(pool), s['image_size'])}_{CAPTIONER}_{TEXT_ENCODER}"
    path = args.cache / f"{key}.npz"
    if path.is_file():
        stored = np.load(path)
        if list(stored["ids"]) == list(pool.ids):
            return stored["text"]
    t0 = time.perf_counter()
    log(f"captioning {len(pool)} pool images ({CAPTIONER}) and encoding the captions ({TEXT_ENCODER})")
    captioner = load_captioner(CAPTIONER, pvm=pvm, device=args.device, image_size=s["image_size"])
    names = [pool.class_names[y] for y in pool.labels]
    captions = captioner.caption(pool.images, names, batch_size=128)
    timings["caption"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    text = load_text_encoder(TEXT_ENCODER, device=args.device).encode(captions, batch_size=128)
    timings["encode_text"] = time.perf_counter() - t0
    save_npz(path, text=text, ids=np.array(pool.ids), captions=np.array(captions))
    return text


def image_tensors(pvm, dataset, image_size: int):
    """The PVM's eval preprocessing of every image, stacked once: (N, 3, S, S)."""
    import torch

    transform = pvm.transform(image_size=image_size)
    return torch.stack([transform(dataset.load_image(i)) for i in range(len(dataset))])


# ----- runs ----------------------------------------------------------------------------------------------------


def run_one(args, inputs, data, *, name: str, ratio: float, seed: int, lam_bw: float | None = None) -> dict[str, Any]:
    from vecaf.train import finetune

    s = args.settings
    spec = dict(METHOD_SPECS[name])
    use_text = spec.pop("text", False)
    kw: dict[str, Any] = dict(
        mode=args.mode, ratio=ratio, loops=args.loops, batch_budget=s["batch_budget"], batch_size=s["batch_size"],
        lr=s["lr"], eval_every=s["eval_every"], seed=seed, device=args.device, eta=args.eta,
        cumulative=args.cumulative,
        lam_bw=args.lam_bw_default if lam_bw is None else lam_bw, return_model=False, **spec,
    )
    if use_text:
        kw["text_embeddings"] = inputs["text"]
    if args.mode == "head":
        result = finetune(None, data["train"], data["test"], **kw)
    else:
        result = finetune(
            inputs["pvm"], data["train"], data["test"], train_features=inputs["features"]["train"],
            test_features=inputs["features"]["test"], image_size=s["image_size"], **kw,
        )
    return {
        "method": name,
        "ratio": ratio,
        "seed": seed,
        "lam_bw": kw["lam_bw"] if use_text else None,
        "top1": result.top1,
        "loss": result.final.loss,
        "loop_top1": [r.top1 for r in result.loops],
        "per_class": [None if not math.isfinite(v) else float(v) for v in result.per_class_accuracy],
        "curve": [[p.batches, p.top1, p.loss] for p in result.curve],
        "loops": [
            {"end_batches": r.end_batches, "batches": r.batches, "seconds": dict(r.seconds)} for r in result.loops
        ],
        "seconds": result.timings,
        "picks": [r.picks.tolist() for r in result.loops if r.picks is not None],
        "notes": result.notes,
    }


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error s / sqrt(n) (ddof 1; 0 for one value)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    se = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else 0.0
    return float(arr.mean()), se


def b2a(curve: list[list[float]], target: float) -> int | None:
    from vecaf.train import batches_to_accuracy

    return batches_to_accuracy([(int(b), float(a)) for b, a, _ in curve], target)


def summarize(runs: list[dict[str, Any]], targets: list[float]) -> dict[str, Any]:
    """Per (method, ratio[, lam_bw]): mean +- s.e. of final and per-loop top-1, B2A per seed and of the mean curve."""
    cells: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        key = f"{r['method']}@{r['ratio']:g}" + (f"@lam{r['lam_bw']:g}" if r.get("sweep") else "")
        cells.setdefault(key, []).append(r)
    out = {}
    for key, group in cells.items():
        top1 = mean_se([g["top1"] for g in group])
        loops = [mean_se([g["loop_top1"][i] for g in group]) for i in range(len(group[0]["loop_top1"]))]
        batches = [p[0] for p in group[0]["curve"]]
        mean_curve = [[b, float(np.mean([g["curve"][i][1] for g in group]))] for i, b in enumerate(batches)]
        out[key] = {
            "method": group[0]["method"],
            "ratio": group[0]["ratio"],
            "seeds": len(group),
            "top1_mean": top1[0],
            "top1_se": top1[1],
            "loop_top1": [{"mean": m, "se": e} for m, e in loops],
            "b2a": {
                f"{t:.4f}": {
                    "per_seed": [b2a(g["curve"], t) for g in group],
                    "mean_curve": b2a([[b, a, 0.0] for b, a in mean_curve], t),
                }
                for t in targets
            },
            "mean_curve": mean_curve,
            "seconds_mean": float(np.mean([g["seconds"]["total"] for g in group])),
        }
    return out


def machine() -> dict[str, Any]:
    """``_common.machine_info`` taken when the run is over (the load average is "at end")."""
    from benchmarks import _common

    return _common.machine_info(at="end")


def table(summary: dict[str, Any], methods: list[str], ratios: list[float], targets: list[float]) -> str:
    head = "| method | " + " | ".join(f"top-1 @ {r:.0%}/loop" for r in ratios) + " | " + " | ".join(
        f"B2A@{t:.3f} ({ratios[0]:.0%})" for t in targets
    ) + " |"
    lines = [head, "|" + "---|" * (1 + len(ratios) + len(targets))]
    for m in methods:
        cells = []
        for r in ratios:
            c = summary.get(f"{m}@{r:g}")
            cells.append("-" if c is None else f"{100 * c['top1_mean']:.2f} ± {100 * c['top1_se']:.2f}")
        first = summary.get(f"{m}@{ratios[0]:g}")
        for t in targets:
            v = None if first is None else first["b2a"][f"{t:.4f}"]["mean_curve"]
            cells.append("never" if v is None else str(v))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    s = args.settings
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    log(f"settings: mode={args.mode} {s} ratios={args.ratios} loops={args.loops} methods={args.methods}")
    inputs = load_inputs(args, log)
    pool, test = inputs["pool"], inputs["test"]
    if args.mode == "head":
        data = {"train": (inputs["features"]["train"], pool.labels), "test": (inputs["features"]["test"], test.labels)}
    else:
        t0 = time.perf_counter()
        data = {
            "train": (image_tensors(inputs["pvm"], pool, s["image_size"]), pool.labels),
            "test": (image_tensors(inputs["pvm"], test, s["image_size"]), test.labels),
        }
        inputs["timings"]["preprocess"] = time.perf_counter() - t0
    seeds = list(range(args.first_seed, args.first_seed + s["seeds"]))
    runs: list[dict[str, Any]] = []
    t_runs = time.perf_counter()
    for seed in seeds:
        if "full" in args.methods:
            run = run_one(args, inputs, data, name="full", ratio=args.ratios[0], seed=seed)
            for r in args.ratios:
                runs.append({**run, "ratio": r})
            log(f"seed {seed} full-data FT: top-1 {run['top1']:.4f} ({run['seconds']['total']:.1f}s)")
        for ratio in args.ratios:
            for name in args.methods:
                if name == "full":
                    continue
                run = run_one(args, inputs, data, name=name, ratio=ratio, seed=seed)
                runs.append(run)
                log(f"seed {seed} ratio {ratio:g} {name}: top-1 {run['top1']:.4f} ({run['seconds']['total']:.1f}s)")
    extra: list[dict[str, Any]] = []
    if args.ablation:
        for seed in seeds:
            for name in ("ods-off/cea-off", "ods-on/cea-off", "ods-off/cea-on", "ods-on/cea-on"):
                run = run_one(args, inputs, data, name=name, ratio=args.ablation_ratio, seed=seed)
                extra.append(run)
                log(f"ablation seed {seed} {name}: top-1 {run['top1']:.4f}")
    for lam in args.lam_bw:
        for seed in seeds:
            run = run_one(args, inputs, data, name="vecaf", ratio=args.sweep_ratio, seed=seed, lam_bw=lam)
            run["sweep"] = True
            extra.append(run)
            log(f"lam_bw {lam:g} seed {seed}: top-1 {run['top1']:.4f}")
    run_seconds = time.perf_counter() - t_runs

    full_runs = [r for r in runs if r["method"] == "full"]
    if args.targets:
        targets = list(args.targets)
        target_rule = "given on the command line"
    elif full_runs:
        ref = float(np.mean([r["top1"] for r in full_runs]))
        targets = [round(0.90 * ref, 4), round(0.95 * ref, 4)]
        target_rule = f"90% and 95% of full-data FT's mean final top-1 ({ref:.4f})"
    else:
        targets = [0.5, 0.7]
        target_rule = "fixed 0.5 / 0.7 (no full-data FT run)"
    summary = summarize(runs, targets)
    extra_summary = summarize(extra, targets) if extra else {}
    suffix = ("-cumulative" if args.cumulative else "") + ("-validation" if args.validation else "")
    suffix += "-quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"quality-{args.mode}{suffix}.json"
    report = {
        "benchmark": "quality",
        "protocol": "Table 1 / Fig. 4-5 of the VeCAF paper, scaled: Fashion-MNIST, EfficientNet-Lite0 (ImageNet)",
        "settings": {
            "mode": args.mode,
            "quick": args.quick,
            "dataset": DATASET,
            "pvm": PVM_NAME,
            "captioner": CAPTIONER,
            "text_encoder": TEXT_ENCODER,
            "pool_size": len(pool),
            "test_size": len(test),
            "evaluated_on": "validation (training split, disjoint from the pool)" if args.validation else "test split",
            "ratios": args.ratios,
            "loops": args.loops,
            "cumulative": args.cumulative,
            "methods": args.methods,
            "seeds": seeds,
            "eta": args.eta,
            "lam_bw": args.lam_bw_default,
            "targets": targets,
            "target_rule": target_rule,
            "optimizer": {"name": "SGD", "lr": s["lr"], "weight_decay": 1e-4, "momentum": 0.9, "schedule": "cosine"},
            "freeze_bn": True,
            **{k: s[k] for k in ("image_size", "batch_budget", "batch_size", "eval_every")},
            "ablation_ratio": args.ablation_ratio if args.ablation else None,
            "lam_bw_sweep": args.lam_bw,
            "sweep_ratio": args.sweep_ratio if args.lam_bw else None,
        },
        "machine": machine(),
        "seconds": {"total": time.perf_counter() - t_start, "runs": run_seconds, **inputs["timings"]},
        "summary": summary,
        "ablation_and_sweep": extra_summary,
        "runs": runs + extra,
    }
    json_path.write_text(json.dumps(report, indent=1))
    if not args.no_plots:
        from benchmarks.plots import plot_b2a, plot_curves

        report["plots"] = [
            str(plot_curves(summary, args.methods, args.ratios, args.out / f"quality-{args.mode}{suffix}-curves.png",
                            title=f"Fashion-MNIST, {args.mode} mode: test top-1 vs training batches")),
            str(plot_b2a(summary, args.methods, args.ratios, targets, args.out / f"quality-{args.mode}{suffix}-b2a.png",
                         title=f"Fashion-MNIST, {args.mode} mode: batches to reach the target top-1")),
        ]
        json_path.write_text(json.dumps(report, indent=1))
    brief = {k: v for k, v in report.items() if k not in ("runs",)}
    brief["summary"] = {k: {kk: vv for kk, vv in v.items() if kk != "mean_curve"} for k, v in summary.items()}
    brief["ablation_and_sweep"] = {
        k: {kk: vv for kk, vv in v.items() if kk != "mean_curve"} for k, v in extra_summary.items()
    }
    print(json.dumps(brief, indent=1))
    print(table(summary, args.methods, args.ratios, targets), file=sys.stderr)
    log(f"wrote {json_path}")
    return report


if __name__ == "__main__":
    main()
