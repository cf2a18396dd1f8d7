"""Model inputs addressed by pool index: an in-memory tensor, or a dataset read (and transformed) on demand.

Shared by the engine (pool and test passes, training batches) and ``head.extract_features``; a dataset whose
tensors fit in ``MATERIALIZE_LIMIT_BYTES`` is read once into memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["MATERIALIZE_LIMIT_BYTES", "Rows", "as_rows"]

MATERIALIZE_LIMIT_BYTES = 2 << 30


class Rows:
    """Model inputs addressed by pool index: an in-memory tensor, or a dataset read on demand."""

    def __init__(self, tensor: torch.Tensor | None = None, dataset: Any = None, transform: Callable | None = None):
        self.tensor, self.dataset, self.transform = tensor, dataset, transform

    def __len__(self) -> int:
        return int(self.tensor.shape[0]) if self.tensor is not None else len(self.dataset)

    def take(self, idx: np.ndarray) -> torch.Tensor:
        if self.tensor is not None:
            return self.tensor[torch.from_numpy(np.asarray(idx, dtype=np.int64))]
        return torch.stack([_item_tensor(self.dataset[int(i)], self.transform) for i in idx])


def _item_tensor(item: Any, transform: Callable | None) -> torch.Tensor:
    image = item[1] if isinstance(item, tuple) else item
    if transform is not None:
        image = transform(image)
    if not isinstance(image, torch.Tensor):
        raise ValueError(
            f"dataset items must give tensors (pass transform=... or a PVM), got {type(image).__name__}"
        )
    return image.float()


def as_rows(data: Any, *, transform: Callable | None, name: str, materialize: bool | None = None) -> Rows:
    if isinstance(data, (torch.Tensor, np.ndarray)):
        tensor = torch.as_tensor(np.asarray(data) if isinstance(data, np.ndarray) else data).float()
        if tensor.ndim < 2 or tensor.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty array with one row per sample, got {tuple(tensor.shape)}")
        return Rows(tensor=tensor)
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise ValueError(f"{name} must be a dataset, an (inputs, labels) pair or an array, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"{name} is empty")
    rows = Rows(dataset=data, transform=transform)
    if materialize is None:
        first = rows.take(np.arange(1))
        materialize = first.numel() * first.element_size() * len(data) <= MATERIALIZE_LIMIT_BYTES
    if materialize:
        parts = [rows.take(np.arange(s, min(s + 256, len(data)))) for s in range(0, len(data), 256)]
        return Rows(tensor=torch.cat(parts))
    return rows
