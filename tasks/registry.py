"""Model-registry tasks: register a version as ``challenger``, read aliases, promote, record the decision.

Registration happens only after the model's files are logged and listed by MLflow
(``tasks.tracking.verify_model_artifacts``). It is all or nothing: the version is created, then tagged and
given the alias ``challenger``; if any of that fails the new version is deleted again before the error is
raised, so no version without its alias is left behind.

Promotion rule (``decide``): with held-out top-1 accuracies a (challenger) and c (champion), recomputed by
the promote flow, the challenger becomes ``champion`` when there is no champion yet, or when
a - c > margin (a gain within 1e-9 of the margin counts as equal: float rounding). Otherwise the champion
stays. The decision is recorded as tags ``promotion.*`` on the challenger version (naming the versions
actually compared), a registered-model tag ``last_promotion``, and a Prefect markdown artifact.

Promotion is a compare-and-set. One promotion per registered model at a time (:func:`promotion_lock`, a
Prefect global concurrency limit ``vecaf-promote-<name>`` with one slot); inside it the aliases are read,
the models evaluated, and right before ``champion`` moves the aliases are read again
(:func:`promote_if_unchanged`): if ``challenger`` or ``champion`` changed meanwhile, nothing moves and the
decision says "refused-changed" with the versions before and now (the next promotion evaluates the new
ones). A version not stored in the pipeline's pickle-free format is never loaded ("refused-format").

Champion history and rollback. Every move of ``champion`` made here appends the new version to the
registered-model tag ``champion_history`` (versions, oldest first, comma-separated; a champion set before
the tag existed counts as its first entry). ``vecaf promote --rollback`` points ``champion`` back at the
entry before the current one and drops the current one from the history (so rolling back twice goes two
steps back); ``--to-version N`` points it at version N and appends N. Both run under the same promotion
lock, as a compare-and-set, and are recorded like a promotion (``promotion.*`` tags on the version that
becomes champion with decision "rolled-back" or "moved-to-version", ``last_promotion``, the artifact).
The choice of the version is :func:`rollback_target` (pure).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator, Mapping
from typing import Any

from prefect import get_run_logger, task

from tasks.tracking import SERVER_TASK, mlflow_client, talking_to

_MISSING = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")
_TOLERANCE = 1e-9
"""Accuracies are fractions k/n: a gain within this of the margin counts as equal to it (float rounding)."""
CHALLENGER = "challenger"
CHAMPION = "champion"
HISTORY_TAG = "champion_history"
"""Registered-model tag: the versions ``champion`` pointed at, oldest first, comma-separated."""
PROMOTION_LOCK_TIMEOUT_S = 1800.0
"""How long a promotion waits for another promotion of the same model before it fails."""
_LEASE_S = 120.0
"""Lease of the promotion slot: renewed every 90 s while held; a crashed holder frees it within 2 min."""


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

    Each version's storage format is checked (``tasks.tracking.check_stored_model``: MLflow's file listing and
    the MLmodel YAML only, nothing deserialized); ``format_error`` says why a version may not be loaded.

    Returns:
        ``{"name", "challenger": {"version", "run_id", "model_id", "tags", "source", "class_names",
        "format_error"} | None, "champion": ... | None}`` (``class_names`` from the model's metadata, None
        when it has none or is not in the pipeline's format; ``format_error`` None when it is).
    """
    from mlflow.exceptions import MlflowException

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
            out[alias] = _version_info(tracking_uri, name, mv)
    return out


def _version_info(tracking_uri: str, name: str, mv: Any) -> dict[str, Any]:
    """A model version as ``read_aliases`` describes it (its storage format checked, nothing loaded)."""
    from tasks.tracking import UnsafeModelError, check_stored_model, resolve_model_id

    meta: dict[str, Any] = {}
    format_error = None
    model_id = getattr(mv, "model_id", None)
    try:
        model_id = resolve_model_id(tracking_uri, f"models:/{name}/{mv.version}")
        meta = check_stored_model(tracking_uri, model_id)["metadata"]
    except UnsafeModelError as exc:
        format_error = str(exc)
    return {
        "version": str(mv.version),
        "run_id": mv.run_id,
        "model_id": model_id,
        "tags": dict(mv.tags),
        "source": mv.source,
        "class_names": meta.get("class_names"),
        "format_error": format_error,
    }


def describe_version(tracking_uri: str, name: str, version: str) -> dict[str, Any]:
    """Version ``version`` of ``name`` as :func:`read_aliases` describes one.

    Raises:
        ValueError: the version does not exist (named).
    """
    from mlflow.exceptions import MlflowException

    with talking_to("MLflow tracking server", tracking_uri):
        client = mlflow_client(tracking_uri)
        try:
            mv = client.get_model_version(name, str(version))
        except MlflowException as exc:
            if getattr(exc, "error_code", "") in _MISSING:
                raise ValueError(f"{name} has no version {version}") from exc
            raise
        return _version_info(tracking_uri, name, mv)


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


def promotion_lock_name(name: str) -> str:
    """The Prefect global concurrency limit that serialises promotions of registered model ``name``."""
    return f"vecaf-promote-{name}"


@contextlib.contextmanager
def promotion_lock(name: str, *, timeout_s: float = PROMOTION_LOCK_TIMEOUT_S) -> Iterator[str]:
    """Hold the one slot of the global concurrency limit ``vecaf-promote-<name>`` (created when missing).

    Prefect's ``concurrency()`` skips a limit that does not exist unless ``strict=True``; the limit is
    therefore created first (limit 1; a concurrent creation is fine) and taken strictly. The slot is a
    Prefect lease (renewed while held, expiring ``lease_duration`` after a crashed holder stopped renewing
    it), so a killed promotion does not block the next ones for good. It works wherever the Prefect API
    does: the server of the stack, or the in-process ephemeral server when no ``PREFECT_API_URL`` is set
    (then it only serialises promotions within that process).

    Raises:
        TimeoutError: another promotion held the lock for more than ``timeout_s`` seconds (named).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    limit = promotion_lock_name(name)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(limit)
        except Exception:  # noqa: BLE001 - ObjectNotFound, created below
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
            except ObjectAlreadyExists:
                pass
    try:
        with concurrency(limit, occupy=1, timeout_seconds=timeout_s, strict=True, lease_duration=_LEASE_S):
            yield limit
    except TimeoutError as exc:
        raise TimeoutError(
            f"another promotion of {name} held the lock {limit!r} (a Prefect global concurrency limit) for more "
            f"than {timeout_s:.0f} s; see Prefect's Concurrency page, or try again later"
        ) from exc


def promote_if_unchanged(
    tracking_uri: str, name: str, *, challenger: str, champion: str | None
) -> tuple[bool, str | None]:
    """Compare-and-set: point ``champion`` at version ``challenger`` only if both aliases are as evaluated.

    The aliases are re-read right before the alias moves. MLflow has no atomic alias update, so this is a
    check-then-set: it is exact against other promotions (they hold :func:`promotion_lock`), and it catches
    a ``challenger`` moved by a new registration (or an alias moved by hand) while the models were evaluated.

    Args:
        tracking_uri: the MLflow server.
        name: the registered model.
        challenger: the version that was evaluated as the challenger.
        champion: the version that was evaluated as the champion (None: there was none).

    Returns:
        ``(moved, why_not)``: ``why_not`` names the alias that changed and its versions before and now.
    """
    from mlflow.exceptions import MlflowException

    with talking_to("MLflow tracking server", tracking_uri):
        client = mlflow_client(tracking_uri)
        now: dict[str, str | None] = {}
        for alias in (CHALLENGER, CHAMPION):
            try:
                now[alias] = str(client.get_model_version_by_alias(name, alias).version)
            except MlflowException as exc:
                if getattr(exc, "error_code", "") not in _MISSING:
                    raise
                now[alias] = None
        changed = [
            f"{alias} moved from version {was} to {now[alias]} during the evaluation"
            for alias, was in ((CHALLENGER, challenger), (CHAMPION, champion))
            if now[alias] != was
        ]
        if changed:
            return False, "; ".join(changed)
        history = parse_history(dict(client.get_registered_model(name).tags).get(HISTORY_TAG), champion)
        client.set_registered_model_alias(name, CHAMPION, challenger)
        client.set_registered_model_tag(name, HISTORY_TAG, format_history([*history, challenger]))
    return True, None


def parse_history(tag: str | None, champion: str | None) -> list[str]:
    """The champion history from the ``champion_history`` tag, consistent with the current champion.

    A champion that is not the history's last entry (set before the tag existed, or moved by hand) is
    appended, so the history always ends with the current champion (when there is one).
    """
    history = [v.strip() for v in (tag or "").split(",") if v.strip()]
    if champion is not None and (not history or history[-1] != champion):
        history.append(champion)
    return history


def format_history(history: list[str]) -> str:
    """The ``champion_history`` tag value (MLflow tag values hold up to 5000 characters: the oldest go first)."""
    text = ",".join(history)
    while len(text) > 5000 and "," in text:
        text = text.split(",", 1)[1]
    return text


def rollback_target(history: list[str], *, to_version: str | None = None) -> tuple[str, list[str]]:
    """Which version ``champion`` moves to, and the history afterwards.

    Args:
        history: the champion history, oldest first, ending with the current champion.
        to_version: move to this version (appended to the history); None: roll back to the entry before the
            current champion (the current one is dropped from the history).

    Returns:
        ``(target, new_history)``.

    Raises:
        ValueError: no champion; a rollback with no earlier champion; ``to_version`` already the champion.
    """
    if not history:
        raise ValueError("there is no champion yet: nothing to roll back (promote a version first)")
    current = history[-1]
    if to_version is not None:
        to_version = str(to_version)
        if to_version == current:
            raise ValueError(f"version {to_version} already is the champion")
        return to_version, [*history, to_version]
    earlier = [v for v in history[:-1] if v != current]
    if not earlier:
        raise ValueError(
            f"version {current} is the only champion there has been: there is no earlier champion to roll back "
            "to (use --to-version N to pick a version)"
        )
    trimmed = list(history[:-1])
    while trimmed and trimmed[-1] == current:
        trimmed.pop()
    return trimmed[-1], trimmed


def read_history(tracking_uri: str, name: str) -> dict[str, Any]:
    """``{"champion": version | None, "history": [...]}`` of registered model ``name``."""
    from mlflow.exceptions import MlflowException

    with talking_to("MLflow tracking server", tracking_uri):
        client = mlflow_client(tracking_uri)
        tags = dict(client.get_registered_model(name).tags)
        try:
            champion: str | None = str(client.get_model_version_by_alias(name, CHAMPION).version)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") not in _MISSING:
                raise
            champion = None
    return {"champion": champion, "history": parse_history(tags.get(HISTORY_TAG), champion)}


def move_champion(
    tracking_uri: str, name: str, *, target: str, expected: str | None, history: list[str]
) -> tuple[bool, str | None]:
    """Compare-and-set of ``champion`` alone: point it at ``target`` only if it still points at ``expected``,
    then write ``history`` to the ``champion_history`` tag.

    Returns:
        ``(moved, why_not)``.
    """
    from mlflow.exceptions import MlflowException

    with talking_to("MLflow tracking server", tracking_uri):
        client = mlflow_client(tracking_uri)
        try:
            now: str | None = str(client.get_model_version_by_alias(name, CHAMPION).version)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") not in _MISSING:
                raise
            now = None
        if now != expected:
            return False, f"champion moved from version {expected} to {now} meanwhile"
        client.set_registered_model_alias(name, CHAMPION, target)
        client.set_registered_model_tag(name, HISTORY_TAG, format_history(history))
    return True, None


ROLLBACK_OUTCOMES = ("rolled-back", "moved-to-version")
"""Outcomes of a hand-made move of ``champion`` (``vecaf promote --rollback`` / ``--to-version``)."""


def _outcome(decision: Mapping[str, Any]) -> str:
    """promoted, kept-champion, refused-changed, refused-format, rolled-back or moved-to-version (older
    decisions have only ``promoted``)."""
    return decision.get("outcome") or ("promoted" if decision["promoted"] else "kept-champion")


def _top1(evaluation: Mapping[str, Any] | None) -> str:
    return "not evaluated" if evaluation is None else f"{evaluation['top1']:.6f}"


def record_decision(tracking_uri: str, name: str, decision: Mapping[str, Any]) -> str:
    """Tag the challenger version and the registered model with the decision; publish a Prefect artifact.

    The tags name the versions actually compared (``promotion.challenger_version``,
    ``promotion.champion_version``) and what each scored on the held-out split ("not evaluated" when a model
    was not loaded, e.g. refused for its format).

    Args:
        tracking_uri: the MLflow server.
        name: the registered model.
        decision: the promote flow's decision (``outcome``, ``challenger``, ``champion_before``,
            ``champion_after``, ``promoted``, ``reason``, ``margin``, the two evaluations or None).

    Returns:
        The markdown recorded.
    """
    challenger = decision["challenger"]
    before = decision.get("champion_before")
    challenger_eval, champion_eval = decision.get("challenger_eval"), decision.get("champion_eval")
    tags = {
        "promotion.decision": _outcome(decision),
        "promotion.reason": decision["reason"][:5000],
        "promotion.margin": f"{decision['margin']:.4f}",
        "promotion.challenger_version": challenger["version"],
        "promotion.challenger_top1": _top1(challenger_eval),
        "promotion.champion_version": "none" if before is None else before["version"],
        "promotion.champion_top1": _top1(champion_eval),
        "promotion.champion_after": "none" if decision.get("champion_after") is None else decision["champion_after"],
        "promotion.holdout_images": "none" if challenger_eval is None else str(challenger_eval["n"]),
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
    markdown = (
        rollback_markdown(name, decision) if _outcome(decision) in ROLLBACK_OUTCOMES else promotion_markdown(name, decision)
    )
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=markdown, key="promotion-decision", description=f"Promotion of {name}")
    return markdown


def promotion_markdown(name: str, decision: Mapping[str, Any]) -> str:
    """The decision as a markdown report (it says which models were re-evaluated, and on how many images)."""
    ch, ce = decision["challenger"], decision.get("challenger_eval")
    before, be = decision.get("champion_before"), decision.get("champion_eval")
    after = decision["champion_after"]

    def row(role: str, version: str, evaluation: Mapping[str, Any] | None) -> str:
        if evaluation is None:
            return f"| {role} | {version} | not evaluated | not evaluated |"
        return f"| {role} | {version} | {evaluation['top1']:.4f} | {evaluation['loss']:.4f} |"

    rows = ["| | version | held-out top-1 | held-out loss |", "|---|---|---|---|", row("challenger", ch["version"], ce)]
    if before is not None:
        rows.append(row("champion (before)", before["version"], be))
    evaluated = [who for who, e in (("challenger", ce), ("champion", be)) if e is not None]
    if len(evaluated) == 2:
        how = f"both models re-evaluated on the same {ce['n']} held-out images."
    elif evaluated:
        n = (ce or be)["n"]
        how = f"only the {evaluated[0]} re-evaluated, on {n} held-out images."
    else:
        how = "no model evaluated."
    verdict = "**promoted**" if decision["promoted"] else "**not promoted**"
    return "\n".join(
        [
            f"# Promotion of `{name}`: {verdict} ({_outcome(decision)})",
            "",
            f"{decision['reason']}. Margin {decision['margin']:.4f}; {how}",
            "",
            *rows,
            "",
            f"`champion` now points at version {after}.",
        ]
    )


def rollback_markdown(name: str, decision: Mapping[str, Any]) -> str:
    """A rollback / move-to-version as a markdown report (no model is evaluated: the move was asked for)."""
    before = decision.get("champion_before")
    history = decision.get("history") or []
    return "\n".join(
        [
            f"# Champion of `{name}` moved by hand ({_outcome(decision)})",
            "",
            f"{decision['reason']}.",
            "",
            "| | version |",
            "|---|---|",
            f"| champion (before) | {'none' if before is None else before['version']} |",
            f"| champion (now) | {decision['champion_after']} |",
            "",
            f"Champion history (oldest first): {', '.join(history) or 'none'}.",
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
def promote_if_unchanged_task(
    tracking_uri: str, name: str, challenger: str, champion: str | None
) -> dict[str, Any]:
    """Prefect task around :func:`promote_if_unchanged`: ``{"moved", "why_not"}``."""
    moved, why_not = promote_if_unchanged(tracking_uri, name, challenger=challenger, champion=champion)
    if moved:
        get_run_logger().info("%s@champion -> version %s (was %s)", name, challenger, champion)
    else:
        get_run_logger().warning("%s@champion not moved: %s", name, why_not)
    return {"moved": moved, "why_not": why_not}


@task(name="record-promotion", **SERVER_TASK)
def record_decision_task(tracking_uri: str, name: str, decision: dict[str, Any]) -> str:
    """Prefect task around :func:`record_decision`."""
    return record_decision(tracking_uri, name, decision)


@task(name="read-champion-history", **SERVER_TASK)
def read_history_task(tracking_uri: str, name: str) -> dict[str, Any]:
    """Prefect task around :func:`read_history`."""
    return read_history(tracking_uri, name)


@task(name="move-champion", **SERVER_TASK)
def move_champion_task(
    tracking_uri: str, name: str, target: str, expected: str | None, history: list[str]
) -> dict[str, Any]:
    """Prefect task around :func:`move_champion`: ``{"moved", "why_not"}``."""
    moved, why_not = move_champion(tracking_uri, name, target=target, expected=expected, history=history)
    if moved:
        get_run_logger().info("%s@champion -> version %s (was %s), by hand", name, target, expected)
    else:
        get_run_logger().warning("%s@champion not moved: %s", name, why_not)
    return {"moved": moved, "why_not": why_not}


@task(name="describe-model-version", **SERVER_TASK)
def describe_version_task(tracking_uri: str, name: str, version: str) -> dict[str, Any]:
    """Prefect task around :func:`describe_version`."""
    return describe_version(tracking_uri, name, version)


def resolve_init(
    tracking_uri: str,
    name: str,
    init: str,
    *,
    class_names: list[str],
    arch: str,
    pvm: str,
    mode: str,
    input_size: list[int] | None,
    dest: str,
) -> dict[str, Any]:
    """Where a run starts (``training.init``): the champion of ``name`` when it fits, else the base PVM.

    The champion is read with :func:`read_aliases` (its storage format checked, nothing deserialized); when
    it is in the pipeline's format its ``config.json`` and weights are downloaded into ``dest/v<version>``
    and :func:`vecaf.train.warm_start.choose_init` decides from the configuration.

    Returns:
        ``{"used": "champion" | "base", "reason", "version": champion version or None,
        "model_dir": the downloaded champion folder when used, else None, "model_id" and "artifact_uri": the
        champion's logged model and where its files are, when used (a task whose cache lost ``model_dir``
        downloads it again from there)}``.
    """
    from pathlib import Path

    from vecaf.models.classifier import CONFIG_FILE, WEIGHTS_FILE
    from vecaf.train.warm_start import choose_init

    facts = dict(class_names=class_names, arch=arch, pvm=pvm, mode=mode, input_size=input_size)
    if init == "base":
        choice = choose_init(init, None, **facts)
        return {"used": choice.used, "reason": choice.reason, "version": None, "model_dir": None,
                "model_id": None, "artifact_uri": None}  # fmt: skip
    champion = read_aliases(tracking_uri, name)[CHAMPION]  # a model never registered: no champion
    if champion is None or champion["format_error"] is not None:
        error = None if champion is None else champion["format_error"]
        version = None if champion is None else champion["version"]
        choice = choose_init(init, None, champion_error=error, champion_version=version, **facts)
        return {"used": choice.used, "reason": choice.reason, "version": version, "model_dir": None,
                "model_id": None, "artifact_uri": None}  # fmt: skip
    import mlflow.artifacts

    from tasks.tracking import check_stored_model

    stored = check_stored_model(tracking_uri, champion["model_id"])
    folder = Path(dest) / f"v{champion['version']}"
    folder.mkdir(parents=True, exist_ok=True)
    with talking_to("MLflow tracking server", tracking_uri):
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"{stored['artifact_uri'].rstrip('/')}/{CONFIG_FILE}", dst_path=str(folder),
            tracking_uri=tracking_uri,
        )  # fmt: skip
    import json

    config = json.loads((folder / CONFIG_FILE).read_text())
    choice = choose_init(init, config, champion_version=champion["version"], **facts)
    if choice.warm:
        with talking_to("MLflow tracking server", tracking_uri):
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{stored['artifact_uri'].rstrip('/')}/{WEIGHTS_FILE}", dst_path=str(folder),
                tracking_uri=tracking_uri,
            )  # fmt: skip
    return {
        "used": choice.used, "reason": choice.reason, "version": champion["version"],
        "model_dir": str(folder) if choice.warm else None,
        "model_id": champion["model_id"] if choice.warm else None,
        "artifact_uri": stored["artifact_uri"] if choice.warm else None,
    }  # fmt: skip


def run_architecture(models: Any, data: Any, *, allow_hub: bool = False) -> dict[str, Any]:
    """``{"arch", "pvm", "input_size"}`` of the network a run with these ``ModelParams``/``DataParams`` trains
    (what :func:`resolve_init` compares a champion with)."""
    from tasks.embeddings import get_pvm

    pvm = get_pvm(models.pvm, models.pvm_checkpoint, allow_hub)
    size = pvm.transform(image_size=data.image_size).data_config["input_size"]
    return {"arch": pvm.arch, "pvm": str(pvm.name), "input_size": [int(v) for v in size]}


@task(name="resolve-init", **SERVER_TASK)
def resolve_init_task(
    tracking_uri: str, name: str, init: str, mode: str, class_names: list[str], models: Any, data: Any, dest: str
) -> dict[str, Any]:
    """Prefect task around :func:`resolve_init` for the run's network (:func:`run_architecture`); logs the
    choice and why."""
    out = resolve_init(tracking_uri, name, init, class_names=list(class_names), mode=mode, dest=dest,
                       **run_architecture(models, data))  # fmt: skip
    get_run_logger().info("training starts from the %s: %s", out["used"], out["reason"])
    return out
