"""The finetuning engine: L loops of selection + training under a fixed batch budget (Sec. 3.1, App. C).

    from vecaf.train import finetune
    result = finetune(pvm, pool, test, mode="head", method="vecaf", ratio=0.01, batch_budget=300,
                      batch_size=32, text_embeddings=t, targets=(0.8, 0.85))
    result.top1, result.b2a, result.curve, result.loops[0].picks

``engine`` (the run: selection step, training step with CEA in the forward pass, Eq. 10, evaluation),
``plan`` (the loop plan: batches per loop, each loop's training set, the batch order, replay), ``head``
(the network split into embedding and head; frozen-backbone feature mode), ``rows`` (inputs addressed by
pool index), ``evaluate`` (top-1, per-class accuracy, B2A), ``records`` (loop records and the result),
``checkpoint`` (loop-end checkpoints and exact resume), ``warm_start`` (whether a run starts from the
champion) and ``ddp`` (data-parallel runs under torchrun).
"""

from vecaf.train.checkpoint import latest_checkpoint, load_checkpoint
from vecaf.train.ddp import DistContext, destroy_distributed, init_distributed
from vecaf.train.engine import (
    FULL_DATA,
    FinetuneResult,
    LoopRecord,
    TrainingDivergedError,
    epoch_batches,
    finetune,
    loop_batches,
)
from vecaf.train.evaluate import (
    EvalPoint,
    batches_to_accuracy,
    classification_metrics,
    per_class_accuracy,
    top1_accuracy,
)
from vecaf.train.head import Network, extract_features

__all__ = [
    "FULL_DATA",
    "DistContext",
    "EvalPoint",
    "FinetuneResult",
    "LoopRecord",
    "Network",
    "TrainingDivergedError",
    "batches_to_accuracy",
    "classification_metrics",
    "destroy_distributed",
    "epoch_batches",
    "extract_features",
    "finetune",
    "init_distributed",
    "latest_checkpoint",
    "load_checkpoint",
    "loop_batches",
    "per_class_accuracy",
    "top1_accuracy",
]
