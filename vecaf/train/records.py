"""What a finetuning run reports: one :class:`LoopRecord` per loop, the :class:`FinetuneResult`, and the
:class:`TrainingDivergedError` that carries the partial result."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from vecaf.train.evaluate import EvalPoint

__all__ = ["FinetuneResult", "LoopRecord", "TrainingDivergedError"]


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped before applying that batch.

    Attributes:
        loop: 0-based loop in which it happened.
        batches: global batch index (1-based) whose loss was not finite.
        checkpoint: the last good checkpoint (end of the previous loop), or None.
        result: the partial :class:`FinetuneResult` (curve and loops so far).
    """

    def __init__(self, message: str, *, loop: int, batches: int, checkpoint: Path | None, result: Any) -> None:
        super().__init__(message)
        self.loop, self.batches, self.checkpoint, self.result = loop, batches, checkpoint, result


@dataclass
class LoopRecord:
    """What happened in one loop.

    Attributes:
        loop: 0-based loop index.
        picks: pool indices selected for this loop (None for full-data finetuning).
        pick_losses: each pick's loss under the model at the loop start (why it was picked, for
            loss-aware methods; None for full-data finetuning).
        budget: K, samples selected (the pool size for full-data finetuning).
        batches: batches trained in this loop.
        end_batches: global batch count at the loop end.
        train_loss: mean training loss over the loop's batches.
        top1: test top-1 at the loop end.
        test_loss: test loss at the loop end.
        seconds: wall time of the loop's phases (pass, select, train, eval).
    """

    loop: int
    picks: np.ndarray | None
    pick_losses: np.ndarray | None
    budget: int
    batches: int
    end_batches: int
    train_loss: float
    top1: float
    test_loss: float
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return {
            "loop": self.loop,
            "picks": None if self.picks is None else self.picks.tolist(),
            "pick_losses": None if self.pick_losses is None else [float(v) for v in self.pick_losses],
            "budget": self.budget,
            "batches": self.batches,
            "end_batches": self.end_batches,
            "train_loss": self.train_loss,
            "top1": self.top1,
            "test_loss": self.test_loss,
            "seconds": dict(self.seconds),
        }


@dataclass
class FinetuneResult:
    """The outcome of :func:`finetune`.

    Attributes:
        method: selection method name, or "full" for full-data finetuning.
        mode: "head" or "full".
        config: the resolved settings of the run (JSON-ready).
        loops: one :class:`LoopRecord` per loop.
        curve: test evaluations in batch order (batch 0 = before training when evaluated).
        train_curve: (batch, training loss) of every batch.
        b2a: target top-1 -> batches to reach it (None if never), read from ``curve``.
        timings: total seconds per phase and overall.
        notes: things the engine decided and says (head replaced, CEA skipped...).
        checkpoints: checkpoint files written, in loop order.
        model: the trained model (full mode: the finetuned network; head mode: the model with the trained
            head installed, or the bare head when no model was given).
    """

    method: str
    mode: str
    config: dict[str, Any]
    loops: list[LoopRecord]
    curve: list[EvalPoint]
    train_curve: list[tuple[int, float]]
    b2a: dict[float, int | None]
    timings: dict[str, float]
    notes: list[str]
    checkpoints: list[str]
    model: nn.Module | None = None

    @property
    def final(self) -> EvalPoint:
        """The last evaluation (after all batches)."""
        return self.curve[-1]

    @property
    def top1(self) -> float:
        """Final test top-1 accuracy."""
        return self.final.top1

    @property
    def per_class_accuracy(self) -> np.ndarray | None:
        """Final per-class test accuracy (C,)."""
        return self.final.per_class

    @property
    def picks(self) -> list[np.ndarray]:
        """Per-loop selected indices (empty for full-data finetuning)."""
        return [r.picks for r in self.loops if r.picks is not None]

    def curve_array(self) -> np.ndarray:
        """The curve as an (n, 3) array of (batches, top1, loss)."""
        return np.array([(p.batches, p.top1, p.loss) for p in self.curve], dtype=np.float64).reshape(-1, 3)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (the model left out)."""
        return {
            "method": self.method,
            "mode": self.mode,
            "config": self.config,
            "final": self.final.to_dict(),
            "b2a": {str(k): v for k, v in self.b2a.items()},
            "loops": [r.to_dict() for r in self.loops],
            "curve": [p.to_dict() for p in self.curve],
            "train_curve": [list(p) for p in self.train_curve],
            "timings": dict(self.timings),
            "notes": list(self.notes),
            "checkpoints": list(self.checkpoints),
        }
