"""Where a run starts from: the current champion (warm start) or the base PVM (``training.init``).

A recurring run should not start from scratch when a champion of the same task exists: with
``init="champion"`` loop 1's per-sample losses come from the champion (so loop 1's selection is already
objective-aware) and training continues from its weights. That is only sound when the champion is the
same network on the same classes and inputs; :func:`choose_init` decides, and says why, from the
champion's stored configuration (``vecaf.models.classifier`` ``config.json``) and the run's settings:

- ``init="base"``, no champion, or a champion that could not be read: the base PVM;
- the champion's ``class_names`` differ from the pool's (names and order): the base PVM (its head answers
  other classes);
- another architecture (``arch``) or PVM (``pvm``), or another input size: the base PVM;
- a ``head``-mode run needs a champion trained in ``head`` mode too (the pool's cached features come from
  the frozen base backbone, which a ``full``-mode champion no longer has); a ``full``-mode run may start
  from either;
- otherwise the champion.

Pure: no I/O; the caller loads the champion (after the registry's format check) and records the choice
(``training.init_used`` and the reason).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["INIT_CHOICES", "InitChoice", "choose_init"]

INIT_CHOICES = ("champion", "base")


@dataclass(frozen=True)
class InitChoice:
    """The outcome of :func:`choose_init`.

    Attributes:
        used: "champion" or "base".
        reason: one sentence saying why.
    """

    used: str
    reason: str

    @property
    def warm(self) -> bool:
        """True when the run starts from the champion."""
        return self.used == "champion"


def choose_init(
    init: str,
    champion: Mapping[str, Any] | None,
    *,
    class_names: Sequence[str],
    arch: str,
    pvm: str,
    mode: str,
    input_size: Sequence[int] | None = None,
    champion_error: str | None = None,
    champion_version: str | None = None,
) -> InitChoice:
    """Decide whether a run warm-starts from the champion.

    Args:
        init: ``training.init``: "champion" (use it when it fits) or "base".
        champion: the champion's classifier configuration (``config.json``), or None when there is none.
        class_names: the pool's class names, in label order.
        arch: the timm architecture the run trains (``PVM.arch``).
        pvm: the PVM name the run uses.
        mode: the run's mode, "head" or "full".
        input_size: the run's ``[3, S, S]`` input size (None: not compared).
        champion_error: why the champion could not be read (format refused, missing files...), if so.
        champion_version: the champion's version, for the reason.

    Returns:
        An :class:`InitChoice`.

    Raises:
        ValueError: ``init`` or ``mode`` is not a known value.
    """
    if init not in INIT_CHOICES:
        raise ValueError(f"training.init must be one of {INIT_CHOICES}, got {init!r}")
    if mode not in ("head", "full"):
        raise ValueError(f"mode must be 'head' or 'full', got {mode!r}")
    who = "the champion" if champion_version is None else f"champion version {champion_version}"
    if init == "base":
        return InitChoice("base", "training.init is 'base': the run starts from the base PVM")
    if champion_error is not None:
        return InitChoice("base", f"{who} could not be used ({champion_error}): started from the base PVM")
    if champion is None:
        return InitChoice("base", "there is no champion yet: started from the base PVM")
    theirs = [str(n) for n in champion.get("class_names") or []]
    ours = [str(n) for n in class_names]
    if theirs != ours:
        if sorted(theirs) == sorted(ours):
            what = "the same classes in another label order"
        else:
            added, dropped = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
            what = f"other classes (pool only: {added or 'none'}; champion only: {dropped or 'none'})"
        return InitChoice("base", f"{who} predicts {what}: warm start refused, started from the base PVM")
    for key, value in (("arch", arch), ("pvm", pvm)):
        if champion.get(key) != value:
            return InitChoice(
                "base",
                f"{who} has {key} {champion.get(key)!r} but the run uses {value!r}: warm start refused, started "
                "from the base PVM",
            )
    if input_size is not None and list(champion.get("input_size") or []) != [int(v) for v in input_size]:
        return InitChoice(
            "base",
            f"{who} takes inputs {champion.get('input_size')} but the run uses {list(input_size)}: warm start "
            "refused, started from the base PVM",
        )
    if mode == "head" and champion.get("mode") != "head":
        return InitChoice(
            "base",
            f"{who} was finetuned in {champion.get('mode')!r} mode, so its head expects features of its own "
            "backbone, not the frozen base PVM's of a 'head' run: started from the base PVM",
        )
    return InitChoice("champion", f"warm start from {who} (same classes, architecture and inputs)")
