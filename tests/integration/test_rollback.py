"""Rollback on the real stack: ``promote(rollback=True)`` / ``promote(to_version=N)`` move ``champion``
under the promotion lock, keep the champion history, and are recorded like a promotion.

Reuses the tiny registered classifiers of ``test_promotion`` (good > half > zero on the held-out split).
"""

from __future__ import annotations

import uuid

import pytest

from flows.params import RegistryParams
from tests.integration.test_promotion import DATA, EXPERIMENT, _champion, _register, models  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _promote(model_name: str, **kw) -> dict:
    from flows.promote import promote

    return promote(data=DATA, registry=RegistryParams(experiment=EXPERIMENT, model_name=model_name), device="cpu", **kw)


def _history(env, name: str) -> str:
    from tasks.tracking import mlflow_client

    return mlflow_client(env.mlflow_url).get_registered_model(name).tags.get("champion_history")


def _latest_artifact(env) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["promotion-decision"])),
            sort=ArtifactSort.CREATED_DESC, limit=1,
        )  # fmt: skip
    return found[0].data


def test_rollback_and_move_to_version(env, models):
    from tasks.tracking import mlflow_client

    name = f"vecaf-test-rollback-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ValueError, match="no champion yet"):
        _raise_no_model(env, name)
    zero = _register(env, name, models.dirs["zero"], "zero")
    assert _promote(name)["outcome"] == "promoted"
    with pytest.raises(ValueError, match=f"version {zero} is the only champion"):
        _promote(name, rollback=True)
    assert _champion(env, name) == zero
    half = _register(env, name, models.dirs["half"], "half")
    assert _promote(name)["outcome"] == "promoted"
    good = _register(env, name, models.dirs["good"], "good")
    assert _promote(name)["outcome"] == "promoted"
    assert _history(env, name) == f"{zero},{half},{good}"

    back = _promote(name, rollback=True)
    assert back["outcome"] == "rolled-back" and back["champion_after"] == half == _champion(env, name)
    assert back["champion_before"]["version"] == good and f"version {good} -> {half}" in back["reason"]
    assert _history(env, name) == f"{zero},{half}"
    client = mlflow_client(env.mlflow_url)
    tags = client.get_model_version(name, half).tags
    assert tags["promotion.decision"] == "rolled-back" and tags["promotion.champion_version"] == good
    assert tags["promotion.champion_after"] == half
    assert client.get_registered_model(name).tags["last_promotion"].startswith(f"v{half} rolled-back")
    markdown = _latest_artifact(env)
    assert "rolled-back" in markdown and f"| champion (now) | {half} |" in markdown

    assert _promote(name, rollback=True)["champion_after"] == zero == _champion(env, name)
    with pytest.raises(ValueError, match="no earlier champion"):
        _promote(name, rollback=True)

    moved = _promote(name, to_version=int(good))
    assert moved["outcome"] == "moved-to-version" and _champion(env, name) == good
    assert _history(env, name) == f"{zero},{good}"
    with pytest.raises(ValueError, match="already is the champion"):
        _promote(name, to_version=int(good))
    with pytest.raises(ValueError, match="has no version 999"):
        _promote(name, to_version=999)
    assert _champion(env, name) == good

    # a normal promotion after a rollback appends to the same history
    assert _promote(name, rollback=True)["champion_after"] == zero
    half2 = _register(env, name, models.dirs["half"], "half again")
    assert _promote(name)["outcome"] == "promoted"
    assert _history(env, name) == f"{zero},{half2}"


def _raise_no_model(env, name: str) -> None:
    """A registered model without any champion: a rollback is refused before anything moves."""
    from tasks.tracking import mlflow_client

    mlflow_client(env.mlflow_url).create_registered_model(name + "-empty")
    _promote(name + "-empty", rollback=True)
