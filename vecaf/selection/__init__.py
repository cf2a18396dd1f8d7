"""Active selection of a finetuning subset: VeCAF's ODS (Sec. 3.1, Eq. 3-7) and baselines, by name.

    import vecaf
    idx = vecaf.select(embeddings, budget, method="vecaf", losses=losses)   # (budget,) int64
    vecaf.list_methods()  # ['activeft', 'coreset', 'entropy', 'margin', 'random', 'topk_loss', 'vecaf']

Modules: ``registry`` (``select``, ``register_method``, ``list_methods``), ``validation`` (input checks),
``ods`` (Eq. 7 with hand-written gradients, batched members, bounded-memory blocks), ``ensemble``
(member alignment and debiasing), ``matching`` (centroid -> sample), ``methods`` (``vecaf``, ``activeft``),
``baselines`` (``random``, ``topk_loss``, ``coreset``), ``uncertainty`` (``entropy``, ``margin``: uncertainty
sampling from the current model's class probabilities, ``probs``).
"""

from vecaf.selection import baselines, methods, uncertainty
from vecaf.selection.baselines import CoreSet, RandomSelection, TopKLoss
from vecaf.selection.ensemble import align_members, debias
from vecaf.selection.matching import match_centroids
from vecaf.selection.methods import ActiveFT, VeCAF
from vecaf.selection.ods import ODSResult, ods_objective, optimize_ods
from vecaf.selection.registry import SelectionMethod, get_method, list_methods, register_method, select
from vecaf.selection.uncertainty import EntropySampling, MarginSampling

__all__ = [
    "ActiveFT",
    "CoreSet",
    "EntropySampling",
    "MarginSampling",
    "ODSResult",
    "RandomSelection",
    "SelectionMethod",
    "TopKLoss",
    "VeCAF",
    "align_members",
    "baselines",
    "debias",
    "get_method",
    "list_methods",
    "match_centroids",
    "methods",
    "ods_objective",
    "optimize_ods",
    "register_method",
    "select",
    "uncertainty",
]
