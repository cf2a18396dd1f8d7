"""``training.init``: ``tasks.registry.resolve_init`` against the real registry picks the champion when it fits
(downloaded, loadable without pickle) and the base PVM otherwise, saying why."""

from __future__ import annotations

import uuid

import pytest

from flows.params import ModelParams
from tests.integration.test_promotion import DATA, _register, env, models  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_resolve_init_uses_a_fitting_champion_and_refuses_others(env, models, tmp_path):
    from flows.promote import promote
    from flows.params import RegistryParams
    from tasks.data import load_split
    from tasks.registry import resolve_init, run_architecture
    from vecaf.models.classifier import load_classifier

    name = f"vecaf-test-init-{uuid.uuid4().hex[:8]}"
    classes = list(load_split(DATA, DATA.train_split).class_names)
    dest = str(tmp_path / "champions")

    def resolve(init="champion", class_names=classes, mode="head", data=DATA):
        return resolve_init(env.mlflow_url, name, init, class_names=class_names, mode=mode, dest=dest,
                            **run_architecture(ModelParams(), data))

    first = resolve()
    assert first["used"] == "base" and "no champion yet" in first["reason"] and first["model_dir"] is None

    version = _register(env, name, models.dirs["good"], "good")
    promote(data=DATA, registry=RegistryParams(model_name=name), device="cpu")
    warm = resolve()
    assert warm["used"] == "champion" and warm["version"] == version, warm
    model, config = load_classifier(warm["model_dir"])
    assert config["class_names"] == classes and model.get_classifier().out_features == 10

    other = resolve(class_names=[*classes[:9], "owl"])
    assert other["used"] == "base" and "pool only: ['owl']" in other["reason"] and other["model_dir"] is None
    bigger = resolve(data=DATA.model_copy(update={"image_size": 64}))
    assert bigger["used"] == "base" and "takes inputs [3, 32, 32]" in bigger["reason"]
    assert resolve(init="base")["used"] == "base"
