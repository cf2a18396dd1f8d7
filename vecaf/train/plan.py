"""The loop plan: how the batch budget splits over loops, what each loop trains on, and the batch order.

- :func:`loop_batches`: B batches over L loops (B // L each, the first B mod L loops one more);
- :func:`training_set`: the loop's own picks (the paper's per-loop protocol), or with ``cumulative`` or
  ``replay`` the union with the earlier loops' picks (in loop order, each sample once);
- :func:`training_batches`: the loop's batches of pool indices: reshuffled epochs of the training set
  (:func:`epoch_batches`), or with ``replay`` a share of each batch from the earlier picks;
- :func:`derive_seed`: the per-purpose seeds of a run (head, selection per loop, batch order per loop).

Pure functions of numpy arrays; the engine (``vecaf.train.engine``) calls them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["derive_seed", "epoch_batches", "loop_batches", "training_batches", "training_set"]


def loop_batches(batch_budget: int, loops: int) -> list[int]:
    """Split B batches over L loops: B // L each, the first B mod L loops one more.

    Raises:
        ValueError: B < L (a loop would train no batch), or either is not a positive integer.
    """
    for name, value in (("batch_budget", batch_budget), ("loops", loops)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if batch_budget < loops:
        raise ValueError(
            f"batch_budget ({batch_budget}) is smaller than the number of loops ({loops}): every loop must "
            "train at least one batch"
        )
    base, extra = divmod(int(batch_budget), int(loops))
    return [base + (1 if i < extra else 0) for i in range(int(loops))]


def epoch_batches(subset: np.ndarray, n_batches: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """``n_batches`` batches of pool indices that walk through reshuffled epochs of ``subset``.

    The stream is perm_1(subset) ++ perm_2(subset) ++ ..., cut into consecutive batches of ``batch_size``;
    a batch may span two epochs (and then hold a sample twice when the subset is smaller than a batch).

    Returns:
        (n_batches, batch_size) int64 array.
    """
    subset = np.asarray(subset, dtype=np.int64)
    if subset.size == 0:
        raise ValueError("cannot draw batches from an empty subset")
    need = n_batches * batch_size
    epochs = -(-need // subset.size)
    stream = np.concatenate([rng.permutation(subset) for _ in range(epochs)])
    return stream[:need].reshape(n_batches, batch_size)


def derive_seed(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([int(seed), *[int(k) for k in keys]]).generate_state(1)[0])


def training_set(picks: np.ndarray, earlier: Sequence[np.ndarray], *, cumulative: bool, replay: float) -> np.ndarray:
    """What a loop trains on: its picks, or (``cumulative`` or ``replay`` > 0) the union with ``earlier``.

    The union lists the picks in loop order, each sample once (at its first pick), so loop 1 trains exactly
    as without either option.
    """
    picks = np.asarray(picks, dtype=np.int64)
    if not (cumulative or replay > 0) or not len(earlier):
        return picks
    chosen = np.concatenate([np.asarray(e, dtype=np.int64) for e in earlier] + [picks])
    _, first = np.unique(chosen, return_index=True)
    return chosen[np.sort(first)]


def training_batches(
    subset: np.ndarray, picks: np.ndarray | None, n_batches: int, batch_size: int, rng: np.random.Generator,
    *, replay: float = 0.0,
) -> np.ndarray:
    """The loop's (n_batches, batch_size) pool indices.

    Without replay: :func:`epoch_batches` of ``subset`` (the training set). With ``replay`` > 0 and earlier
    picks in ``subset``: each batch holds round(replay * batch_size) samples (at most batch_size - 1) drawn
    from the earlier picks (``subset`` minus ``picks``) and the rest from ``picks``, each part walking its
    own reshuffled epochs.
    """
    if replay > 0 and picks is not None:
        earlier = np.setdiff1d(subset, picks)
        n_old = min(int(round(replay * batch_size)), batch_size - 1) if earlier.size else 0
        batches = epoch_batches(picks, n_batches, batch_size - n_old, rng)
        if n_old:
            batches = np.concatenate([batches, epoch_batches(earlier, n_batches, n_old, rng)], axis=1)
        return batches
    return epoch_batches(subset, n_batches, batch_size, rng)
