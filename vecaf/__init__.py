"""VeCAF: VLM-empowered Collaborative Active Finetuning, as a pure library.

    import vecaf
    idx = vecaf.select(embeddings, budget, method="vecaf", losses=losses, text_embeddings=t)

Selection strategies (``vecaf.list_methods()``), Cross-attentive Embedding Augmentation (``vecaf.cea``),
objectives (``vecaf.objectives``), models (``vecaf.models``), data (``vecaf.data``) and the finetuning
engine (``vecaf.train``). No server client is imported here: the pipeline is a user of this library.
Submodules load on first use, so ``import vecaf`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["cea", "data", "list_methods", "models", "objectives", "register_method", "select", "train"]

_FROM_SELECTION = {"select", "list_methods", "register_method"}
_SUBMODULES = {"cea", "data", "models", "objectives", "selection", "settings", "train"}


def __getattr__(name: str) -> Any:
    if name in _FROM_SELECTION:
        return getattr(importlib.import_module("vecaf.selection"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"vecaf.{name}")
    raise AttributeError(f"module 'vecaf' has no attribute {name!r}")
