"""Shared inference plumbing for the model zoo: device choice, deterministic inference, batching.

Every model in ``vecaf.models`` runs under :func:`inference` (``torch.inference_mode``, cuDNN in its
deterministic mode, autotuning off) on the device named by ``device`` ('auto' = CUDA when present), in
batches walked in input order with an optional tqdm progress bar. Nothing here touches the network.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch

from vecaf.settings import resolve_device

T = TypeVar("T")


def device_of(device: str | torch.device) -> torch.device:
    """The torch device for a user value: 'auto' -> CUDA when visible, else CPU.

    Raises:
        ValueError: the name is not a torch device, or CUDA is asked for and absent.
    """
    name = resolve_device(str(device))
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but no CUDA device is visible; use device='auto' or 'cpu'")
    return dev


@contextlib.contextmanager
def inference() -> Iterator[None]:
    """``torch.inference_mode`` with cuDNN deterministic and not benchmarking; restores the flags after."""
    previous = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous


def check_batch_size(batch_size: int) -> int:
    """A positive int batch size, or a ``ValueError`` naming the bad value."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def batches(items: Sequence[T], batch_size: int, *, progress: bool = False, desc: str = "") -> Iterator[Sequence[T]]:
    """Consecutive slices of ``items`` of at most ``batch_size`` elements, in order, with a progress bar."""
    from tqdm.auto import tqdm

    check_batch_size(batch_size)
    with tqdm(total=len(items), desc=desc, unit="item", disable=not progress, leave=False) as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            yield chunk
            bar.update(len(chunk))


def checked_texts(texts: Any, name: str = "texts") -> list[str]:
    """A list of str, or a ``ValueError`` naming the first non-string entry."""
    if isinstance(texts, str):
        raise ValueError(f"{name} must be a list of strings, got a single string; wrap it in a list")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise ValueError(f"{name}[{i}] must be a str, got {type(t).__name__}")
    return out
