"""Finetuning engine speed: training images/s of ``vecaf.train.finetune`` (full mode) against a plain PyTorch loop.

Same model (the embedded EfficientNet-Lite0 with a fresh 10-class head), same images (scikit-learn's 1,797
digits, upsampled to ``--image-size`` and repeated over 3 channels), same batch size, same optimiser (SGD lr 5e-4,
momentum 0.9, weight decay 1e-4, batch-norm statistics frozen). For each precision (float32; bf16 autocast on
CUDA) in one process:

(a) plain: ``model.train()`` with frozen BN, B random batches, forward / cross-entropy / backward / step;
(b) engine: ``finetune(mode="full", method=...)`` over the same B batches in L = 3 loops, which adds one
    batched pass over the pool per loop (losses and embeddings), the selection, and one test evaluation.

Reported: training images/s of each (the engine's from its ``train`` phase alone, and overall), the ratio
engine / plain (goal: close to 1, the engine adds no per-batch overhead), the phase times of the engine, the
bf16 / float32 speed-up; ``--compile`` adds a torch.compile'd engine run. Absolute numbers mean something only
on a GPU; on a CPU keep ``--image-size`` small.

    python benchmarks/engine_speed.py --device cuda --compile        # H200: 224 px, batch 128
    python benchmarks/engine_speed.py --quick                        # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

QUICK = {"image_size": 32, "batch_size": 8, "batches": 6, "pool": 240}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` shrinks everything for a CPU smoke run."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=_common.positive_int, default=224)
    p.add_argument("--batch-size", type=_common.positive_int, default=128)
    p.add_argument("--batches", type=_common.positive_int, default=60, help="batch budget B (a multiple of 3)")
    p.add_argument("--pool", type=_common.positive_int, default=1500, help="training images (the rest test)")
    p.add_argument("--method", default="vecaf", help="the engine's selection method")
    p.add_argument("--compile", action="store_true", help="also time a torch.compile'd engine run (bf16 on CUDA)")
    p.add_argument("--device", type=_common.device_name, default="auto")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    p.add_argument("--out", default=str(_common.RESULTS_DIR / "engine-speed.json"))
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.batches % 3:
        p.error(f"--batches must be a multiple of the 3 loops, got {args.batches}")
    return args


def digit_images(image_size: int, pool: int):
    """(train, test): ((N, 3, S, S) float tensors in [-1, 1], labels) from scikit-learn's digits."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    x = torch.from_numpy((d.images / 8.0 - 1.0).astype(np.float32))[:, None]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = d.target.astype(np.int64)
    tr, te = order[:pool], order[pool:]
    return (x[tr].contiguous(), y[tr]), (x[te].contiguous(), y[te])


def fresh_pvm():
    """A freshly loaded embedded PVM (the engine replaces its head in place)."""
    from vecaf.models import load_pvm

    return load_pvm()


def plain_loop(train, *, batches: int, batch_size: int, device: str, amp: bool) -> float:
    """Seconds of B plain training steps (frozen BN) on random batches, after one untimed warm-up step."""
    import contextlib

    import numpy as np
    import torch
    import torch.nn as nn

    model = fresh_pvm().model
    model.reset_classifier(10)
    model = model.to(device)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    opt = torch.optim.SGD(model.parameters(), lr=5e-4, momentum=0.9, weight_decay=1e-4)
    x_all, y_all = train
    rng = np.random.default_rng(0)
    use_amp = amp and device.startswith("cuda")

    def step() -> None:
        idx = torch.from_numpy(rng.integers(0, len(y_all), batch_size))
        x = x_all[idx].to(device, non_blocking=True)
        y = torch.from_numpy(y_all[idx.numpy()]).to(device)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
        with ctx:
            loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    _common.sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        step()
    _common.sync(device)
    return time.perf_counter() - t0


def engine_run(train, test, args, device: str, *, amp: bool, compile: bool) -> dict[str, Any]:
    from vecaf.train import finetune

    result = finetune(
        fresh_pvm(), train, test, mode="full", method=args.method, ratio=0.1, loops=3,
        batch_budget=args.batches, batch_size=args.batch_size, eval_every=args.batches, eval_at_start=False,
        device=device, amp=amp, compile=compile, image_size=args.image_size, seed=0, return_model=False,
    )
    t = dict(result.timings)
    images = args.batches * args.batch_size
    return {
        "amp": amp, "compile": compile, "top1": result.top1, "seconds": t,
        "train_images_per_s": images / t["train"], "overall_images_per_s": images / t["total"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Plain and engine at each precision (and compiled), in one process."""
    _common.setup_path()
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = _common.machine_info()
    started = _common.utc_now()
    train, test = digit_images(args.image_size, args.pool)
    precisions = [False, True] if device.startswith("cuda") else [False]
    rows = []
    for amp in precisions:
        plain_s = plain_loop(train, batches=args.batches, batch_size=args.batch_size, device=device, amp=amp)
        engine = engine_run(train, test, args, device, amp=amp, compile=False)
        plain_rate = args.batches * args.batch_size / plain_s
        rows.append({
            "precision": "bf16-autocast" if amp else "float32", "plain_s": plain_s,
            "plain_images_per_s": plain_rate, "engine": engine,
            "ratio_engine_train_over_plain": engine["train_images_per_s"] / plain_rate,
        })
    compiled = engine_run(train, test, args, device, amp=len(precisions) > 1, compile=True) if args.compile else None
    report: dict[str, Any] = {
        "benchmark": "engine-speed",
        "started": started,
        "finished": _common.utc_now(),
        "machine": machine,
        "device": device,
        "settings": {k: getattr(args, k) for k in ("image_size", "batch_size", "batches", "pool", "method", "quick")},
        "rows": rows,
        "compiled": compiled,
    }
    if len(rows) == 2:
        report["bf16_speedup_plain"] = rows[1]["plain_images_per_s"] / rows[0]["plain_images_per_s"]
        report["bf16_speedup_engine_train"] = (
            rows[1]["engine"]["train_images_per_s"] / rows[0]["engine"]["train_images_per_s"]
        )
    if compiled is not None:
        report["compile_speedup_engine_train"] = compiled["train_images_per_s"] / rows[-1]["engine"]["train_images_per_s"]
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run, print the JSON, write it to ``--out``."""
    return _common.run_and_report(parse_args, run, argv)


if __name__ == "__main__":
    main()
