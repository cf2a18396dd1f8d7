"""Which per-sample weights should VeCAF's selection use? A one-loop probe on the validation split (issue 14).

The headroom benchmark (``quality_headroom.py``) showed VeCAF's loop 2 collapsing. This probe isolates that
step at the same scale and protocol, on the validation split carved from the training split (the 55,000-image
tuning pool and 5,000 validation images of ``quality_headroom.validation_split``; the test split is not read):

1. loop 1: a linear head on the cached EfficientNet-Lite0 features of K = 1 % random pool images, trained for
   1,000 batches of 32 (SGD, momentum 0.9, weight decay 1e-4, lr 5e-2 under the benchmark's one cosine decay
   over B = 3,000 batches: the first of its three loops);
2. the head's pool pass: logits z_i, observed losses L_i = CE(z_i, y_i), probabilities p_i;
3. each variant selects the second K (loop 1's picks excluded) and the same head continues for loop 2's
   1,000 batches, either on the new picks only (the paper's per-loop protocol) or on both loops' picks
   (cumulative); the validation top-1 after loop 2 is the score.

Variants (``--variants``, comma-separated): ``random``, ``margin``, ``entropy``, ``activeft``, and ``vecaf``
(E = 5, no captions) with the weights p ~ W^beta of Eq. 3 for W = the observed loss (``vb:<beta>``, beta = 0.5
was the default before this probe), the loss of the temperature-scaled head (``vcal:<beta>``, T fitted by
validation-free NLL on the pool rows not trained on), the observed loss capped at log C (``vclip:<beta>``),
the expected loss under the head's own prediction, sum_c p_ic CE(z_i, c) = H(p_i) (``vent:<beta>``), one minus
the margin (``vmar:<beta>``), or constant weights (``vuni``); VeCAF options follow after slashes
(``vent:0.5/lam=0.5/max_iters=100``; lam, temperature, max_iters, ensemble, lr, match_neighbours). Per variant it also records where the picks lie:
the share misclassified by the head, the mean percentile of their observed loss and of their margin, and the
class counts; and, per weighting, the share of the selection weight on misclassified samples.

    python benchmarks/loss_weighting_probe.py --seed 0 --variants random,margin,vent:1,vb:0.5 --out /tmp/p0.json
    python benchmarks/loss_weighting_probe.py --merge /tmp/p0.json /tmp/p1.json   # -> results/loss-weighting-probe.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.quality import machine  # noqa: E402
from benchmarks.quality_headroom import load_features, validation_split  # noqa: E402

RATIO, BATCH_BUDGET, LOOP_BATCHES, LR, BATCH = 0.01, 3000, 1000, 5e-2, 32
VECAF_OPTIONS = {"lam": float, "temperature": float, "max_iters": int, "ensemble": int, "lr": float,
                 "match_neighbours": int}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="random,margin,entropy,activeft,vb:0.5,vent:1")
    p.add_argument("--out", type=Path, help="this seed's JSON (default: results/loss-weighting-probe-seed<seed>.json)")
    p.add_argument("--merge", type=Path, nargs="+", help="summarise per-seed JSONs into results/loss-weighting-probe.json")
    p.add_argument("--cache", type=Path, default=REPO / ".vecaf" / "cache" / "headroom")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    return p.parse_args(argv)


def parse_vecaf_variant(variant: str) -> tuple[str, float, dict]:
    """``name[:beta][/option=value...]`` -> (weights name, beta, VeCAF options), e.g. ``vent:0.5/lam=0.5``."""
    head, *pairs = variant.split("/")
    name, _, beta = head.partition(":")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in VECAF_OPTIONS:
            raise SystemExit(f"bad option {pair!r} in {variant!r}: use key=value with key in {', '.join(VECAF_OPTIONS)}")
        options[key] = VECAF_OPTIONS[key](value)
    return name, float(beta or 1.0), options


def lr_at(t: int) -> float:
    return 0.5 * LR * (1 + math.cos(math.pi * t / BATCH_BUDGET))


def train(head, opt, x, y, idx, t0: int, t1: int, gen) -> None:
    """Batches t0..t1-1 of the global cosine schedule on the rows ``idx`` (reshuffled when exhausted)."""
    idx = torch.as_tensor(idx)
    order = idx[torch.randperm(len(idx), generator=gen)]
    pos = 0
    for t in range(t0, t1):
        if pos + BATCH > len(order):
            order, pos = idx[torch.randperm(len(idx), generator=gen)], 0
        b = order[pos:pos + BATCH]
        pos += BATCH
        for g in opt.param_groups:
            g["lr"] = lr_at(t)
        loss = torch.nn.functional.cross_entropy(head(x[b]), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, mask: np.ndarray) -> float:
    """T minimising the mean NLL of softmax(z / T) over the masked rows (log-spaced grid 0.05..200)."""
    lg, yy = logits[torch.from_numpy(mask)], labels[torch.from_numpy(mask)]
    grid = np.exp(np.linspace(np.log(0.05), np.log(200), 120))
    nll = [float(torch.nn.functional.cross_entropy(lg / t, yy)) for t in grid]
    return float(grid[int(np.argmin(nll))])


def probe(args) -> dict:
    from vecaf.selection import select
    from vecaf.selection.uncertainty import entropy_scores, margin_scores

    torch.set_num_threads(1)
    seed = args.seed
    tr = load_features("train", None, args.cache, print)
    pool_idx, val_idx = validation_split(tr["labels"])
    x = torch.from_numpy(tr["features"][pool_idx])
    y = torch.from_numpy(tr["labels"][pool_idx]).long()
    xv = torch.from_numpy(tr["features"][val_idx])
    yv = torch.from_numpy(tr["labels"][val_idx]).long()
    n, d = x.shape
    c = int(y.max()) + 1
    k = int(round(RATIO * n))

    def top1(head) -> float:
        with torch.no_grad():
            return float((head(xv).argmax(1) == yv).float().mean())

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = torch.nn.Linear(d, c)
    opt = torch.optim.SGD(head.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    loop1 = np.random.default_rng(seed).choice(n, k, replace=False)
    train(head, opt, x, y, loop1, 0, LOOP_BATCHES, gen)
    acc1 = top1(head)
    state = ({key: v.clone() for key, v in head.state_dict().items()}, opt.state_dict())
    with torch.no_grad():
        logits = head(x)
        probs = logits.softmax(1)
        losses = torch.nn.functional.cross_entropy(logits, y, reduction="none").double().numpy()
    wrong = (logits.argmax(1) != y).numpy()
    margins, entropies = margin_scores(probs), entropy_scores(probs)
    loss_rank = losses.argsort().argsort() / n
    margin_rank = margins.argsort().argsort() / n
    held = np.ones(n, bool)
    held[loop1] = False
    temperature = fit_temperature(logits, y, held)
    with torch.no_grad():
        cal_losses = torch.nn.functional.cross_entropy(logits / temperature, y, reduction="none").double().numpy()

    def share(w: np.ndarray) -> dict:
        w = w / w.sum()
        return {"misclassified": float(w[wrong].sum()), "top5pct_loss": float(w[loss_rank >= 0.95].sum())}

    report = {
        "seed": seed, "pool": n, "validation": int(val_idx.size), "k": k, "loop1_top1": acc1,
        "pool_misclassified": float(wrong.mean()), "temperature": temperature,
        "held_nll": {"T=1": float(torch.nn.functional.cross_entropy(logits[held], y[held])),
                     "T fitted": float(torch.nn.functional.cross_entropy(logits[held] / temperature, y[held]))},
        "observed_loss_quantiles": dict(zip(["10", "50", "90", "99"], np.quantile(losses, [0.1, 0.5, 0.9, 0.99]).tolist())),
        "weight_share": {"L^1": share(losses), "L^0.5": share(losses ** 0.5), "L^0.25": share(losses ** 0.25),
                         "min(L,logC)^0.5": share(np.minimum(losses, math.log(c)) ** 0.5),
                         "calibrated L^1": share(cal_losses), "calibrated L^0.5": share(cal_losses ** 0.5),
                         "H (expected loss)": share(entropies)},
        "variants": {}, "machine": machine(),
    }
    print(f"seed {seed}: loop-1 validation top-1 {acc1:.4f}; {report['weight_share']}", flush=True)
    weights = {"vb": losses, "vcal": cal_losses, "vclip": np.minimum(losses, math.log(c)), "vent": entropies,
               "vmar": 1.0 - margins, "vuni": np.ones(n)}
    for variant in args.variants.split(","):
        t0 = time.perf_counter()
        if variant == "random":
            rest = np.setdiff1d(np.arange(n), loop1)
            picks = np.random.default_rng(seed + 1).choice(rest, k, replace=False)
        elif variant in ("margin", "entropy"):
            picks = select(x.numpy(), k, method=variant, probs=probs.numpy(), exclude=loop1, seed=seed)
        elif variant == "activeft":
            picks = select(x.numpy(), k, method="activeft", exclude=loop1, seed=seed)
        else:
            name, beta, options = parse_vecaf_variant(variant)
            if name not in weights:
                raise SystemExit(f"unknown variant {variant!r}")
            picks = select(x.numpy(), k, method="vecaf", losses=weights[name], exclude=loop1, seed=seed,
                           loss_power=beta, **options)
        row = {"select_s": time.perf_counter() - t0, "misclassified": float(wrong[picks].mean()),
               "loss_percentile": float(loss_rank[picks].mean()), "margin_percentile": float(margin_rank[picks].mean()),
               "class_counts": np.bincount(y[picks].numpy(), minlength=c).tolist()}
        for protocol, idx in (("per_loop", picks), ("cumulative", np.concatenate([loop1, picks]))):
            head.load_state_dict(state[0])
            opt.load_state_dict(state[1])
            train(head, opt, x, y, idx, LOOP_BATCHES, 2 * LOOP_BATCHES, torch.Generator().manual_seed(seed + 7))
            row[protocol] = top1(head)
        report["variants"][variant] = row
        print(variant, json.dumps(row), flush=True)
        out = args.out or args.results / f"loss-weighting-probe-seed{seed}.json"
        out.write_text(json.dumps(report, indent=1))
    return report


def merge(paths: list[Path], results: Path) -> dict:
    parts = [json.loads(p.read_text()) for p in paths]
    names = list(dict.fromkeys(v for part in parts for v in part["variants"]))
    summary = {}
    for v in names:
        rows = [part["variants"][v] for part in parts if v in part["variants"]]
        cell = {"seeds": [part["seed"] for part in parts if v in part["variants"]]}
        for key in ("per_loop", "cumulative", "misclassified", "loss_percentile", "margin_percentile", "select_s"):
            vals = [r[key] for r in rows]
            cell[key] = {"mean": float(np.mean(vals)), "per_seed": vals}
        summary[v] = cell
    report = {"benchmark": "loss-weighting-probe", "doc": __doc__.split("\n\n")[0], "summary": summary,
              "loop1_top1": {p["seed"]: p["loop1_top1"] for p in parts}, "parts": parts}
    path = results / "loss-weighting-probe.json"
    path.write_text(json.dumps(report, indent=1))
    print("| variant | seeds | per-loop top-1 | cumulative top-1 | misclassified | loss pct | margin pct | select s |")
    print("|---|---|---|---|---|---|---|---|")
    for v, cell in summary.items():
        print(f"| {v} | {len(cell['seeds'])} | {100 * cell['per_loop']['mean']:.2f} | {100 * cell['cumulative']['mean']:.2f} | "
              f"{cell['misclassified']['mean']:.2f} | {cell['loss_percentile']['mean']:.2f} | "
              f"{cell['margin_percentile']['mean']:.3f} | {cell['select_s']['mean']:.1f} |")
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    a = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    merge(a.merge, a.results) if a.merge else probe(a)
