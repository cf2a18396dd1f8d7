"""Model-registry tasks: register a version as ``challenger``, read aliases, promote, record the decision.

Registration happens only after the model's files are logged and found in the bucket
(``tasks.tracking.verify_model_artifacts``). It is all or nothing: the version is created, then tagged and
given the alias ``challenger``; if any of that fails the new version is deleted again before the error is
raised, so no version without its alias is left behind.

Promotion rule (``decide``): with held-out top-1 accuracies a (challenger) and c (champion), recomputed by
the promote flow, the challenger becomes ``champion`` when there is no champion yet, or when
a - c > margin (a gain within 1e-9 of the margin counts as equal: float rounding). Otherwise the champion
stays. The decision is recorded as tags ``promotion.*`` on the challenger version, a registered-model tag
``last_promotion``, and a Prefect markdown artifact.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from prefect import get_run_logger, task

from tasks.tracking import SERVER_TASK, mlflow_client, talking_to

_MISSING = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")
_TOLERANCE = 1e-9
"""Accuracies are fractions k/n: a gain within this of the margin counts as equal to it (float rounding)."""
CHALLENGER = "challenger"
CHAMPION = "champion"


def _already_exists(exc: Exception) -> bool:
    code = getattr(exc, "error_code", "")
    return code in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")


def register_model(
    tracking_uri: str,
    name: str,
    *,
    model_uri: str,
    model_id: str,
    run_id: str,
    tags: Mapping[str, str],
    alias: str = CHALLENGER,
) -> dict[str, Any]:
    """Create a version of registered model ``name`` from a logged model, tag it and point ``alias`` at it.

    Returns:
        ``{"name", "version", "alias", "source"}``.
    """
    from mlflow.exceptions import MlflowException

    with talking_to("MLflow tracking server", tracking_uri):
        client = mlflow_client(tracking_uri)
        try:
            client.create_registered_model(name, description="VeCAF finetuned classifier (vecaf-pipeline).")
        except MlflowException as exc:
            if not _already_exists(exc):
                raise
        version = client.create_model_version(
            name, source=model_uri, run_id=run_id, tags={k: str(v) for k, v in tags.items()}, model_id=model_id
        )
        try:
            client.set_registered_model_alias(name, alias, version.version)
        except BaseException:
            try:
                client.delete_model_version(name, version.version)
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
            raise
    return {"name": name, "version": str(version.version), "alias": alias, "source": model_uri}


def read_aliases(tracking_uri: str, name: str) -> dict[str, Any]:
    """The versions behind ``challenger`` and ``champion`` (None when unset) with their tags and run ids.

    Returns:
        ``{"name", "challenger": {"version", "run_id", "tags", "source", "class_names"} | None,
        "champion": ... | None}`` (``class_names`` from the model's metadata, None when it has none).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.models import get_model_info

    out: dict[str, Any] = {"name": name, CHALLENGER: None, CHAMPION: None}
    with talking_to("MLflow tracking server", tracking_uri):
        client = mlflow_client(tracking_uri)
        for alias in (CHALLENGER, CHAMPION):
            try:
                mv = client.get_model_version_by_alias(name, alias)
            except MlflowException as exc:
                if getattr(exc, "error_code", "") in _MISSING:
                    continue
                raise
            meta = get_model_info(f"models:/{name}/{mv.version}").metadata or {}
            out[alias] = {
                "version": str(mv.version),
                "run_id": mv.run_id,
                "tags": dict(mv.tags),
                "source": mv.source,
                "class_names": meta.get("class_names"),
            }
    return out


def decide(challenger_top1: float, champion_top1: float | None, margin: float) -> tuple[bool, str]:
    """The promotion rule: promote when there is no champion, or when a - c > margin.

    Args:
        challenger_top1: a, the challenger's held-out top-1.
        champion_top1: c, the champion's, or None when there is no champion.
        margin: the required improvement (>= 0).

    Returns:
        ``(promote, reason)``.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if champion_top1 is None:
        return True, "first model: no champion yet"
    gain = challenger_top1 - champion_top1
    if gain > margin + _TOLERANCE:
        return True, f"challenger beats champion by {gain:+.4f} > margin {margin:.4f}"
    return False, f"challenger gains {gain:+.4f}, not more than margin {margin:.4f}: champion kept"


def set_champion(tracking_uri: str, name: str, version: str) -> None:
    """Point alias ``champion`` at ``version``."""
    with talking_to("MLflow tracking server", tracking_uri):
        mlflow_client(tracking_uri).set_registered_model_alias(name, CHAMPION, version)


def record_decision(tracking_uri: str, name: str, decision: Mapping[str, Any]) -> str:
    """Tag the challenger version and the registered model with the decision; publish a Prefect artifact.

    Args:
        tracking_uri: the MLflow server.
        name: the registered model.
        decision: the promote flow's decision (``challenger``, ``champion_before``, ``champion_after``,
            ``promoted``, ``reason``, ``margin``, the two evaluations).

    Returns:
        The markdown recorded.
    """
    challenger = decision["challenger"]
    before = decision.get("champion_before")
    champion_eval = decision.get("champion_eval")
    tags = {
        "promotion.decision": "promoted" if decision["promoted"] else "kept-champion",
        "promotion.reason": decision["reason"],
        "promotion.margin": f"{decision['margin']:.4f}",
        "promotion.challenger_top1": f"{decision['challenger_eval']['top1']:.6f}",
        "promotion.champion_version": "none" if before is None else before["version"],
        "promotion.champion_top1": "none" if champion_eval is None else f"{champion_eval['top1']:.6f}",
        "promotion.holdout_images": str(decision["challenger_eval"]["n"]),
        "promotion.decided_at": decision["decided_at"],
        "promotion.prefect_flow_run": str(decision.get("flow_run_id")),
    }
    with talking_to("MLflow tracking server", tracking_uri):
        client = mlflow_client(tracking_uri)
        for key, value in tags.items():
            client.set_model_version_tag(name, challenger["version"], key, value)
        client.set_registered_model_tag(
            name, "last_promotion", f"v{challenger['version']} {tags['promotion.decision']} at {decision['decided_at']}"
        )
    markdown = promotion_markdown(name, decision)
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=markdown, key="promotion-decision", description=f"Promotion of {name}")
    return markdown


def promotion_markdown(name: str, decision: Mapping[str, Any]) -> str:
    """The decision as a markdown report."""
    ch, ce = decision["challenger"], decision["challenger_eval"]
    before, be = decision.get("champion_before"), decision.get("champion_eval")
    after = decision["champion_after"]
    rows = [
        "| | version | held-out top-1 | held-out loss |",
        "|---|---|---|---|",
        f"| challenger | {ch['version']} | {ce['top1']:.4f} | {ce['loss']:.4f} |",
    ]
    if before is not None and be is not None:
        rows.append(f"| champion (before) | {before['version']} | {be['top1']:.4f} | {be['loss']:.4f} |")
    verdict = "**promoted**" if decision["promoted"] else "**not promoted**"
    return "\n".join(
        [
            f"# Promotion of `{name}`: {verdict}",
            "",
            f"{decision['reason']}. Margin {decision['margin']:.4f}; both models re-evaluated on the same "
            f"{ce['n']} held-out images.",
            "",
            *rows,
            "",
            f"`champion` now points at version {after}.",
        ]
    )


def now_iso() -> str:
    """The current UTC time, ISO 8601."""
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


@task(name="register-model", **SERVER_TASK)
def register_model_task(
    tracking_uri: str, name: str, model_uri: str, model_id: str, run_id: str, tags: dict[str, str]
) -> dict[str, Any]:
    """Prefect task around :func:`register_model` (alias ``challenger``)."""
    out = register_model(tracking_uri, name, model_uri=model_uri, model_id=model_id, run_id=run_id, tags=tags)
    get_run_logger().info("registered %s version %s as @%s", name, out["version"], out["alias"])
    return out


@task(name="read-model-aliases", **SERVER_TASK)
def read_aliases_task(tracking_uri: str, name: str) -> dict[str, Any]:
    """Prefect task around :func:`read_aliases`."""
    return read_aliases(tracking_uri, name)


@task(name="promote-champion", **SERVER_TASK)
def set_champion_task(tracking_uri: str, name: str, version: str) -> None:
    """Prefect task around :func:`set_champion`."""
    set_champion(tracking_uri, name, version)
    get_run_logger().info("%s@champion -> version %s", name, version)


@task(name="record-promotion", **SERVER_TASK)
def record_decision_task(tracking_uri: str, name: str, decision: dict[str, Any]) -> str:
    """Prefect task around :func:`record_decision`."""
    return record_decision(tracking_uri, name, decision)
