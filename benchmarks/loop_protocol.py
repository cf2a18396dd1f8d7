"""The loop-protocol measurement of ``docs/engine.md`` ("Loop protocol"): per-loop vs cumulative vs replay,
and the learning rate of a fresh head, on a validation split carved from the training pool.

    python benchmarks/loop_protocol.py features            # cache the demo's features (about 2 min on a CPU)
    python benchmarks/loop_protocol.py run '[{"lr": 5e-4, "cumulative": true}, {"lr": 0.05}]' --on val
    python benchmarks/loop_protocol.py run '[{"lr": 5e-4, "cumulative": true}]' --on test   # check only
    python benchmarks/loop_protocol.py run '[{...}, {...}]' --seeds 10 --out results/x.json  # + paired summary

Features are the demo's: Fashion-MNIST (3000-image pool, 1000 test images, seeded stratified subsets),
EfficientNet-Lite0 at 64 px, captions of the ImageNet-label captioner embedded with MiniLM. ``--on val``
carves 60 images per class out of the pool (seeded by the run's seed) as the held-out set and selects from
the remaining 2400; ``--on test`` uses the whole pool and the test split (for a check after the choice,
never for the choice). Each setting is a dict of ``vecaf.finetune`` keywords over the demo's settings.
``--out`` also writes the runs with, for every setting after the first, the paired difference of its final-loop
top-1 minus the first setting's over the seeds (mean and standard error).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import save_npz  # noqa: E402

CACHE = Path(".vecaf/cache/loop-protocol.npz")
DEMO = dict(mode="head", method="vecaf", loops=3, batch_budget=300, batch_size=32, lr=0.05, eta=1.0, lam_bw=0.998,
            selection_options={"loss_power": 0.5}, num_classes=10, device="cpu", return_model=False)  # fmt: skip


def features(path: Path = CACHE) -> None:
    """Embed the demo's pool and test split and caption the pool; save everything to ``path``."""
    from vecaf.data import load_dataset
    from vecaf.models import embed, load_captioner, load_pvm, load_text_encoder

    pool = load_dataset("fashion-mnist", split="train", limit=3000, seed=0)
    test = load_dataset("fashion-mnist", split="test", limit=1000, seed=0)
    pvm = load_pvm()
    px = embed(pvm, pool, image_size=64, device="cpu", progress=False)
    tx = embed(pvm, test, image_size=64, device="cpu", progress=False)
    captioner = load_captioner("imagenet-labels", pvm=pvm, device="cpu", image_size=64)
    captions = captioner.caption([pool.load_image(i) for i in range(len(pool))],
                                 [pool.class_names[int(y)] for y in pool.labels], batch_size=64)  # fmt: skip
    te = load_text_encoder().encode(captions, batch_size=64)
    save_npz(path, px=px, py=np.asarray(pool.labels), tx=tx, ty=np.asarray(test.labels), te=np.asarray(te))
    print(f"saved {path}: pool {px.shape}, test {tx.shape}, mean feature norm {np.linalg.norm(px, axis=1).mean():.1f}")


def validation_split(labels: np.ndarray, seed: int, per_class: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """(pool rows, validation rows): ``per_class`` images of every class carved out, seeded."""
    rng = np.random.default_rng(1000 + seed)
    val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)])
    return np.setdiff1d(np.arange(len(labels)), val), np.sort(val)


def run_one(d: dict, setting: dict, *, on: str, seed: int) -> list[tuple[float, float]]:
    """Per-loop (held-out top-1, held-out loss) of one run."""
    from vecaf.train import finetune

    px, py, te = d["px"], d["py"], d["te"]
    if on == "val":
        rows, val = validation_split(py, seed)
        train, held, text = (px[rows], py[rows]), (px[val], py[val]), te[rows]
    else:
        train, held, text = (px, py), (d["tx"], d["ty"]), te
    result = finetune(None, train, held, budget=30, text_embeddings=text, seed=seed, **{**DEMO, **setting})
    return [(round(r.top1, 3), round(r.test_loss, 2)) for r in result.loops]


def paired_final(runs: list[dict]) -> list[dict]:
    """For each run after the first: its final-loop top-1 minus the first run's, seed by seed (mean, s.e.)."""
    base = [seed[-1][0] for seed in runs[0]["per_seed"]]
    out = []
    for run in runs[1:]:
        diff = np.array([seed[-1][0] for seed in run["per_seed"]]) - np.array(base)
        se = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else 0.0
        out.append({"setting": run["setting"], "minus": runs[0]["setting"], "mean": float(diff.mean()), "se": se,
                    "seeds": int(diff.size), "per_seed": diff.round(4).tolist()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("features", "run"))
    parser.add_argument("settings", nargs="?", default='[{"lr": 5e-4, "cumulative": true}]')
    parser.add_argument("--on", choices=("val", "test"), default="val")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the runs and the paired final-loop differences here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.what == "features":
        features()
        return
    d = dict(np.load(CACHE))
    seeds = range(args.seeds) if args.on == "val" else [0]
    rows = []
    for setting in json.loads(args.settings):
        t0 = time.perf_counter()
        runs = [run_one(d, setting, on=args.on, seed=s) for s in seeds]
        top1 = np.array([[a for a, _ in r] for r in runs]).mean(0).round(3).tolist()
        loss = np.array([[b for _, b in r] for r in runs]).mean(0).round(2).tolist()
        monotone = sum(all(x[0] <= y[0] for x, y in zip(r, r[1:])) for r in runs)
        rows.append({"setting": setting, "on": args.on, "top1": top1, "loss": loss, "monotone": monotone,
                     "seeds": len(runs), "per_seed": runs, "seconds": round(time.perf_counter() - t0)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        from benchmarks.quality import machine

        report = {"benchmark": "loop-protocol", "command": " ".join(sys.argv), "machine": machine(), "runs": rows,
                  "paired_final_minus_first": paired_final(rows)}  # fmt: skip
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
