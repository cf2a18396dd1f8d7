"""``training.init``: ``tasks.registry.resolve_init`` against the real registry picks the champion when it fits
(downloaded, loadable without pickle) and the base PVM otherwise, saying why; a warm-started run selects
loop 1 with the champion's losses."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from flows.params import ModelParams
from tests.integration.test_promotion import DATA, _register, models  # noqa: F401

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


def test_a_warm_start_selects_with_the_champions_losses(models):
    """``tasks.training._start_model`` with a champion folder: loop 1's losses are the champion's, and the
    run starts at the champion's accuracy (the base PVM's fresh head starts near chance)."""
    from types import SimpleNamespace

    import torch

    from tasks.data import load_split
    from tasks.training import _start_model
    from vecaf.models import embed, load_pvm
    from vecaf.train import finetune

    pvm = load_pvm()
    pool, test = load_split(DATA, DATA.train_split), load_split(DATA, DATA.test_split)
    px = embed(pvm, pool, image_size=DATA.image_size, device="cpu", progress=False)
    tx = embed(pvm, test, image_size=DATA.image_size, device="cpu", progress=False)
    py, ty = np.asarray(pool.labels), np.asarray(test.labels)
    spec = SimpleNamespace(init_model=str(models.dirs["good"]), training=SimpleNamespace(mode="head"),
                           data=SimpleNamespace(image_size=DATA.image_size))  # fmt: skip
    model, start = _start_model(spec, {"pvm": pvm, "train_features": None})
    run = dict(mode="head", method="topk_loss", budget=10, loops=2, batch_budget=4, lr=5e-4, device="cpu")
    warm = finetune(model, (px, py), (tx, ty), **run, **start)
    head = model.get_classifier()
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(
            torch.from_numpy(px) @ head.weight.T + head.bias, torch.from_numpy(py), reduction="none"
        ).numpy()
    np.testing.assert_allclose(warm.loops[0].pick_losses, losses[warm.loops[0].picks], rtol=1e-4, atol=1e-4)
    base = finetune(None, (px, py), (tx, ty), **run)
    assert warm.curve[0].top1 == pytest.approx(models.top1["good"], abs=0.0051)
    assert warm.curve[0].top1 > base.curve[0].top1 + 0.3
