"""Extraction speed: ``vecaf.models.embed`` against a plain timm forward loop, same model, images and settings.

The PVM embedding e_i = f(x_i) (the pre-logits features that ODS, Eq. 7, and CEA, Eq. 8-10, work on) is
computed for N Fashion-MNIST training images two ways, end to end (decode + transform + forward + copy out):

- plain: the timm model in eval mode, ``for _, x, _ in DataLoader(TransformedDataset(pool, transform))``,
  ``model.forward_head(model.forward_features(x), pre_logits=True)`` under ``torch.no_grad()``; timm's own
  eval transform, default memory format and threads, no workers (how a user would write it);
- ours: ``vecaf.models.embed(pvm, pool, ...)`` with its own preprocessing (channels-last, inference mode).

Both run on the same device, batch size and input side S; one warm-up batch each comes first, then
``--repeats`` interleaved rounds (:func:`_common.interleaved`). Throughput is r = N / t (images/s); the
headline ratio is the median over rounds of r_ours / r_plain (each round's two runs are adjacent in time,
so machine noise mostly cancels); the ratio of the median rates is reported beside it. Goal: >= 0.9.
The two embeddings are compared: max |e_ours - e_plain| and ``allclose`` with the stated tolerance
(they differ only by float summation order: channels-last against contiguous convolutions).

    python benchmarks/extract_speed.py                       # 1024 images, 224 px, batch 64
    python benchmarks/extract_speed.py --image-size 64       # the pipeline's default input side
    python benchmarks/extract_speed.py --quick               # smoke run (tiny sizes)

Prints the JSON and writes it to ``benchmarks/results/extract-speed.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

GOAL_RATIO = 0.9
QUICK = {"n": 16, "batch_size": 8, "image_size": 32, "repeats": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` overrides the sizes with tiny ones."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="efficientnet_lite0", help="PVM name for vecaf.models.load_pvm")
    p.add_argument("--n", type=_common.positive_int, default=1024, help="images embedded per run")
    p.add_argument("--batch-size", type=_common.positive_int, default=64)
    p.add_argument("--image-size", type=_common.positive_int, default=224, help="input side S in pixels")
    p.add_argument(
        "--device", type=_common.device_name, default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'"
    )
    p.add_argument("--repeats", type=_common.positive_int, default=3, help="interleaved rounds")
    p.add_argument("--rtol", type=_common.positive_float, default=None, help="allclose rtol (default by device)")
    p.add_argument("--atol", type=_common.positive_float, default=None, help="allclose atol (default by device)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/extract-speed.json)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.out is None:
        args.out = _common.RESULTS_DIR / ("extract-speed-quick.json" if args.quick else "extract-speed.json")
    return args


def default_tolerance(device_type: str) -> tuple[float, float]:
    """(rtol, atol) for comparing the two embeddings.

    On a CPU both are float32 with a different summation order: 1e-3 relative and absolute leaves a wide
    margin over the observed differences (~1e-5 of features whose magnitude reaches ~10). On CUDA cuDNN may
    use TF32 convolutions (10-bit mantissa) with different algorithms for the two memory formats, hence 1e-2.
    """
    return (1e-2, 1e-2) if device_type == "cuda" else (1e-3, 1e-3)


def plain_transform(model: Any, image_size: int) -> Any:
    """timm's eval transform of ``model`` at input side S (resize, centre crop, normalise)."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({}, model=model)
    config["input_size"] = (3, image_size, image_size)
    return create_transform(**config, is_training=False)


def plain_embed(model: Any, dataset: Any, transform: Any, *, batch_size: int, device: Any) -> np.ndarray:
    """The plain loop: DataLoader over the transformed pool, pre-logits features under ``no_grad``."""
    import torch

    from vecaf.data import TransformedDataset

    loader = torch.utils.data.DataLoader(TransformedDataset(dataset, transform), batch_size=batch_size)
    out = []
    with torch.no_grad():
        for _, x, _ in loader:
            x = x.to(device)
            out.append(model.forward_head(model.forward_features(x), pre_logits=True).cpu())
    return torch.cat(out).numpy()


def plain_embed_images(model: Any, images: list[Any], transform: Any, *, device: Any) -> np.ndarray:
    """The plain forward on a list of PIL images (warm-up)."""
    import torch

    with torch.no_grad():
        x = torch.stack([transform(im) for im in images]).to(device)
        return model.forward_head(model.forward_features(x), pre_logits=True).cpu().numpy()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure both approaches and build the report."""
    _common.setup_path()
    machine = _common.machine_info()
    import timm
    import torch

    from vecaf.data import load_dataset
    from vecaf.models import embed, load_pvm
    from vecaf.settings import resolve_device

    device = torch.device(resolve_device(args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"device {args.device!r} asked for but no CUDA device is visible")
    pvm = load_pvm(args.model)
    plain = timm.create_model(pvm.arch, pretrained=False)
    plain.load_state_dict(pvm.model.state_dict())
    plain.eval().to(device)
    transform = plain_transform(plain, args.image_size)
    pool = load_dataset("fashion-mnist", split="train", limit=args.n)
    n = len(pool)

    warm = [pool.load_image(i) for i in range(min(args.batch_size, n))]
    plain_embed_images(plain, warm, transform, device=device)
    embed(pvm, warm, batch_size=args.batch_size, device=str(device), image_size=args.image_size, progress=False)

    approaches = {
        "plain": lambda: plain_embed(plain, pool, transform, batch_size=args.batch_size, device=device),
        "ours": lambda: embed(
            pvm, pool, batch_size=args.batch_size, device=str(device), image_size=args.image_size, progress=False
        ),
    }
    seconds, first = _common.interleaved(approaches, repeats=args.repeats)

    e_plain, e_ours = np.asarray(first["plain"], dtype=np.float32), np.asarray(first["ours"], dtype=np.float32)
    if e_plain.shape != e_ours.shape:
        raise SystemExit(f"embedding shapes differ: plain {e_plain.shape}, ours {e_ours.shape}")
    rtol_default, atol_default = default_tolerance(device.type)
    rtol = args.rtol if args.rtol is not None else rtol_default
    atol = args.atol if args.atol is not None else atol_default
    diff = np.abs(e_ours - e_plain)
    rates = {name: _common.rate_summary(n, secs) for name, secs in seconds.items()}
    paired = [p / o for p, o in zip(seconds["plain"], seconds["ours"])]
    ratio = _common.median(paired)
    return {
        "benchmark": "extract-speed",
        "time": _common.utc_now(),
        "quick": bool(args.quick),
        "model": args.model,
        "arch": pvm.arch,
        "dataset": "fashion-mnist/train",
        "n_images": n,
        "embedding_dim": int(e_ours.shape[1]),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "device": str(device),
        "num_workers": 0,
        "repeats": args.repeats,
        "plain_images_per_s": rates["plain"]["per_s"],
        "ours_images_per_s": rates["ours"]["per_s"],
        "ratio_ours_over_plain": ratio,
        "ratio_of_median_rates": rates["ours"]["per_s"] / rates["plain"]["per_s"],
        "paired_ratios": paired,
        "goal_ratio": GOAL_RATIO,
        "meets_goal": bool(ratio >= GOAL_RATIO),
        "plain": rates["plain"],
        "ours": rates["ours"],
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_value": float(np.abs(e_plain).max()),
        "rtol": rtol,
        "atol": atol,
        "allclose": bool(np.allclose(e_ours, e_plain, rtol=rtol, atol=atol)),
        "machine": {**machine, "load_average_at_end": _common.load_average()},
        "method": (
            "images/s = N / wall seconds of one full pass (decode + transform + forward + copy to numpy); "
            "rounds interleaved plain/ours, ours/plain, ...; ratio = median over rounds of plain_s / ours_s"
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run, print the JSON, write it to ``--out``."""
    return _common.run_and_report(parse_args, run, argv)


if __name__ == "__main__":
    main()
