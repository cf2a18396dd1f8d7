"""Selection strategies by name, and the one entry point ``select``.

A strategy is one class registered with ``@register_method("name")``: a dataclass whose fields are its
options (with defaults) and whose ``select`` method returns the chosen indices. ``select(..., method=name,
**options)`` validates the common inputs once (see ``vecaf.selection.validation``), builds the strategy
from the options, runs it and checks the result keeps the contract: ``budget`` unique int64 indices in
[0, N), none of them in ``exclude``, the same for the same seed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, TypeVar

import numpy as np
import torch

from vecaf.selection import validation

_REGISTRY: dict[str, type["SelectionMethod"]] = {}

M = TypeVar("M", bound=type["SelectionMethod"])


class SelectionMethod:
    """Base class of a selection strategy.

    Subclasses are dataclasses whose fields are the strategy's options, and implement ``select``.
    Class attributes say which inputs the strategy needs.

    Attributes:
        name: the registered name (set by ``register_method``).
        requires_losses: ``select`` refuses to run this strategy without per-sample losses.
        uses_text: the strategy reads ``text_embeddings`` (others ignore them).
        requires_probs: the strategy needs the current model's (N, C) class probabilities; ``select``
            passes them to its ``select`` as the keyword ``probs`` (a float64 CPU tensor).
    """

    name: ClassVar[str] = ""
    requires_losses: ClassVar[bool] = False
    uses_text: ClassVar[bool] = False
    requires_probs: ClassVar[bool] = False

    @classmethod
    def from_options(cls, **options: Any) -> "SelectionMethod":
        """Build the strategy from keyword options; unknown option names raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for method {cls.name!r}; "
                f"known options: {', '.join(sorted(known)) or 'none'}"
            )
        return cls(**options)

    def select(
        self,
        embeddings: torch.Tensor,
        budget: int,
        *,
        losses: torch.Tensor | None,
        text_embeddings: torch.Tensor | None,
        exclude: np.ndarray,
        seed: int,
    ) -> np.ndarray:
        """Choose ``budget`` pool indices (validated inputs in, int64 numpy array out)."""
        raise NotImplementedError


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator that registers a selection strategy under ``name``.

    Example:
        >>> @register_method("first")
        ... @dataclasses.dataclass
        ... class First(SelectionMethod):
        ...     def select(self, embeddings, budget, *, losses, text_embeddings, exclude, seed):
        ...         keep = np.setdiff1d(np.arange(embeddings.shape[0]), exclude)
        ...         return keep[:budget]
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a method name must be a non-empty string, got {name!r}")

    def decorator(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, SelectionMethod)):
            raise ValueError(f"register_method({name!r}) needs a SelectionMethod subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a selection method named {name!r} is already registered ({_REGISTRY[name]!r})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def list_methods() -> list[str]:
    """Names of the registered selection strategies, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str) -> type[SelectionMethod]:
    """The strategy class registered under ``name``; ``ValueError`` listing the names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown selection method {name!r}; registered methods: {list_methods()}") from None


def select(
    embeddings: Any,
    budget: int,
    *,
    method: str = "vecaf",
    losses: Any = None,
    text_embeddings: Any = None,
    exclude: Any = None,
    seed: int = 0,
    probs: Any = None,
    **options: Any,
) -> np.ndarray:
    """Select ``budget`` samples of a pool with the named strategy.

    Args:
        embeddings: (N, D) image embeddings (numpy or torch), finite.
        budget: K, the number of samples to choose; 1 <= K <= N - len(exclude).
        method: a name from ``list_methods()``: ``random``, ``topk_loss``, ``coreset``, ``activeft``,
            ``entropy``, ``margin`` (uncertainty sampling), ``vecaf`` (ODS, Eq. 7, with the ensemble
            debiasing of Sec. 3.1 and optional CEA, Eq. 8-9).
        losses: (N,) non-negative per-sample losses L_i under the current model (Eq. 3); required by
            ``vecaf`` and ``topk_loss``.
        text_embeddings: (N, Dt) caption embeddings; ``vecaf`` then augments the image embeddings with
            CEA before ODS (Sec. 3.2).
        exclude: indices chosen in earlier loops; none of them is returned.
        seed: the random seed; the same seed gives the same indices.
        probs: (N, C) class probabilities of the current model (softmax of its logits); required by
            ``entropy`` and ``margin``, ignored by the others.
        **options: strategy options (see the strategy class, e.g. ``vecaf.selection.VeCAF``).

    Returns:
        (budget,) int64 array of unique indices in [0, N), none in ``exclude``.

    Raises:
        ValueError: on bad input (the message names the argument and the problem).
    """
    strategy_cls = get_method(method)
    emb = validation.check_matrix(embeddings, "embeddings")
    n = emb.shape[0]
    loss = None if losses is None else validation.check_losses(losses, n)
    if strategy_cls.requires_losses and loss is None:
        raise ValueError(f"method {method!r} needs losses: pass the (N,) per-sample losses under the current model")
    if strategy_cls.requires_probs and probs is None:
        raise ValueError(
            f"method {method!r} needs probs: pass the (N, C) class probabilities of the current model "
            "(softmax of its logits)"
        )
    extra = {"probs": validation.check_probs(probs, n)} if strategy_cls.requires_probs else {}
    text = None
    if text_embeddings is not None:
        text = validation.check_matrix(text_embeddings, "text_embeddings", n_rows=n)
    excluded = validation.check_exclude(exclude, n)
    budget = validation.check_budget(budget, n, excluded.shape[0])
    seed = validation.check_seed(seed)
    strategy = strategy_cls.from_options(**options)
    indices = strategy.select(
        emb,
        budget,
        losses=loss,
        text_embeddings=text if strategy_cls.uses_text else None,
        exclude=excluded,
        seed=seed,
        **extra,
    )
    return validation.check_result(indices, budget, n, excluded, method)
