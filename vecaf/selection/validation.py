"""Input checks shared by every selection strategy.

Each check turns user input (numpy array, torch tensor or nested list) into the form the strategies use
and raises a ``ValueError`` that names the argument and the problem: wrong rank, empty, NaN/inf,
negative losses, a row count that does not match the embeddings, ``exclude`` out of range, a budget that
does not fit the pool. Finiteness is checked in row blocks so a 1.28 M x 768 pool never needs a second
full-size boolean array.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

_CHECK_BLOCK_ELEMENTS = 1 << 24


def _to_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
    else:
        try:
            array = np.asarray(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be an array of numbers: {exc}") from exc
        if array.dtype == object or not (
            np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.bool_)
        ):
            raise ValueError(f"{name} must be an array of numbers, got dtype {array.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise ValueError(f"{name} must hold real numbers, got dtype {tensor.dtype}")
    return tensor


def _check_finite(tensor: torch.Tensor, name: str) -> None:
    flat_rows = tensor.reshape(tensor.shape[0], -1) if tensor.ndim > 1 else tensor.reshape(-1, 1)
    per_row = max(1, flat_rows.shape[1])
    step = max(1, _CHECK_BLOCK_ELEMENTS // per_row)
    for start in range(0, flat_rows.shape[0], step):
        block = flat_rows[start : start + step]
        if not torch.isfinite(block).all():
            bad = ~torch.isfinite(block)
            row = start + int(bad.any(dim=1).nonzero()[0, 0])
            kind = "NaN" if torch.isnan(block).any() else "inf"
            raise ValueError(f"{name} contains {kind} values (first bad row: {row})")


def check_matrix(value: Any, name: str, *, n_rows: int | None = None) -> torch.Tensor:
    """A finite, non-empty (N, D) float matrix as a float32 CPU or device tensor (no copy when possible).

    Args:
        value: numpy array, torch tensor or nested list.
        name: the argument's name, used in error messages.
        n_rows: when given, the number of rows the matrix must have.

    Returns:
        The matrix as a float32 tensor on its original device.
    """
    if value is None:
        raise ValueError(f"{name} is required, got None")
    tensor = _to_tensor(value, name)
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tensor.shape)})")
    if n_rows is not None and tensor.shape[0] != n_rows:
        raise ValueError(
            f"{name} has {tensor.shape[0]} rows but embeddings have {n_rows}: one row per pool sample is needed"
        )
    if tensor.dtype != torch.float32:
        tensor = tensor.to(torch.float32)
    _check_finite(tensor, name)
    return tensor


def check_losses(value: Any, n: int, *, name: str = "losses") -> torch.Tensor:
    """Per-sample losses: a finite, non-negative (N,) float vector (float64 CPU tensor)."""
    if value is None:
        raise ValueError(f"{name} is required, got None")
    tensor = _to_tensor(value, name)
    if tensor.ndim != 1:
        raise ValueError(f"{name} must be a 1-D (N,) array, got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if tensor.shape[0] != n:
        raise ValueError(f"{name} has {tensor.shape[0]} entries but embeddings have {n} rows")
    tensor = tensor.to(device="cpu", dtype=torch.float64)
    _check_finite(tensor, name)
    if (tensor < 0).any():
        first = int((tensor < 0).nonzero()[0, 0])
        raise ValueError(f"{name} must be non-negative, got {float(tensor[first])} at index {first}")
    return tensor


def check_probs(value: Any, n: int, *, name: str = "probs") -> torch.Tensor:
    """Class probabilities of the current model: a finite (N, C) matrix, C >= 2, rows in the simplex.

    Every entry must be >= 0 and every row must sum to 1 within 1e-3 (softmax outputs in float16/32 do);
    the result is a float64 CPU tensor.
    """
    if value is None:
        raise ValueError(f"{name} is required, got None")
    tensor = _to_tensor(value, name)
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, C) array of class probabilities, got shape {tuple(tensor.shape)}")
    if tensor.shape[0] != n:
        raise ValueError(f"{name} has {tensor.shape[0]} rows but embeddings have {n}: one row per pool sample is needed")
    if tensor.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 classes (columns), got {tensor.shape[1]}")
    tensor = tensor.to(device="cpu", dtype=torch.float64)
    _check_finite(tensor, name)
    if (tensor < 0).any():
        row = int((tensor < 0).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"{name} must be non-negative (probabilities), got a negative entry in row {row}")
    sums = tensor.sum(dim=1)
    off = (sums - 1.0).abs() > 1e-3
    if off.any():
        row = int(off.nonzero()[0, 0])
        raise ValueError(
            f"{name} rows must sum to 1 (softmax of the logits), row {row} sums to {float(sums[row]):.6g}"
        )
    return tensor


def check_exclude(value: Any, n: int) -> np.ndarray:
    """Indices chosen in earlier loops: unique sorted int64 numpy array, each in [0, n)."""
    if value is None:
        return np.zeros(0, dtype=np.int64)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"exclude must be a 1-D array of indices, got shape {array.shape}")
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"exclude must hold integer indices, got dtype {array.dtype}")
    array = array.astype(np.int64)
    bad = (array < 0) | (array >= n)
    if bad.any():
        raise ValueError(
            f"exclude indices must lie in [0, {n}), got {int(array[bad][0])} "
            f"({int(bad.sum())} out of range)"
        )
    return np.unique(array)


def check_budget(budget: Any, n: int, n_excluded: int) -> int:
    """The number of samples to select: an integer in [1, n - n_excluded]."""
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, numbers.Integral):
        raise ValueError(f"budget must be an integer, got {budget!r}")
    budget = int(budget)
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    available = n - n_excluded
    if budget > available:
        raise ValueError(
            f"budget {budget} is larger than the pool minus exclude ({n} samples - {n_excluded} excluded "
            f"= {available})"
        )
    return budget


def check_seed(seed: Any) -> int:
    """A non-negative integer seed."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_result(indices: np.ndarray, budget: int, n: int, exclude: np.ndarray, method: str) -> np.ndarray:
    """Guard the contract every strategy must keep: ``budget`` unique int64 indices, none excluded."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    problems = []
    if indices.shape[0] != budget:
        problems.append(f"{indices.shape[0]} indices instead of {budget}")
    if np.unique(indices).shape[0] != indices.shape[0]:
        problems.append("duplicate indices")
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        problems.append("indices out of range")
    if exclude.size and np.isin(indices, exclude).any():
        problems.append("excluded indices")
    if problems:
        raise RuntimeError(f"selection method {method!r} broke its contract: " + ", ".join(problems))
    return indices
