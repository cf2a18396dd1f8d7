"""Flow ``promote``: re-evaluate challenger and champion on the held-out split; move ``champion`` if earned.

1. ``read-model-aliases``: the versions behind ``challenger`` and ``champion``.
2. ``load-dataset``: the held-out split (its manifest and digest; the same images for both models).
3. ``evaluate-model`` for the challenger, and for the champion when there is one: top-1 and loss computed
   here from the images with each model's own preprocessing (logged numbers are not trusted).
4. Decide (``tasks.registry.decide``): promote when there is no champion, or when the challenger's top-1
   beats the champion's by more than ``registry.promotion_margin``. A champion trained for other classes
   cannot be compared on this split: it is kept, and the decision says why.
5. ``promote-champion`` (only when promoted): alias ``champion`` -> the challenger version.
6. ``record-promotion``: ``promotion.*`` tags on the version, ``last_promotion`` on the model, and the
   Prefect markdown artifact ``promotion-decision``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.params import DataParams, RegistryParams
from flows.runtime import flow_run_info, runtime
from tasks.data import load_dataset_task
from tasks.registry import decide, now_iso, read_aliases_task, record_decision_task, set_champion_task
from tasks.training import evaluate_model_task


@flow(
    name="promote",
    description="Re-evaluate challenger vs champion on held-out data; move the champion alias if earned.",
)
def promote(
    data: DataParams = DataParams(),
    registry: RegistryParams = RegistryParams(),
    device: str = "auto",
) -> dict[str, Any]:
    """Promote the challenger when it beats the champion on the held-out split by more than the margin.

    Args:
        data: where the held-out split comes from (``test_split``, ``test_size``, ``subset_seed``).
        registry: the registered model and the margin.
        device: where the models are evaluated ('auto', 'cpu', 'cuda').

    Returns:
        The decision: ``{"promoted", "reason", "margin", "challenger", "challenger_eval", "champion_before",
        "champion_eval", "champion_after", "holdout", "decided_at", "flow_run_id"}`` (``promoted`` None when
        there is no challenger, or it already is the champion).
    """
    rt = runtime()
    name = registry.model_name
    aliases = read_aliases_task(rt.tracking_uri, name)
    challenger, champion = aliases["challenger"], aliases["champion"]
    if challenger is None:
        after = None if champion is None else champion["version"]
        return {"promoted": None, "reason": f"{name} has no challenger version", "champion_after": after}
    if champion is not None and champion["version"] == challenger["version"]:
        reason = f"version {challenger['version']} already is the champion"
        return {"promoted": None, "reason": reason, "champion_after": champion["version"]}
    holdout = load_dataset_task(data, data.test_split, rt.work_dir)
    if challenger["class_names"] != holdout["class_names"]:
        raise ValueError(
            f"{name} version {challenger['version']} predicts {challenger['class_names']}, but the held-out split "
            f"{data.dataset}/{data.test_split} has {holdout['class_names']}: promote it with the data it was "
            "trained for"
        )
    challenger_eval = evaluate_model_task(rt.tracking_uri, f"models:/{name}/{challenger['version']}", data, device)
    champion_eval = None
    comparable = champion is None or champion["class_names"] == holdout["class_names"]
    if champion is not None and comparable:
        champion_eval = evaluate_model_task(rt.tracking_uri, f"models:/{name}/{champion['version']}", data, device)
    if comparable:
        promoted, reason = decide(
            challenger_eval["top1"], None if champion_eval is None else champion_eval["top1"], registry.promotion_margin
        )
    else:
        promoted = False
        reason = (
            f"champion version {champion['version']} predicts other classes than {data.dataset} and cannot be "
            "evaluated on this held-out split: champion kept (move the alias by hand, or use another model_name)"
        )
    if promoted:
        set_champion_task(rt.tracking_uri, name, challenger["version"])
    decision = {
        "promoted": promoted,
        "reason": reason,
        "margin": registry.promotion_margin,
        "challenger": challenger,
        "challenger_eval": challenger_eval,
        "champion_before": champion,
        "champion_eval": champion_eval,
        "champion_after": challenger["version"] if promoted else champion["version"],
        "holdout": {k: holdout[k] for k in ("dataset", "split", "size", "digest")},
        "decided_at": now_iso(),
        "flow_run_id": flow_run_info()["id"],
    }
    record_decision_task(rt.tracking_uri, name, decision)
    return decision
