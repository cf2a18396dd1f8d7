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

__all__ = [
    "capture_rng_state",
    "checkpoint_path",
    "latest_checkpoint",
    "load_checkpoint",
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
