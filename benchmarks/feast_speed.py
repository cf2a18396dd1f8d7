"""Feature-store speed: writing and materializing the pool's embeddings against computing them.

For a pool of N images the pipeline computes the PVM embeddings e_i (Eq. 7), writes them to the
``image_embeddings`` Parquet, registers the views (``apply``) and materializes them into the SQLite online
store; selection later bulk-reads them, a UI looks single images up. Each step is timed on a fresh store
folder per round (``--repeats`` rounds, medians reported), and its rate r = N / t is given in rows/s:

- compute: ``vecaf.models.embed`` on N Fashion-MNIST training images (``--source embed``, default), or,
  with ``--source random`` (scale test: N = 20000 random float32 rows of D = 1280), the rate measured by
  embedding ``--rate-n`` images, t_compute = N / r (or ``--images-per-s`` given);
- write: ``tasks.features.write_image_embeddings`` (with content hashes, as the embedding task writes);
- apply: ``tasks.features.apply_definitions``; materialize: ``materialize_incremental`` of the view;
- read: ``read_embeddings`` (the bulk read selection does), checked equal to what was written;
- online: ``online_features`` of one random image (latency, median and 95th percentile over ``--lookups``,
  after a first look-up that loads the registry and is reported apart) and of a batch of ``--batch-lookup``
  images; every value looked up is checked equal to the one written.

Headline: ratio = (t_write + t_apply + t_materialize) / t_compute, median over rounds (goal: <= 1; the
ratio without apply, a one-off registry step, is given beside it). The compute side uses the pipeline's
defaults: input side S = 64 (``DataParams.image_size``), batch 64, no loader workers.

    python benchmarks/feast_speed.py                              # 2048 Fashion-MNIST images
    python benchmarks/feast_speed.py --source random              # 20000 x 1280 random rows
    python benchmarks/feast_speed.py --quick                      # smoke run

Prints the JSON and writes ``benchmarks/results/feast-speed.json`` (``feast-speed-random.json`` for
``--source random``; ``--out`` to change). The store lives in a temporary folder removed at the end.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

GOAL_RATIO = 1.0
DEFAULT_N = {"embed": 2048, "random": 20000}
QUICK = {"n": 48, "image_size": 32, "batch_size": 16, "repeats": 1, "lookups": 5, "batch_lookup": 8, "rate_n": 16}
VIEW = "image_embeddings"
SPLIT = "train"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` overrides the sizes with tiny ones."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--source", choices=["embed", "random"], default="embed", help="pool embeddings: computed or random")
    p.add_argument("--n", type=_common.positive_int, default=None, help="pool rows (default 2048 embed, 20000 random)")
    p.add_argument("--dim", type=_common.positive_int, default=1280, help="D of random rows (--source random)")
    p.add_argument("--model", default="efficientnet_lite0", help="PVM name for vecaf.models.load_pvm")
    p.add_argument("--image-size", type=_common.positive_int, default=64, help="input side S (pipeline default 64)")
    p.add_argument("--batch-size", type=_common.positive_int, default=64)
    p.add_argument(
        "--device", type=_common.device_name, default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'"
    )
    p.add_argument("--rate-n", type=_common.positive_int, default=512, help="images embedded for the rate (random)")
    p.add_argument("--images-per-s", type=_common.positive_float, default=None, help="use this compute rate (random)")
    p.add_argument("--repeats", type=_common.positive_int, default=3, help="rounds, each on a fresh store")
    p.add_argument("--lookups", type=_common.positive_int, default=50, help="single-image online look-ups per round")
    p.add_argument("--batch-lookup", type=_common.positive_int, default=64, help="images in the batched look-up")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/feast-speed*.json)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.n is None:
        args.n = DEFAULT_N[args.source]
    if args.images_per_s is not None and args.source != "random":
        p.error("--images-per-s only applies to --source random")
    if args.out is None:
        stem = "feast-speed" + ("-random" if args.source == "random" else "") + ("-quick" if args.quick else "")
        args.out = _common.RESULTS_DIR / f"{stem}.json"
    return args


class Pool:
    """The rows written (ids, labels, content hashes) and what the compute step embeds.

    ``embed``: the first N Fashion-MNIST training images (seeded stratified subset). ``random``: a fixed
    (N, D) standard-normal float32 matrix, plus ``--rate-n`` images to measure the compute rate on.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        from tasks.features import content_hash
        from vecaf.data import load_dataset

        self.matrix: np.ndarray | None = None
        if args.source == "embed":
            from tasks.data import image_content_hashes

            self.images = load_dataset("fashion-mnist", split=SPLIT, limit=args.n)
            self.ids = list(self.images.ids)
            self.labels = np.asarray(self.images.labels, dtype=np.int64)
            self.hash_s, self.hashes = _common.timed(lambda: image_content_hashes(self.images))
        else:
            rng = np.random.default_rng(0)
            self.images = load_dataset("fashion-mnist", split=SPLIT, limit=args.rate_n)
            self.ids = [f"random/{i}" for i in range(args.n)]
            self.labels = (np.arange(args.n) % 10).astype(np.int64)
            self.matrix = rng.standard_normal((args.n, args.dim), dtype=np.float32)
            self.hash_s, self.hashes = _common.timed(lambda: [content_hash(i) for i in self.ids])
        self.n = len(self.ids)

    def warm_images(self, count: int) -> list[Any]:
        """The first ``count`` images as PIL images (a warm-up batch)."""
        return [self.images.load_image(i) for i in range(min(count, len(self.images)))]


def compute_step(pool: Pool, pvm: Any, args: argparse.Namespace, device: str) -> tuple[float, float, np.ndarray]:
    """(seconds to compute the pool's embeddings, images/s, the (N, D) embeddings)."""
    from vecaf.models import embed

    def run(images: Any) -> np.ndarray:
        return embed(pvm, images, batch_size=args.batch_size, device=device, image_size=args.image_size, progress=False)

    if pool.matrix is None:
        seconds, emb = _common.timed(lambda: run(pool.images))
        return seconds, pool.n / seconds, emb
    if args.images_per_s is not None:
        return pool.n / args.images_per_s, args.images_per_s, pool.matrix
    seconds, _ = _common.timed(lambda: run(pool.images))
    rate = len(pool.images) / seconds
    return pool.n / rate, rate, pool.matrix


def online_rows(store_dir: Path) -> int:
    """Distinct images in the SQLite online table of the view (what materialization loaded)."""
    with sqlite3.connect(store_dir / "online.db") as con:
        table = next(
            name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'") if name.endswith(VIEW)
        )
        return int(con.execute(f'SELECT COUNT(DISTINCT entity_key) FROM "{table}"').fetchone()[0])


def one_round(
    pool: Pool, pvm: Any, args: argparse.Namespace, *, device: str, store_dir: Path, pvm_key: str, seed: int
) -> dict[str, Any]:
    """Compute, write, apply, materialize, read back and look up once, on a fresh store in ``store_dir``."""
    from tasks.features import apply_definitions, materialize_incremental, online_features, open_store, read_embeddings
    from tasks.features import write_image_embeddings

    compute_s, compute_rate, emb = compute_step(pool, pvm, args, device)
    write_s, _ = _common.timed(
        lambda: write_image_embeddings(
            store_dir, pool.ids, emb, labels=pool.labels, split=SPLIT, pvm=pvm_key, content_hashes=pool.hashes
        )
    )
    store = open_store(store_dir)
    apply_s, _ = _common.timed(lambda: apply_definitions(store))
    materialize_s, _ = _common.timed(lambda: materialize_incremental(store, views=[VIEW]))
    loaded = online_rows(store_dir)
    if loaded != pool.n:
        raise SystemExit(f"materialization loaded {loaded} of {pool.n} rows")
    read_s, (read_ids, read_emb, _) = _common.timed(lambda: read_embeddings(store_dir, pvm=pvm_key, split=SPLIT))
    order = {image_id: i for i, image_id in enumerate(pool.ids)}
    if len(read_ids) != pool.n or not np.array_equal(read_emb, emb[[order[i] for i in read_ids]]):
        raise SystemExit("the bulk read does not give back the embeddings written")

    rng = np.random.default_rng(seed)
    refs = [f"{VIEW}:embedding"]
    cold_s, _ = _common.timed(lambda: online_features(store, [pool.ids[0]], features=refs))
    latencies = []
    for index in rng.integers(0, pool.n, size=args.lookups):
        start = time.perf_counter()
        got = online_features(store, [pool.ids[index]], features=refs)
        latencies.append(time.perf_counter() - start)
        if not np.array_equal(np.asarray(got[f"{VIEW}__embedding"][0], dtype=np.float32), emb[index]):
            raise SystemExit(f"the online value of {pool.ids[index]} differs from the one written")
    batch = [pool.ids[i] for i in rng.choice(pool.n, size=min(args.batch_lookup, pool.n), replace=False)]
    batch_s, got = _common.timed(lambda: online_features(store, batch, features=refs))
    if any(v is None for v in got[f"{VIEW}__embedding"]):
        raise SystemExit("a batched online look-up missed a materialized image")
    return {
        "compute_s": compute_s,
        "compute_images_per_s": compute_rate,
        "write_s": write_s,
        "apply_s": apply_s,
        "materialize_s": materialize_s,
        "read_s": read_s,
        "first_lookup_ms": 1e3 * cold_s,
        "lookup_latency_ms_median": 1e3 * _common.median(latencies),
        "lookup_latency_ms_p95": 1e3 * float(np.percentile(latencies, 95)),
        "batch_lookup_s": batch_s,
        "batch_lookup_rows": len(batch),
        "parquet_bytes": sum(p.stat().st_size for p in (store_dir / "data" / VIEW).glob("*.parquet")),
        "online_db_bytes": (store_dir / "online.db").stat().st_size,
        "ratio": (write_s + apply_s + materialize_s) / compute_s,
        "ratio_without_apply": (write_s + materialize_s) / compute_s,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every step ``--repeats`` times and build the report."""
    _common.setup_path()
    machine = _common.machine_info()
    import torch

    from vecaf.models import embed, load_pvm
    from vecaf.settings import resolve_device

    device = resolve_device(args.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"device {args.device!r} asked for but no CUDA device is visible")
    import_s, _ = _common.timed(lambda: __import__("feast"))
    pool = Pool(args)
    pvm = load_pvm(args.model)
    embed(pvm, pool.warm_images(args.batch_size), batch_size=args.batch_size, device=device,
          image_size=args.image_size, progress=False)
    pvm_key = f"{args.model}@{args.image_size}px"

    rounds = []
    for r in range(args.repeats):
        store_dir = Path(tempfile.mkdtemp(prefix=f"feast-speed-{r}-"))
        try:
            rounds.append(one_round(pool, pvm, args, device=device, store_dir=store_dir, pvm_key=pvm_key, seed=r))
        finally:
            shutil.rmtree(store_dir, ignore_errors=True)

    def med(key: str) -> float:
        return _common.median([rd[key] for rd in rounds])

    n = pool.n
    ratio = med("ratio")
    steps = {
        name: {"seconds": med(f"{name}_s"), "rows_per_s": n / med(f"{name}_s")}
        for name in ("compute", "write", "apply", "materialize", "read")
    }
    steps["compute"]["rows_per_s"] = med("compute_images_per_s")
    return {
        "benchmark": "feast-speed",
        "time": _common.utc_now(),
        "quick": bool(args.quick),
        "source": args.source,
        "n_rows": n,
        "embedding_dim": int(args.dim if args.source == "random" else pvm.num_features),
        "model": args.model,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "device": device,
        "repeats": args.repeats,
        "compute_images_measured": None if args.images_per_s is not None else len(pool.images),
        "compute_images_per_s": steps["compute"]["rows_per_s"],
        "write_rows_per_s": steps["write"]["rows_per_s"],
        "materialize_rows_per_s": steps["materialize"]["rows_per_s"],
        "write_and_materialize_rows_per_s": n / (med("write_s") + med("materialize_s")),
        "read_rows_per_s": steps["read"]["rows_per_s"],
        "apply_s": steps["apply"]["seconds"],
        "lookup_latency_ms_median": med("lookup_latency_ms_median"),
        "lookup_latency_ms_p95": med("lookup_latency_ms_p95"),
        "batch_lookup_rows_per_s": _common.median([rd["batch_lookup_rows"] / rd["batch_lookup_s"] for rd in rounds]),
        "ratio_store_over_compute": ratio,
        "ratio_store_over_compute_without_apply": med("ratio_without_apply"),
        "goal_ratio": GOAL_RATIO,
        "meets_goal": bool(ratio <= GOAL_RATIO),
        "steps": steps,
        "rounds": rounds,
        "content_hash_s": pool.hash_s,
        "feast_import_s": import_s,
        "machine": {**machine, "load_average_at_end": _common.load_average()},
        "method": (
            "each round on a fresh tmp store: compute -> write Parquet -> apply -> materialize_incremental -> "
            "bulk read -> online look-ups; rows/s = N / median seconds; ratio = median over rounds of "
            "(write + apply + materialize) / compute"
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run, print the JSON, write it to ``--out``."""
    return _common.run_and_report(parse_args, run, argv)


if __name__ == "__main__":
    main()
