"""Loop-end checkpoints of a finetuning run, and the random-number states that make a resume exact.

A checkpoint is written after each loop l (Sec. 3.1: selection, then B/L batches of training) and holds
everything the next loop depends on: model (or head) weights, optimizer and scheduler states, the RNG
states of torch (CPU and CUDA), numpy's global generator and Python's ``random``, the picks of loops
0..l with the loss that motivated each, the evaluation curve so far and a fingerprint of the run's
settings. Files are written atomically (temporary file, then rename), so a run killed while saving keeps
the previous checkpoint. States are stored as tensors and plain Python values only, so they load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vecaf.train.evaluate import EvalPoint
from vecaf.train.records import LoopRecord

__all__ = [
    "capture_rng_state",
    "checkpoint_path",
    "latest_checkpoint",
    "load_checkpoint",
    "point_from_state",
    "point_state",
    "record_from_state",
    "record_state",
    "restore_rng_state",
    "save_checkpoint",
]

_NAME = re.compile(r"^loop-(\d+)\.pt$")


def checkpoint_path(directory: str | Path, loop: int) -> Path:
    """Path of the checkpoint written at the end of ``loop`` (0-based): ``<directory>/loop-<loop+1>.pt``."""
    return Path(directory) / f"loop-{loop + 1}.pt"


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint of the highest loop in ``directory``, or None when there is none."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return max(found)[1] if found else None


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (write to ``path.tmp``, fsync, rename).

    Args:
        path: destination file; its folder is created when missing.
        state: tensors, numbers, strings, lists, tuples and dicts of those.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors land on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states: torch CPU, every CUDA device, numpy's legacy generator, Python's ``random``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global RNG states captured by :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached"],
        )
    )
    random.setstate(_python_state_from_plain(state["python"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [int(version), torch.tensor(internal, dtype=torch.int64), gauss]


def _python_state_from_plain(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(int(v) for v in internal.tolist()), gauss)


def record_state(r: LoopRecord) -> dict[str, Any]:
    """A loop record as checkpoint state (tensors and plain values: loadable with ``weights_only=True``)."""
    return {
        "loop": r.loop,
        "picks": None if r.picks is None else torch.from_numpy(np.asarray(r.picks, dtype=np.int64)),
        "pick_losses": None if r.pick_losses is None else torch.from_numpy(np.asarray(r.pick_losses, dtype=np.float32)),
        "budget": r.budget,
        "batches": r.batches,
        "end_batches": r.end_batches,
        "train_loss": r.train_loss,
        "top1": r.top1,
        "test_loss": r.test_loss,
        "seconds": dict(r.seconds),
    }


def record_from_state(s: dict[str, Any]) -> LoopRecord:
    """The loop record back from :func:`record_state`."""
    return LoopRecord(
        loop=int(s["loop"]),
        picks=None if s["picks"] is None else s["picks"].numpy(),
        pick_losses=None if s["pick_losses"] is None else s["pick_losses"].numpy(),
        budget=int(s["budget"]),
        batches=int(s["batches"]),
        end_batches=int(s["end_batches"]),
        train_loss=float(s["train_loss"]),
        top1=float(s["top1"]),
        test_loss=float(s["test_loss"]),
        seconds={k: float(v) for k, v in s["seconds"].items()},
    )


def point_state(p: EvalPoint) -> dict[str, Any]:
    """An evaluation point as checkpoint state."""
    per_class = None if p.per_class is None else torch.from_numpy(np.asarray(p.per_class, dtype=np.float64))
    return {"batches": p.batches, "top1": p.top1, "loss": p.loss, "loop": p.loop, "per_class": per_class}


def point_from_state(s: dict[str, Any]) -> EvalPoint:
    """The evaluation point back from :func:`point_state`."""
    per_class = None if s["per_class"] is None else s["per_class"].numpy()
    return EvalPoint(int(s["batches"]), float(s["top1"]), float(s["loss"]), int(s["loop"]), per_class)
