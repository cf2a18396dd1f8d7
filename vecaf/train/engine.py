"""Loop-based active finetuning (Sec. 3.1, Appendix C, Appendix F) with CEA in the forward pass (Eq. 10).

A run has a fixed budget of B training batches split over L loops (B_l = B // L, the first B mod L
loops one batch more). Loop l:

1. one batched pass over the pool under the current weights w gives each sample's embedding e_i and
   loss L_i = objective(f(x_i; w), y_i) (Eq. 3);
2. ``vecaf.select`` picks K samples (ODS, Eq. 7, or a baseline), excluding earlier picks when asked;
3. the model trains B_l batches drawn from the loop's training set (reshuffled epochs of the set, cycled
   when it is smaller than a batch) with SGD (lr 5e-4, weight decay 1e-4, momentum 0.9) and one cosine
   decay over all B batches: lr(b) = lr0 * (1 + cos(pi b / B)) / 2 (Appendix C). The training set is the
   loop's K picks (the paper, Sec. 3.1: the selected set finetunes the PVM until the next loop starts),
   or with ``cumulative=True`` the union of the picks of loops 1..l (a growing labelled set), or with
   ``replay=r`` the loop's picks with a share r of each batch from earlier picks, with the same B_l
   batches either way (``vecaf.train.plan``);
4. for training-set samples with a text embedding the head sees (1 - lam_bw) e_aug + lam_bw e (Eq. 10),
   e_aug = e - eta_K alpha (e - t) (Eq. 9), alpha = softmax over the training set of the squared
   distance between the normalised image embedding and the caption embedding projected into the image
   space (Eq. 8, ridge projection of ``vecaf.cea`` refitted on the pool each loop since e moves in full
   mode), computed at the loop start; t is that projected direction at the scale ||e||, and eta_K = eta K
   with K the training set's size (the K-normalised step that ``vecaf.cea`` also uses for selection; up to
   l K when cumulative). alpha and t are constants (no gradient). lam_bw = 1 turns CEA off.

The run (``_Run``, explicit fields) is the loop plan (``vecaf.train.plan``), a selection step, a training
step, an evaluation and a checkpoint (``vecaf.train.checkpoint``), in that order per loop; its records are
``vecaf.train.records``. Full-data finetuning (``method="full"`` or None) draws the same number of batches from the whole pool
with no selection. Evaluation on the test split every ``eval_every`` batches and at each loop end gives
the curve (batches, top-1, loss) and B2A (``vecaf.train.evaluate``). Each loop end writes a checkpoint
(``vecaf.train.checkpoint``) from which ``resume=True`` continues with identical results. Under
``torchrun`` the engine runs data-parallel (``vecaf.train.ddp``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vecaf import objectives
from vecaf.objectives import SELECTION_LOSSES
from vecaf.train import checkpoint as ckpt
from vecaf.train.checkpoint import point_from_state as _point_from_state
from vecaf.train.checkpoint import point_state as _point_state
from vecaf.train.checkpoint import record_from_state as _record_from_state
from vecaf.train.checkpoint import record_state as _record_state
from vecaf.train import ddp
from vecaf.train.evaluate import EvalPoint, batches_to_accuracy, classification_metrics
from vecaf.train.head import Network, install_head, make_head, prepare_backbone
from vecaf.train.plan import derive_seed as _derive
from vecaf.train.plan import epoch_batches, loop_batches, training_batches, training_set
from vecaf.train.records import FinetuneResult, LoopRecord, TrainingDivergedError
from vecaf.train.rows import Rows as _Rows
from vecaf.train.rows import as_rows as _as_rows

__all__ = ["FULL_DATA", "FinetuneResult", "LoopRecord", "TrainingDivergedError", "finetune", "loop_batches"]

FULL_DATA = "full"
MODES = ("head", "full")
CHECKPOINT_FORMAT = 1
# fingerprint fields added after format 1 was written, with the value older checkpoints were made under
_FINGERPRINT_DEFAULTS: dict[str, Any] = {"cumulative": False, "replay": 0.0, "selection_loss": "observed"}


def _split_data(data: Any, name: str) -> tuple[Any, np.ndarray, list[str] | None]:
    """(inputs, labels, class_names) of a dataset with ``.labels`` or an ``(inputs, labels)`` pair."""
    if isinstance(data, tuple) and len(data) == 2:
        inputs, labels = data
        class_names = None
    elif hasattr(data, "labels"):
        inputs, labels = data, data.labels
        class_names = getattr(data, "class_names", None)
    else:
        raise ValueError(f"{name} must be a dataset with a .labels attribute or an (inputs, labels) pair")
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if labels.size == 0:
        raise ValueError(f"{name} is empty")
    if labels.min() < 0:
        raise ValueError(f"{name} labels must be non-negative, got {labels.min()}")
    return inputs, labels.astype(np.int64), list(class_names) if class_names is not None else None


def _unwrap(pvm_or_model: Any) -> tuple[nn.Module | None, Any]:
    """(timm model, PVM or None) from a PVM, a bare model or None."""
    if pvm_or_model is None:
        return None, None
    inner = getattr(pvm_or_model, "model", None)
    if isinstance(inner, nn.Module) and not isinstance(pvm_or_model, nn.Module):
        return inner, pvm_or_model
    if isinstance(pvm_or_model, nn.Module):
        return pvm_or_model, None
    raise ValueError(f"expected a PVM, a torch model or None, got {type(pvm_or_model).__name__}")


_OBJECTIVE_NAMES = {
    "ce": "cross_entropy",
    "cross_entropy": "cross_entropy",
    "ova": "one_vs_all",
    "one_vs_all": "one_vs_all",
    "weighted_ce": "weighted_cross_entropy",
    "weighted_cross_entropy": "weighted_cross_entropy",
}


def _resolve_objective(
    objective: Any, *, target_class: int | None, class_weights: Any, num_classes: int, labels: np.ndarray
) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], str]:
    """Per-sample loss (logits (B, C), labels (B,)) -> (B,) from a ``vecaf.objectives`` name or a callable.

    "Balanced" class weights are computed once from the whole pool's labels (not per batch).
    """
    if callable(objective):
        return objective, getattr(objective, "__name__", "custom")
    name = _OBJECTIVE_NAMES.get(objective) if isinstance(objective, str) else None
    if name is None:
        raise ValueError(f"unknown objective {objective!r}; choose one of {sorted(_OBJECTIVE_NAMES)} or pass a callable")
    if name == "one_vs_all":
        if target_class is None:
            raise ValueError("objective 'one_vs_all' needs target_class (the positive class)")
        if isinstance(target_class, bool) or not isinstance(target_class, (int, np.integer)) or not 0 <= target_class < num_classes:
            raise ValueError(f"target_class must be a class index in [0, {num_classes}), got {target_class!r}")
    weights = class_weights
    if name == "weighted_cross_entropy" and (class_weights is None or isinstance(class_weights, str)):
        if class_weights not in (None, "balanced"):
            raise ValueError(f"class_weights must be 'balanced' or a ({num_classes},) array, got {class_weights!r}")
        weights = objectives.class_weights_balanced(labels, num_classes)

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return objectives.per_sample_losses(logits, y, objective=name, target=target_class, class_weights=weights)

    return loss, name


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _cea_mixer(lam_bw: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """e -> (1 - lam_bw) e_aug + lam_bw e with e_aug = e - s (e - t) (Eq. 9-10), s = eta_eff alpha and t constants."""
    from vecaf import cea

    def mixer(e: torch.Tensor, t: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        e_aug = e - step.detach()[:, None] * (e - t.detach())
        return cea.mix(e, e_aug, lam_bw)

    return mixer


def cea_constants(
    image: np.ndarray, text: np.ndarray, projection: Callable[[np.ndarray], np.ndarray], *, eta: float
) -> tuple[np.ndarray, np.ndarray]:
    """The per-loop constants of Eq. 8-9 for the K selected samples: (t, s) with e_aug = e - s (e - t).

    t_i = ||e_i|| P(t_i^text): the projected caption direction at the image embedding's own scale;
    alpha = softmax over the K rows of ||e_i/||e_i|| - P(t_i^text)||^2 (Eq. 8 on normalised embeddings);
    s_i = eta K alpha_i (the step is scaled by K as ``vecaf.cea`` does for selection, so an
    average-attention sample moves a fraction eta of the way to its caption whatever K is).

    Args:
        image: (K, D) embeddings of the selected samples at the loop start.
        text: (K, Dt) their caption embeddings.
        projection: text -> unit image-space rows (``vecaf.cea.fit_projection``).
        eta: the CEA step size.

    Returns:
        t (K, D) float32 and s (K,) float32.
    """
    from vecaf import cea

    direction = np.asarray(projection(text), dtype=np.float64)
    alpha = np.asarray(cea.attention(_unit_rows(image.astype(np.float64)), direction), dtype=np.float64)
    norms = np.linalg.norm(image.astype(np.float64), axis=1, keepdims=True)
    return (norms * direction).astype(np.float32), (eta * len(image) * alpha).astype(np.float32)


class _Callbacks:
    def __init__(self, callbacks: Any) -> None:
        if callbacks is None:
            self.items: list[Any] = []
        elif isinstance(callbacks, Mapping) or not isinstance(callbacks, Iterable):
            self.items = [callbacks]
        else:
            self.items = list(callbacks)
        for item in self.items:
            names = set(item) if isinstance(item, Mapping) else {n for n in ("on_eval", "on_loop_end") if hasattr(item, n)}
            unknown = names - {"on_eval", "on_loop_end"} if isinstance(item, Mapping) else set()
            if unknown:
                raise ValueError(f"unknown callback name(s) {sorted(unknown)}; known: on_eval, on_loop_end")

    def emit(self, name: str, payload: Any) -> None:
        for item in self.items:
            fn = item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)
            if fn is not None:
                fn(payload)


def _check_fraction(name: str, value: float, *, low_open: bool = True) -> float:
    value = float(value)
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok or not math.isfinite(value):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


def finetune(
    pvm_or_model: Any,
    train_data: Any,
    test_data: Any,
    *,
    mode: str = "head",
    method: str | None = "vecaf",
    ratio: float = 0.01,
    budget: int | None = None,
    loops: int = 3,
    batch_budget: int = 300,
    batch_size: int = 32,
    lr: float = 5e-4,
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
    schedule: str = "cosine",
    objective: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "cross_entropy",
    target_class: int | None = None,
    class_weights: Any = None,
    text_embeddings: Any = None,
    eta: float = 0.5,
    lam_bw: float = 0.998,
    exclude_previous: bool = True,
    cumulative: bool = False,
    replay: float = 0.0,
    use_losses: bool = True,
    selection_loss: str = "expected",
    eval_every: int | None = None,
    eval_at_start: bool = True,
    targets: Sequence[float] = (),
    seed: int = 0,
    device: str = "auto",
    amp: bool = True,
    compile: bool = False,
    freeze_bn: bool = True,
    image_size: int | None = None,
    transform: Callable[[Any], torch.Tensor] | None = None,
    train_features: Any = None,
    test_features: Any = None,
    num_classes: int | None = None,
    eval_batch_size: int = 256,
    checkpoint_dir: str | Path | None = None,
    resume: bool | str | Path = False,
    selection_options: Mapping[str, Any] | None = None,
    callbacks: Any = None,
    return_model: bool = True,
    stop_after_loop: int | None = None,
) -> FinetuneResult:
    """Finetune a classifier in L loops of active selection + training under a fixed batch budget.

    Args:
        pvm_or_model: a ``vecaf.models.PVM``, a timm-style classifier, or None (head mode with
            ``train_features``/``test_features`` only: a new linear head is trained).
        train_data: the labeled pool: a dataset with ``.labels`` (items ``(id, image, label)``) or an
            ``(inputs, labels)`` pair (inputs: (N, 3, H, W) normalised images in full mode, (N, D)
            features in head mode).
        test_data: the test split, same forms.
        mode: "full" (the whole network trains) or "head" (frozen backbone, cached features, only the
            linear head trains).
        method: a selection method from ``vecaf.list_methods()``, or "full"/None for full-data
            finetuning (random batches from the whole pool, no selection, no CEA).
        ratio: K / N, the share of the pool selected per loop (used when ``budget`` is None).
        budget: K, samples selected per loop.
        loops: L.
        batch_budget: B, total training batches (each loop B/L).
        batch_size: global batch size (split over DDP ranks).
        lr: initial SGD learning rate (Appendix C: 5e-4).
        weight_decay: SGD weight decay (1e-4).
        momentum: SGD momentum (0.9).
        schedule: "cosine" (one cosine decay over all B batches) or "constant".
        objective: per-sample loss: a name from ``vecaf.objectives`` ("ce", ...) or a callable
            (logits, labels) -> (B,) losses; the training loss is its mean, and selection sees it.
        target_class: the class of a one-vs-all objective.
        class_weights: (C,) weights of a class-weighted objective.
        text_embeddings: (N, Dt) caption embeddings of the pool for CEA; an all-NaN row means "no
            caption" (that sample is never augmented). None disables CEA.
        eta: CEA step size of Eq. 9, in the K-normalised form of ``vecaf.cea`` (an average-attention sample
            moves a fraction eta of the way to its caption); also given to the ``vecaf`` selection as its
            ``eta`` unless ``selection_options`` sets one.
        lam_bw: balance lam_bw of Eq. 10 (1 disables CEA in the forward pass).
        exclude_previous: never pick a sample chosen in an earlier loop.
        cumulative: what each loop trains on. False (default, the paper's protocol, Sec. 3.1): loop l
            trains its B_l batches on its own K picks only. True: loop l trains its B_l batches on the
            union of the picks of loops 1..l (the growing labelled set of classic active learning; the
            batch budget is unchanged), and the CEA constants (Eq. 8-9) are computed over that union.
            Ignored by full-data finetuning.
        replay: with ``cumulative=False``, the share of each training batch drawn from the picks of earlier
            loops (replay), the rest from the loop's own picks; 0 (default) is the paper's protocol. The CEA
            constants then cover the loop's picks and the earlier ones. Must lie in [0, 1).
        use_losses: give the per-sample losses to the selection; False passes constant losses, which
            removes the loss weighting of Eq. 7 (the "ODS off" row of Table 5).
        selection_loss: which per-sample loss weighs ``method="vecaf"``'s selection (Eq. 3):
            "expected" (default), the objective's expectation under the model's own prediction,
            L_bar_i = sum_c p_ic l(z_i, c) (``vecaf.objectives.expected_losses``; for cross-entropy the
            predictive entropy), or "observed", the loss at the label, L_i = l(z_i, y_i), Eq. 3 as written.
            Measured on a validation split (``docs/fidelity.md``): with an over-confident head the observed
            losses put nearly all the weight on confidently misclassified samples, and training on those
            lowered top-1. Other methods always get the observed losses (``topk_loss`` ranks by them).
        eval_every: evaluate on the test split every n global batches (default B // 10); loop ends and
            the last batch are always evaluated.
        eval_at_start: also evaluate before the first batch (batch 0 of the curve).
        targets: top-1 targets (fractions) for B2A.
        seed: seeds the head initialisation, the selection (one derived seed per loop), the batch order and
            torch's global RNG (dropout) inside the run; the caller's RNG state is restored afterwards.
        device: "auto" (CUDA when present), "cpu", "cuda", "cuda:N".
        amp: bf16 autocast on CUDA (ignored on CPU).
        compile: ``torch.compile`` the network for training.
        freeze_bn: keep batch-norm running statistics fixed during training (BN layers in eval mode; their
            affine parameters still train). Default True: with small batches drawn from a small subset,
            train-mode statistics differ from the running ones the model is evaluated with (the paper's
            DeiT has no batch statistics), and DDP then matches one process exactly.
        image_size: input side S when images are transformed by the PVM (full mode / feature extraction).
        transform: image -> (3, S, S) tensor; default ``pvm.transform(image_size=image_size)``.
        train_features: (N, D) pre-logits features of the pool under the initial model. Head mode: the
            cached features (computed with the backbone when omitted). Full mode: they replace the loop-1
            pass (they must come from the same model and transform).
        test_features: (M, D) the same for the test split.
        num_classes: C (default: the dataset's class names, else max label + 1).
        eval_batch_size: batch size of the pool and test passes.
        checkpoint_dir: where loop-end checkpoints go (None: no checkpoints).
        resume: True resumes from the latest checkpoint in ``checkpoint_dir`` (starts fresh when there is
            none); a path resumes from that file.
        selection_options: extra options for the selection method.
        callbacks: objects or mappings with ``on_eval(EvalPoint)`` and/or ``on_loop_end(LoopRecord)``,
            called on rank 0 only.
        return_model: put the trained model in the result.
        stop_after_loop: return after loop l (0-based) has written its checkpoint, on every DDP rank (a caller
            that runs one loop per call resumes the next call from that checkpoint). None: run all L loops.

    Returns:
        A :class:`FinetuneResult`.

    Raises:
        ValueError: bad input (batch budget below the loop count, selection budget above the pool, an
            unknown method or mode, mismatched shapes, a checkpoint from different settings...).
        TrainingDivergedError: the training loss became NaN/inf (the last good checkpoint is kept).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    per_loop = loop_batches(batch_budget, loops)
    for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum), ("eta", eta)):
        if not math.isfinite(float(value)) or float(value) < 0:
            raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    lam_bw = _check_fraction("lam_bw", lam_bw, low_open=False)
    if selection_loss not in SELECTION_LOSSES:
        raise ValueError(f"selection_loss must be one of {SELECTION_LOSSES}, got {selection_loss!r}")
    targets = tuple(float(t) for t in targets)
    for t in targets:
        _check_fraction("each B2A target", t)
    if eval_every is None:
        eval_every = max(1, batch_budget // 10)
    if isinstance(eval_every, bool) or not isinstance(eval_every, (int, np.integer)) or eval_every <= 0:
        raise ValueError(f"eval_every must be a positive integer, got {eval_every!r}")
    if not isinstance(cumulative, (bool, np.bool_)):
        raise ValueError(f"cumulative must be True or False, got {cumulative!r}")
    replay = float(replay)
    if not (0.0 <= replay < 1.0):
        raise ValueError(f"replay must lie in [0, 1), got {replay}")
    if replay > 0 and cumulative:
        raise ValueError("replay is for the per-loop protocol: pass cumulative=False with replay > 0")
    if stop_after_loop is not None and (
        isinstance(stop_after_loop, bool) or not isinstance(stop_after_loop, (int, np.integer))
        or not 0 <= stop_after_loop < loops
    ):
        raise ValueError(f"stop_after_loop must be a loop index in 0..{loops - 1} or None, got {stop_after_loop!r}")
    if resume and checkpoint_dir is None and not isinstance(resume, (str, Path)):
        raise ValueError("resume=True needs checkpoint_dir (or pass the checkpoint file as resume=path)")

    from vecaf.selection import list_methods

    full_data = method is None or method == FULL_DATA
    method_name = FULL_DATA if full_data else str(method)
    if not full_data and method_name not in list_methods():
        raise ValueError(f"unknown method {method!r}; choose one of {list_methods()} or 'full' (full-data finetuning)")

    model, pvm = _unwrap(pvm_or_model)
    if mode == "full" and model is None:
        raise ValueError("full mode needs a model (a PVM or a timm-style classifier)")
    train_inputs, train_labels, class_names = _split_data(train_data, "train_data")
    test_inputs, test_labels, _ = _split_data(test_data, "test_data")
    if num_classes is None:
        num_classes = len(class_names) if class_names else int(max(train_labels.max(), test_labels.max())) + 1
    if max(train_labels.max(), test_labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}); found {max(train_labels.max(), test_labels.max())}")
    n_pool = int(train_labels.shape[0])

    if full_data:
        k = n_pool
    elif budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
            raise ValueError(f"budget must be a positive integer, got {budget!r}")
        k = int(budget)
    else:
        k = max(1, int(round(_check_fraction("ratio", ratio) * n_pool)))
    if k > n_pool:
        raise ValueError(f"selection budget K={k} is larger than the pool (N={n_pool} samples)")
    if not full_data and exclude_previous and k * loops > n_pool:
        raise ValueError(
            f"{loops} loops of K={k} fresh samples need {k * loops} samples but the pool has {n_pool}; "
            "lower the budget or pass exclude_previous=False"
        )

    ctx = ddp.current_context()
    dev = _device_for(device, ctx)
    if ctx.distributed and batch_size % ctx.world_size:
        raise ValueError(f"batch_size {batch_size} must be divisible by the {ctx.world_size} DDP processes")
    if transform is None and pvm is not None:
        transform = pvm.transform(image_size=image_size)

    fork_devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(_derive(seed, 1))
        run = _Run(
            model=model,
            mode=mode,
            method=method_name,
            full_data=full_data,
            train=(train_inputs, train_labels),
            test=(test_inputs, test_labels),
            num_classes=int(num_classes),
            k=k,
            per_loop=per_loop,
            batch_size=int(batch_size),
            lr=float(lr),
            weight_decay=float(weight_decay),
            momentum=float(momentum),
            schedule=schedule,
            objective=objective,
            target_class=target_class,
            class_weights=class_weights,
            text_embeddings=text_embeddings,
            eta=float(eta),
            lam_bw=lam_bw,
            exclude_previous=bool(exclude_previous),
            cumulative=bool(cumulative),
            replay=replay,
            use_losses=bool(use_losses),
            selection_loss=selection_loss,
            eval_every=int(eval_every),
            eval_at_start=bool(eval_at_start),
            targets=targets,
            seed=int(seed),
            device=dev,
            amp=bool(amp),
            compile=bool(compile),
            freeze_bn=bool(freeze_bn),
            transform=transform,
            train_features=train_features,
            test_features=test_features,
            eval_batch_size=int(eval_batch_size),
            checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
            resume=resume,
            selection_options=dict(selection_options or {}),
            callbacks=_Callbacks(callbacks),
            return_model=bool(return_model),
            stop_after_loop=None if stop_after_loop is None else int(stop_after_loop),
            ctx=ctx,
            image_size=image_size,
        )
        return run.execute()


def _device_for(device: str, ctx: ddp.DistContext) -> torch.device:
    from vecaf.settings import resolve_device

    name = resolve_device(str(device))
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for but no CUDA device is visible; use 'auto' or 'cpu'")
        if ctx.distributed:
            dev = torch.device("cuda", ctx.local_rank)
    return dev


@dataclass(eq=False)
class _Run:
    """One finetuning run: the settings :func:`finetune` resolved and checked (explicit fields), the run's
    state, and :meth:`execute`, which does the loops.

    The parts, in the order a loop uses them: loop plan (``vecaf.train.plan``: batches per loop, the
    training set, the batch order), selection step (:meth:`_select`), training step (:meth:`_train_loop`),
    evaluation (:meth:`_evaluate`), checkpoint (:meth:`_save` / :meth:`_load`).
    """

    # what trains, on what
    model: nn.Module | None
    mode: str
    method: str
    full_data: bool
    train: tuple[Any, np.ndarray]
    test: tuple[Any, np.ndarray]
    num_classes: int
    transform: Callable | None
    train_features: Any
    test_features: Any
    image_size: int | None
    # the loop plan
    k: int
    per_loop: list[int]
    batch_size: int
    exclude_previous: bool
    cumulative: bool
    replay: float
    # the optimiser and the objective
    lr: float
    weight_decay: float
    momentum: float
    schedule: str
    objective: Any
    target_class: int | None
    class_weights: Any
    # CEA and selection
    text_embeddings: Any
    eta: float
    lam_bw: float
    use_losses: bool
    selection_loss: str
    selection_options: dict[str, Any]
    # evaluation, checkpoints, execution
    eval_every: int
    eval_at_start: bool
    targets: tuple[float, ...]
    eval_batch_size: int
    checkpoint_dir: Path | None
    resume: bool | str | Path
    seed: int
    device: torch.device
    amp: bool
    compile: bool
    freeze_bn: bool
    callbacks: _Callbacks
    return_model: bool
    stop_after_loop: int | None
    ctx: ddp.DistContext
    # the run's state
    notes: list[str] = field(default_factory=list, init=False)
    timings: dict[str, float] = field(
        default_factory=lambda: {"features": 0.0, "pass": 0.0, "select": 0.0, "train": 0.0, "eval": 0.0}, init=False
    )
    curve: list[EvalPoint] = field(default_factory=list, init=False)
    train_curve: list[tuple[int, float]] = field(default_factory=list, init=False)
    records: list[LoopRecord] = field(default_factory=list, init=False)
    checkpoints: list[str] = field(default_factory=list, init=False)
    step: int = field(default=0, init=False)
    last_checkpoint: Path | None = field(default=None, init=False)
    loop_cea: dict[str, Any] | None = field(default=None, init=False)

    # ----- set-up -------------------------------------------------------------------------------------
    def _note(self, text: str, *, warn: bool = False) -> None:
        self.notes.append(text)
        if warn and self.ctx.is_main:
            warnings.warn(text, UserWarning, stacklevel=5)

    def _setup(self) -> None:
        train_inputs, self.train_labels = self.train
        self.loss_fn, self.objective_name = _resolve_objective(
            self.objective, target_class=self.target_class, class_weights=self.class_weights,
            num_classes=self.num_classes, labels=self.train_labels,
        )
        # the closed form (the predictive entropy) when the objective is the named cross-entropy
        named_ce = isinstance(self.objective, str) and self.objective_name == "cross_entropy"
        self.expected_loss_fn = None if named_ce else self.loss_fn
        test_inputs, self.test_labels = self.test
        if self.cumulative and self.full_data:
            self._note("full-data finetuning ignores cumulative=True (every loop already trains on the whole pool)")
        self.pool_features = self._features_arg(self.train_features, len(self.train_labels), "train_features")
        self.test_feats = self._features_arg(self.test_features, len(self.test_labels), "test_features")
        head_seed = _derive(self.seed, 2)
        if self.mode == "head":
            t0 = time.perf_counter()
            if self.pool_features is None:
                self.pool_features = self._extract(train_inputs, "train_data")
            if self.test_feats is None:
                self.test_feats = self._extract(test_inputs, "test_data")
            self.timings["features"] += time.perf_counter() - t0
            if self.pool_features.shape[1] != self.test_feats.shape[1]:
                raise ValueError(
                    f"train features have D={self.pool_features.shape[1]} but test features D={self.test_feats.shape[1]}"
                )
            head, note = make_head(self.model, self.pool_features.shape[1], self.num_classes, seed=head_seed)
            if note:
                self._note(note, warn=True)
            self.net = Network(None, head)
            self.pool_rows, self.test_rows = _Rows(tensor=self.pool_features), _Rows(tensor=self.test_feats)
        else:
            backbone, note = prepare_backbone(self.model, self.num_classes, seed=head_seed)
            if note:
                self._note(note, warn=True)
            self.net = Network(backbone, None)
            self.pool_rows = _as_rows(train_inputs, transform=self.transform, name="train_data")
            self.test_rows = _as_rows(test_inputs, transform=self.transform, name="test_data")
            if len(self.pool_rows) != len(self.train_labels) or len(self.test_rows) != len(self.test_labels):
                raise ValueError("inputs and labels differ in length")
        self.net.to(self.device)
        self.embed_dim = self._embed_dim()
        self._setup_text()
        params = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(
            params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        total = sum(self.per_loop)
        if self.schedule == "cosine":
            lam = lambda b: 0.5 * (1.0 + math.cos(math.pi * min(b, total) / total))  # noqa: E731
        else:
            lam = lambda b: 1.0  # noqa: E731
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lam)
        self.train_module: nn.Module = self.net
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_module = DistributedDataParallel(self.net, device_ids=ids)
        if self.compile:
            self.train_module = torch.compile(self.train_module)

    def _features_arg(self, value: Any, n: int, name: str) -> torch.Tensor | None:
        if value is None:
            return None
        tensor = torch.as_tensor(np.asarray(value, dtype=np.float32))
        if tensor.ndim != 2 or tensor.shape[0] != n:
            raise ValueError(f"{name} must be ({n}, D), got shape {tuple(tensor.shape)}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} contains NaN or inf")
        return tensor

    def _extract(self, inputs: Any, name: str) -> torch.Tensor:
        if isinstance(inputs, (np.ndarray, torch.Tensor)) and np.ndim(inputs) == 2:
            return self._features_arg(inputs, np.shape(inputs)[0], name)
        if self.model is None:
            raise ValueError(
                f"head mode without a model needs features: pass {name} as (features (N, D), labels), or "
                f"train_features/test_features, or a PVM to compute them"
            )
        rows = _as_rows(inputs, transform=self.transform, name=name, materialize=False)
        backbone = Network(copy.deepcopy(self.model), None).to(self.device)
        feats = self._pass(backbone, rows, None, want=("embeddings",))["embeddings"]
        return torch.from_numpy(feats)

    def _embed_dim(self) -> int:
        if self.mode == "head":
            return int(self.pool_features.shape[1])
        classifier = self.net.classifier()
        dim = getattr(classifier, "in_features", None)
        if isinstance(dim, int):
            return dim
        return int(self.net.embed(self.pool_rows.take(np.arange(1)).to(self.device)).shape[1])

    def _setup_text(self) -> None:
        self.text = None
        self.text_has = None
        self.cea_forward = False
        if self.text_embeddings is None:
            return
        text = np.asarray(
            self.text_embeddings.cpu() if isinstance(self.text_embeddings, torch.Tensor) else self.text_embeddings,
            dtype=np.float32,
        )
        if text.ndim != 2 or text.shape[0] != len(self.train_labels):
            raise ValueError(
                f"text_embeddings must be (N={len(self.train_labels)}, Dt), one row per pool sample, got {text.shape}"
            )
        finite = np.isfinite(text)
        has = finite.all(axis=1)
        partial = finite.any(axis=1) & ~has
        if partial.any():
            raise ValueError(
                f"text_embeddings row {int(np.flatnonzero(partial)[0])} is partly NaN/inf: a row is either a "
                "finite embedding or all-NaN (no caption)"
            )
        if not has.any():
            raise ValueError("text_embeddings has no finite row")
        self.text, self.text_has = text, has
        if self.full_data:
            self._note("full-data finetuning ignores text_embeddings (CEA needs a selected subset)")
            return
        if not has.all():
            self._note(
                f"{int((~has).sum())} pool samples have no text embedding: selection runs without CEA, and "
                "the forward pass augments only the samples that have one"
            )
        self.cea_forward = self.lam_bw < 1.0
        if self.cea_forward:
            self.net.mixer = _cea_mixer(self.lam_bw)

    # ----- passes -------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _pass(
        self,
        net: Network,
        rows: _Rows,
        labels: np.ndarray | None,
        *,
        features: bool = False,
        want: tuple[str, ...] = ("embeddings", "logits", "losses"),
    ) -> dict[str, np.ndarray]:
        """Per-sample embeddings / logits / losses in eval mode, rows split over DDP ranks and gathered."""
        block = ddp.row_block(len(rows), self.ctx)
        was_training = net.training
        net.eval()
        parts: dict[str, list[torch.Tensor]] = {w: [] for w in want}
        try:
            with torch.inference_mode(), self._autocast():
                for start in range(block.start, block.stop, self.eval_batch_size):
                    idx = np.arange(start, min(start + self.eval_batch_size, block.stop))
                    x = rows.take(idx).to(self.device, non_blocking=True)
                    e = x if (features or net.backbone is None) else net.embed(x)
                    if "embeddings" in parts:
                        parts["embeddings"].append(e.float())
                    if "logits" in parts or "losses" in parts or "expected_losses" in parts:
                        z = net.classifier()(e).float()
                        if "logits" in parts:
                            parts["logits"].append(z)
                        # non-finite logits give NaN losses, which the caller reports as a divergence
                        finite = bool(torch.isfinite(z).all())
                        nan = None if finite else torch.full((len(idx),), float("nan"), device=self.device)
                        if "expected_losses" in parts:
                            expected = objectives.expected_losses(z, self.expected_loss_fn) if finite else nan
                            parts["expected_losses"].append(expected.float().reshape(-1))
                        if "losses" in parts:
                            y = torch.from_numpy(labels[idx]).to(self.device)
                            parts["losses"].append(self.loss_fn(z, y).float().reshape(-1) if finite else nan)
        finally:
            net.train(was_training)
        out = {}
        for key, chunks in parts.items():
            local = torch.cat(chunks) if chunks else torch.zeros((0,), device=self.device)
            if key not in ("losses", "expected_losses") and not chunks:
                local = local.reshape(0, 1)
            out[key] = ddp.all_gather_rows(local, self.ctx).cpu().numpy()
        return out

    def _evaluate(self, loop: int) -> EvalPoint:
        t0 = time.perf_counter()
        use_feats = self.mode == "full" and self.step == 0 and self.test_feats is not None
        rows = _Rows(tensor=self.test_feats) if use_feats else self.test_rows
        res = self._pass(self.net, rows, self.test_labels, features=use_feats, want=("logits", "losses"))
        if not np.isfinite(res["losses"]).all():
            raise self._diverged(max(loop, 0), f"the test evaluation after batch {self.step} gave NaN/inf")
        metrics = classification_metrics(
            res["logits"], self.test_labels, losses=res["losses"], num_classes=self.num_classes
        )
        point = EvalPoint(self.step, metrics["top1"], metrics["loss"], loop, metrics["per_class"])
        if self.curve and self.curve[-1].batches == self.step:
            self.curve[-1] = point
        else:
            self.curve.append(point)
            if self.ctx.is_main:
                self.callbacks.emit("on_eval", point)
        self.timings["eval"] += time.perf_counter() - t0
        return point

    # ----- selection ----------------------------------------------------------------------------------
    def _select(self, loop: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, dict[str, float]]:
        seconds = {"pass": 0.0, "select": 0.0}
        if self.full_data:
            return np.arange(len(self.train_labels), dtype=np.int64), None, None, seconds
        t0 = time.perf_counter()
        use_feats = self.mode == "head" or (loop == 0 and self.pool_features is not None)
        rows = _Rows(tensor=self.pool_features) if use_feats else self.pool_rows
        needs_probs = _needs_probs(self.method)  # entropy / margin read the current model's probabilities
        expected = self.method == "vecaf" and self.use_losses and self.selection_loss == "expected"
        want = ("embeddings", "losses") + (("logits",) if needs_probs else ()) + (("expected_losses",) if expected else ())
        res = self._pass(self.net, rows, self.train_labels, features=use_feats, want=want)
        emb, losses = res["embeddings"], res["losses"].astype(np.float64)
        if not np.isfinite(losses).all() or (expected and not np.isfinite(res["expected_losses"]).all()):
            raise self._diverged(loop, f"the pool pass at the start of loop {loop + 1} gave NaN/inf losses")
        seconds["pass"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        picks = None
        if self.ctx.is_main:
            exclude = np.concatenate([r.picks for r in self.records]) if self.exclude_previous and self.records else None
            text = self.text if self.text is not None and self.text_has.all() else None
            if not self.use_losses:
                sel_losses = np.ones_like(losses)
            else:
                sel_losses = res["expected_losses"].astype(np.float64) if expected else losses
            options = dict(self.selection_options)
            if text is not None and self.method == "vecaf":
                options.setdefault("eta", self.eta)
            picks = _call_select(
                emb, self.k, method=self.method, losses=np.maximum(sel_losses, 0.0), text_embeddings=text,
                exclude=exclude, seed=_derive(self.seed, 3, loop), options=options,
                **({"probs": torch.softmax(torch.from_numpy(res["logits"]).double(), dim=1).numpy()} if needs_probs else {}),
            )
        picks = np.asarray(ddp.broadcast_object(picks, self.ctx), dtype=np.int64)
        seconds["select"] = time.perf_counter() - t0
        cea = self._cea_constants(emb, self._training_set(picks)) if self.cea_forward else None
        self.loop_cea = cea
        return picks, losses[picks], emb, seconds

    def _training_set(self, picks: np.ndarray) -> np.ndarray:
        """What the current loop trains on (``vecaf.train.plan.training_set``); ``self.records`` holds the
        earlier loops (restored from the checkpoint on resume)."""
        if self.full_data:
            return picks
        earlier = [r.picks for r in self.records]
        return training_set(picks, earlier, cumulative=self.cumulative, replay=self.replay)

    def _cea_constants(self, emb: np.ndarray, picks: np.ndarray) -> dict[str, Any] | None:
        """Projected t and step s = eta K alpha (Eq. 8-9) of the loop's training set (``picks``: its pool
        indices, K of them) for the samples that have a caption, for one loop."""
        from vecaf import cea

        has = self.text_has[picks]
        if not has.any():
            return None
        projection = cea.fit_projection(self.text[self.text_has], emb[self.text_has])
        chosen = picks[has]
        t, step = cea_constants(emb[chosen], self.text[chosen], projection, eta=self.eta)
        full_t = np.zeros((len(picks), emb.shape[1]), dtype=np.float32)
        full_step = np.zeros(len(picks), dtype=np.float32)
        full_t[has], full_step[has] = t, step
        order = np.argsort(picks)
        return {"sorted": picks[order], "t": torch.from_numpy(full_t[order]), "step": torch.from_numpy(full_step[order])}

    # ----- training -----------------------------------------------------------------------------------
    def _train_mode(self) -> None:
        self.net.train()
        if self.freeze_bn:
            for m in self.net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def _diverged(self, loop: int, what: str) -> TrainingDivergedError:
        where = (
            f"the last good checkpoint is {self.last_checkpoint} (end of loop {loop})"
            if self.last_checkpoint is not None
            else "no checkpoint was written before it"
            + ("" if self.checkpoint_dir is not None else " (checkpoint_dir is None)")
        )
        message = (
            f"{what}: training stopped at batch {self.step + 1} of {sum(self.per_loop)} (loop {loop + 1} of "
            f"{len(self.per_loop)}); {where}. Lower the learning rate or check the inputs and objective."
        )
        return TrainingDivergedError(
            message, loop=loop, batches=self.step + 1, checkpoint=self.last_checkpoint, result=self._result(None)
        )

    def _train_loop(self, loop: int, subset: np.ndarray, picks: np.ndarray | None = None) -> float:
        rng = np.random.default_rng(_derive(self.seed, 4, loop))
        batches = training_batches(subset, picks, self.per_loop[loop], self.batch_size, rng, replay=self.replay)
        share = ddp.row_block(self.batch_size, self.ctx)
        cea = self.loop_cea if self.cea_forward else None
        self._train_mode()
        losses = []
        last = len(batches) - 1
        for i, batch in enumerate(batches):
            idx = batch[share]
            x = self.pool_rows.take(idx).to(self.device, non_blocking=True)
            y = torch.from_numpy(self.train_labels[idx]).to(self.device)
            text = step = None
            if cea is not None:
                pos = np.searchsorted(cea["sorted"], idx)
                text = cea["t"][pos].to(self.device)
                step = cea["step"][pos].to(self.device)
            with self._autocast():
                logits = self.train_module(x, text, step).float()
            if torch.isfinite(logits).all():
                loss = self.loss_fn(logits, y).float().mean()
            else:
                loss = logits.sum() * float("nan")
            global_loss = float(ddp.all_reduce_mean(loss.detach(), self.ctx))
            if not math.isfinite(global_loss):
                raise self._diverged(loop, f"the training loss became {global_loss}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            losses.append(global_loss)
            self.train_curve.append((self.step, global_loss))
            if self.step % self.eval_every == 0 and i < last:
                self._evaluate(loop)
                self._train_mode()
        return float(np.mean(losses))

    # ----- checkpoints --------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "method": self.method,
            "k": self.k,
            "per_loop": list(self.per_loop),
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "momentum": self.momentum,
            "schedule": self.schedule,
            "objective": self.objective_name,
            "target_class": self.target_class,
            "eta": self.eta,
            "lam_bw": self.lam_bw,
            "cea": bool(self.cea_forward),
            "exclude_previous": self.exclude_previous,
            "cumulative": bool(self.cumulative) and not self.full_data,
            "replay": 0.0 if self.full_data else float(self.replay),
            "use_losses": self.use_losses,
            # what the selection read: only vecaf reads the expected losses
            "selection_loss": self.selection_loss if self.method == "vecaf" else "observed",
            "seed": self.seed,
            "pool_size": len(self.train_labels),
            "num_classes": self.num_classes,
            "eval_every": self.eval_every,
        }

    def _save(self, loop: int) -> None:
        if self.checkpoint_dir is None:
            return
        path = ckpt.checkpoint_path(self.checkpoint_dir, loop)
        if self.ctx.is_main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "fingerprint": self._fingerprint(),
                "loop": loop,
                "batches": self.step,
                "model": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": ckpt.capture_rng_state(),
                "records": [_record_state(r) for r in self.records],
                "curve": [_point_state(p) for p in self.curve],
                "train_curve": [list(p) for p in self.train_curve],
                "notes": list(self.notes),
                "timings": dict(self.timings),
                "checkpoints": list(self.checkpoints) + [str(path)],
            }
            ckpt.save_checkpoint(path, state)
        ddp.barrier(self.ctx)
        self.checkpoints.append(str(path))
        self.last_checkpoint = path

    def _load(self) -> int:
        """Restore from a checkpoint; returns the first loop still to run (0 when nothing to resume)."""
        if not self.resume:
            return 0
        if isinstance(self.resume, (str, Path)) and not isinstance(self.resume, bool):
            path: Path | None = Path(self.resume)
        else:
            path = ckpt.latest_checkpoint(self.checkpoint_dir)
            if path is None:
                self._note(f"resume asked but {self.checkpoint_dir} holds no checkpoint: started from scratch")
                return 0
        state = ckpt.load_checkpoint(path)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint {path} has format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
        mine = self._fingerprint()
        theirs = {**_FINGERPRINT_DEFAULTS, **state["fingerprint"]}
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            detail = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs now {mine.get(k)!r}" for k in diff)
            raise ValueError(f"checkpoint {path} comes from a run with different settings ({detail})")
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.restore_rng_state(state["rng"])
        self.records = [_record_from_state(r) for r in state["records"]]
        self.curve = [_point_from_state(p) for p in state["curve"]]
        self.train_curve = [(int(b), float(v)) for b, v in state["train_curve"]]
        self.notes = list(state["notes"]) + [f"resumed from {path} after loop {int(state['loop']) + 1}"]
        self.timings = {k: float(v) for k, v in state["timings"].items()}
        self.checkpoints = list(state["checkpoints"])
        self.step = int(state["batches"])
        self.last_checkpoint = path
        return int(state["loop"]) + 1

    # ----- the run ------------------------------------------------------------------------------------
    def execute(self) -> FinetuneResult:
        t_start = time.perf_counter()
        self._setup()
        start_loop = self._load()
        elapsed_before = self.timings.get("total", 0.0)
        if start_loop == 0 and self.eval_at_start:
            self._evaluate(-1)
        for loop in range(start_loop, len(self.per_loop)):
            picks, pick_losses, _, seconds = self._select(loop)
            self.timings["pass"] += seconds["pass"]
            self.timings["select"] += seconds["select"]
            t0 = time.perf_counter()
            eval_before = self.timings["eval"]
            train_loss = self._train_loop(loop, self._training_set(picks), None if self.full_data else picks)
            point = self._evaluate(loop)
            eval_seconds = self.timings["eval"] - eval_before
            train_seconds = time.perf_counter() - t0 - eval_seconds
            self.timings["train"] += train_seconds
            record = LoopRecord(
                loop=loop,
                picks=None if self.full_data else picks,
                pick_losses=None if pick_losses is None else pick_losses.astype(np.float32),
                budget=int(len(picks)),
                batches=self.per_loop[loop],
                end_batches=self.step,
                train_loss=train_loss,
                top1=point.top1,
                test_loss=point.loss,
                seconds={**seconds, "train": train_seconds, "eval": eval_seconds},
            )
            self.records.append(record)
            self.timings["total"] = elapsed_before + time.perf_counter() - t_start
            self._save(loop)
            if self.ctx.is_main:
                self.callbacks.emit("on_loop_end", record)
            if self.stop_after_loop is not None and loop >= self.stop_after_loop:
                break  # every rank leaves here, after the same checkpoint barrier
        if not self.curve or self.curve[-1].batches != self.step:
            self._evaluate(len(self.per_loop) - 1)
        self.timings["total"] = elapsed_before + time.perf_counter() - t_start
        return self._result(self._final_model() if self.return_model else None)

    def _final_model(self) -> nn.Module:
        if self.mode == "full":
            return self.net.backbone.eval()
        head = self.net.head.cpu().eval()
        if self.model is not None and hasattr(self.model, "reset_classifier"):
            return install_head(self.model, head).eval()
        return head

    def _result(self, model: nn.Module | None) -> FinetuneResult:
        return FinetuneResult(
            method=self.method,
            mode=self.mode,
            config=self._config(),
            loops=list(self.records),
            curve=list(self.curve),
            train_curve=list(self.train_curve),
            b2a={t: batches_to_accuracy(self.curve, t) for t in self.targets},
            timings=dict(self.timings),
            notes=list(self.notes),
            checkpoints=list(self.checkpoints),
            model=model,
        )

    def _config(self) -> dict[str, Any]:
        return {
            **self._fingerprint(),
            "loops": len(self.per_loop),
            "batch_budget": sum(self.per_loop),
            "eval_at_start": self.eval_at_start,
            "targets": list(self.targets),
            "device": str(self.device),
            "amp": self.amp and self.device.type == "cuda",
            "compile": self.compile,
            "freeze_bn": self.freeze_bn,
            "image_size": self.image_size,
            "world_size": self.ctx.world_size,
            "selection_options": {k: _plain(v) for k, v in self.selection_options.items()},
        }


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


def _needs_probs(method: str) -> bool:
    """The selection method reads the current model's class probabilities (``entropy``, ``margin``)."""
    from vecaf.selection import get_method

    return get_method(method).requires_probs


def _call_select(
    emb: np.ndarray, k: int, *, method: str, losses: np.ndarray, text_embeddings: np.ndarray | None,
    exclude: np.ndarray | None, seed: int, options: dict[str, Any], probs: np.ndarray | None = None,
) -> np.ndarray:
    from vecaf.selection import select

    extra = {} if probs is None else {"probs": probs}
    return select(
        emb, k, method=method, losses=losses, text_embeddings=text_embeddings, exclude=exclude, seed=seed,
        **extra, **options,
    )
