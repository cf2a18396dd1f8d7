"""Flow ``promote``: re-evaluate challenger and champion on the held-out split; move ``champion`` if earned.

Everything below runs holding the promotion lock of the model (``tasks.registry.promotion_lock``: a Prefect
global concurrency limit ``vecaf-promote-<model>`` with one slot), so two promotions never interleave.

1. ``read-model-aliases``: the versions behind ``challenger`` and ``champion``, and whether each is stored in
   the pipeline's pickle-free format (checked from MLflow's file listing and MLmodel YAML only). A challenger
   in another format is refused before anything is downloaded or deserialized ("refused-format").
2. ``load-dataset``: the held-out split (its manifest and digest; the same images for both models).
3. ``evaluate-model`` for the challenger, and for the champion when there is one: top-1 and loss computed
   here from the images with each model's own preprocessing (logged numbers are not trusted). A champion
   that predicts a subset of the held-out classes (the pool gained classes since) is evaluated with its
   classes mapped by name, the images of classes it does not know counting as errors. A champion trained
   for classes outside the held-out's, or not in the pickle-free format, is not evaluated: it is kept, and
   the decision says why.
4. Decide (``tasks.registry.decide``): promote when there is no champion, or when the challenger's top-1
   beats the champion's by more than ``registry.promotion_margin``.
5. ``promote-champion`` (only when promoted): the aliases are read again; ``champion`` -> the challenger only
   if neither alias moved since step 1, else nothing moves ("refused-changed", naming the versions).
6. ``record-promotion``: ``promotion.*`` tags on the version (the versions actually compared),
   ``last_promotion`` on the model, and the Prefect markdown artifact ``promotion-decision``.

With ``rollback=True`` or ``to_version=N`` (``vecaf promote --rollback`` / ``--to-version N``) nothing is
evaluated: under the same lock the champion history is read (``read-champion-history``), the target chosen
(``tasks.registry.rollback_target``: the previous champion, or N), its format checked
(``describe-model-version``; a version in another format is refused), ``champion`` moved as a
compare-and-set (``move-champion``) and the move recorded like a promotion (``record-promotion``, outcome
"rolled-back" or "moved-to-version"). A rollback with no earlier champion raises a ``ValueError`` that says so.
"""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow, get_run_logger
from pydantic import Field

from flows.params import DEVICE_PATTERN, HeldOutParams, ParameterError, PromotionParams, checked
from flows.runtime import flow_run_info, runtime
from tasks.data import check_splits, load_dataset_task
from tasks.registry import (
    ROLLBACK_OUTCOMES,
    decide,
    describe_version_task,
    move_champion_task,
    now_iso,
    promote_if_unchanged_task,
    promotion_lock,
    read_aliases_task,
    read_history_task,
    record_decision_task,
    rollback_target,
)
from tasks.training import evaluate_model_task


@flow(
    name="promote",
    description="Re-evaluate challenger vs champion on held-out data; move the champion alias if earned.",
    validate_parameters=False,  # checked() below: a misfit fails the run with a one-line state message
)
def promote(
    data: HeldOutParams = HeldOutParams(),
    registry: PromotionParams = PromotionParams(),
    device: Annotated[str, Field(pattern=DEVICE_PATTERN)] = "auto",
    rollback: bool = False,
    to_version: Annotated[int | None, Field(ge=1)] = None,
) -> dict[str, Any]:
    """Promote the challenger when it beats the champion on the held-out split by more than the margin.

    Args:
        data: where the held-out split comes from (``test_split``, ``test_size``, ``subset_seed``).
        registry: the registered model and the margin.
        device: where the models are evaluated ('auto', 'cpu', 'cuda').
        rollback: instead, point ``champion`` back at the previous champion (nothing evaluated).
        to_version: instead, point ``champion`` at this version (nothing evaluated).

    Returns:
        The decision: ``{"promoted", "outcome", "reason", "margin", "challenger", "challenger_eval",
        "champion_before", "champion_eval", "champion_after", "holdout", "decided_at", "flow_run_id", "lock"}``
        (``promoted`` None when there is no challenger, or it already is the champion; ``outcome`` one of
        promoted, kept-champion, refused-changed, refused-format).
    """
    data, registry = checked(HeldOutParams, data), checked(PromotionParams, registry)
    if rollback and to_version is not None:
        raise ParameterError("invalid parameters: pass either rollback=True or to_version=N, not both")
    if to_version is not None and (isinstance(to_version, bool) or int(to_version) < 1):
        raise ParameterError(f"invalid parameters: to_version must be a model version number >= 1, got {to_version!r}")
    rt = runtime()
    name = registry.model_name
    get_run_logger().info("waiting for the promotion lock of %s (one promotion at a time)", name)
    if rollback or to_version is not None:
        with promotion_lock(name) as lock:
            return _move_by_hand(rt, name, registry, None if to_version is None else str(int(to_version)), lock)
    with promotion_lock(name) as lock:
        aliases = read_aliases_task(rt.tracking_uri, name)
        challenger, champion = aliases["challenger"], aliases["champion"]
        if challenger is None:
            after = None if champion is None else champion["version"]
            return {"promoted": None, "reason": f"{name} has no challenger version", "champion_after": after}
        if champion is not None and champion["version"] == challenger["version"]:
            reason = f"version {challenger['version']} already is the champion"
            return {"promoted": None, "reason": reason, "champion_after": champion["version"]}
        decision: dict[str, Any] = {
            "margin": registry.promotion_margin, "challenger": challenger, "challenger_eval": None,
            "champion_before": champion, "champion_eval": None, "holdout": None, "lock": lock,
        }  # fmt: skip
        if challenger["format_error"] is not None:
            decision.update(outcome="refused-format", promoted=False, reason=(
                f"challenger version {challenger['version']} refused, never loaded: {challenger['format_error']}"
            ))  # fmt: skip
        else:
            decision.update(_evaluate_and_decide(rt, name, data, registry, device, challenger, champion))
        if decision["promoted"]:
            cas = promote_if_unchanged_task(
                rt.tracking_uri, name, challenger["version"], None if champion is None else champion["version"]
            )
            if not cas["moved"]:
                decision.update(outcome="refused-changed", promoted=False, reason=(
                    f"{decision['reason']}, but {cas['why_not']}: nothing moved (the next promotion compares the "
                    "versions the aliases point at now)"
                ))  # fmt: skip
        decision["champion_after"] = (
            challenger["version"] if decision["promoted"] else (None if champion is None else champion["version"])
        )
        decision.update(decided_at=now_iso(), flow_run_id=flow_run_info()["id"])
        record_decision_task(rt.tracking_uri, name, decision)
    return decision


def _evaluate_and_decide(
    rt: Any, name: str, data: HeldOutParams, registry: PromotionParams, device: str, challenger: dict, champion: dict | None
) -> dict[str, Any]:
    """Steps 2-4: the held-out split (checked disjoint from the pool), the evaluations, the rule.

    Returns the decision's fields so far.
    """
    holdout = load_dataset_task(data, data.test_split, rt.work_dir)
    if challenger["class_names"] != holdout["class_names"]:
        raise ValueError(
            f"{name} version {challenger['version']} predicts {challenger['class_names']}, but the held-out split "
            f"{data.dataset}/{data.test_split} has {holdout['class_names']}: promote it with the data it was "
            "trained for"
        )
    check_splits(data, load_dataset_task(data, data.train_split, rt.work_dir), holdout)
    out: dict[str, Any] = {"holdout": {k: holdout[k] for k in ("dataset", "split", "size", "digest")}}
    out["challenger_eval"] = evaluate_model_task(
        rt.tracking_uri, f"models:/{name}/{challenger['version']}", data, device
    )
    if champion is None:
        promoted, reason = decide(out["challenger_eval"]["top1"], None, registry.promotion_margin)
        return {**out, "promoted": promoted, "reason": reason, "outcome": "promoted" if promoted else "kept-champion"}
    if champion["format_error"] is not None:
        reason = (
            f"champion version {champion['version']} is not stored in the pickle-free format and is not loaded "
            f"({champion['format_error']}): champion kept (move the alias by hand to replace it)"
        )
        return {**out, "promoted": False, "reason": reason, "outcome": "kept-champion"}
    if not set(champion["class_names"] or []) <= set(holdout["class_names"]):
        reason = (
            f"champion version {champion['version']} predicts other classes than {data.dataset} and cannot be "
            "evaluated on this held-out split: champion kept (move the alias by hand, or use another model_name)"
        )
        return {**out, "promoted": False, "reason": reason, "outcome": "kept-champion"}
    out["champion_eval"] = evaluate_model_task(rt.tracking_uri, f"models:/{name}/{champion['version']}", data, device)
    promoted, reason = decide(out["challenger_eval"]["top1"], out["champion_eval"]["top1"], registry.promotion_margin)
    reason = f"{reason} (challenger v{challenger['version']} vs champion v{champion['version']})"
    if out["champion_eval"]["unknown_classes"]:  # the pool gained classes since the champion was trained
        reason += f"; the champion does not know {out['champion_eval']['unknown_classes']}: their images count as errors"
    return {**out, "promoted": promoted, "reason": reason, "outcome": "promoted" if promoted else "kept-champion"}


def _move_by_hand(rt: Any, name: str, registry: PromotionParams, to_version: str | None, lock: str) -> dict[str, Any]:
    """Rollback / move-to-version, inside the promotion lock: choose, check the format, move, record."""
    state = read_history_task(rt.tracking_uri, name)
    target, history = rollback_target(state["history"], to_version=to_version)
    info = describe_version_task(rt.tracking_uri, name, target)
    if info["format_error"] is not None:
        raise ValueError(f"{name} version {target} is not stored in the pickle-free format and cannot be champion: "
                         f"{info['format_error']}")  # fmt: skip
    before = None
    if state["champion"] is not None:
        before = describe_version_task(rt.tracking_uri, name, state["champion"])
    outcome = ROLLBACK_OUTCOMES[0] if to_version is None else ROLLBACK_OUTCOMES[1]
    how = "rolled back to the previous champion" if to_version is None else "moved to the version asked for"
    cas = move_champion_task(rt.tracking_uri, name, target, state["champion"], history)
    if not cas["moved"]:
        raise RuntimeError(f"{name}@champion was not moved: {cas['why_not']}")
    decision: dict[str, Any] = {
        "outcome": outcome, "promoted": True, "margin": registry.promotion_margin, "lock": lock,
        "reason": f"champion {how}: version {state['champion']} -> {target}",
        "challenger": info, "challenger_eval": None, "champion_before": before, "champion_eval": None,
        "champion_after": target, "holdout": None, "history": history,
        "decided_at": now_iso(), "flow_run_id": flow_run_info()["id"],
    }  # fmt: skip
    record_decision_task(rt.tracking_uri, name, decision)
    get_run_logger().info("%s: %s", name, decision["reason"])
    return decision
