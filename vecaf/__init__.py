"""VeCAF: VLM-empowered Collaborative Active Finetuning, as a pure library.

    import vecaf
    idx = vecaf.select(embeddings, budget, method="vecaf", losses=losses, text_embeddings=t)

Selection strategies (``vecaf.list_methods()``), Cross-attentive Embedding Augmentation (``vecaf.cea``),
objectives (``vecaf.objectives``), models (``vecaf.models``), data (``vecaf.data``) and the finetuning
engine (``vecaf.train``). No server client is imported here: the pipeline is a user of this library.
"""

from vecaf import cea
from vecaf.selection import list_methods, register_method, select

__all__ = ["cea", "list_methods", "register_method", "select"]
__version__ = "0.1.0"
