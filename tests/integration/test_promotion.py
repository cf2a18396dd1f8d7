"""Promotion on the real stack: a compare-and-set under a lock, and never a pickle loaded.

Versions of known quality are registered without training: EfficientNet-Lite0 (embedded weights) with a
nearest-class-mean head fitted on 300 digits ("good"), the same head blind to half of the classes ("half"),
and a head that always answers class 0 ("zero"). Their held-out top-1 on the promote flow's split is
measured here first, from the saved files, so the tests know the order they must respect.

- Two promotions run concurrently (threads), 2 s apart, with ``challenger`` moved in between: the champion
  never gets worse, and the decisions form one chain (each names the champion the previous one left).
- A challenger moved while the champion was being evaluated: nothing moves; the decision says which alias
  moved, from which version to which.
- A registered model whose file is a malicious pickle: the promotion refuses it by its format, the pickle's
  payload (creating a marker file) never runs, and the decision says why.
"""

from __future__ import annotations

import contextvars
import copy
import json
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from flows.params import DataParams, RegistryParams

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATA = DataParams(dataset="digits", pool_size=300, test_size=200, image_size=32, shard_size=250)
EXPERIMENT = "vecaf-test-promotion"


def _top1(model, dataset, data_config) -> float:
    from tasks.training import _predict
    from vecaf.models.pvm import PVMTransform

    logits = _predict(model, dataset, PVMTransform(data_config), device="cpu", batch_size=100)
    return float((logits.argmax(1) == np.asarray(dataset.labels)).mean())


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> SimpleNamespace:
    """Three classifiers saved with ``save_classifier`` and their held-out top-1: good > half > zero."""
    import torch

    from tasks.data import load_split
    from vecaf.models import embed, load_pvm
    from vecaf.models.classifier import classifier_config, load_classifier, save_classifier

    pvm = load_pvm("efficientnet_lite0")
    pool, holdout = load_split(DATA, DATA.train_split), load_split(DATA, DATA.test_split)
    e = torch.from_numpy(embed(pvm, pool, image_size=DATA.image_size, device="cpu", progress=False))
    y = torch.as_tensor(np.asarray(pool.labels))
    means = torch.stack([e[y == c].mean(0) for c in range(pool.num_classes)])
    heads = {
        "good": (means, -0.5 * (means**2).sum(1)),
        "half": (means, -0.5 * (means**2).sum(1) - 1e4 * (torch.arange(pool.num_classes) >= 5)),
        "zero": (torch.zeros_like(means), torch.eye(pool.num_classes)[0]),
    }
    root = tmp_path_factory.mktemp("promotion-models")
    out = SimpleNamespace(dirs={}, top1={})
    for name, (weight, bias) in heads.items():
        net = copy.deepcopy(pvm.model).cpu()
        net.reset_classifier(pool.num_classes)
        with torch.no_grad():
            net.get_classifier().weight.copy_(weight)
            net.get_classifier().bias.copy_(bias)
        config = classifier_config(pvm, net, class_names=pool.class_names, mode="head", image_size=DATA.image_size)
        save_classifier(net, config, root / name)
        loaded, config = load_classifier(root / name)
        out.dirs[name] = root / name
        out.top1[name] = _top1(loaded, holdout, config["data_config"])
    assert out.top1["good"] > out.top1["half"] + 0.2 > out.top1["zero"] + 0.2, out.top1
    return out


def _register(env, model_name: str, folder: Path, label: str) -> str:
    """Log ``folder`` as a logged model of a new run and register it as ``challenger``; the version."""
    from tasks.registry import register_model
    from tasks.tracking import log_model, mlflow_client

    client = mlflow_client(env.mlflow_url)
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
    run = client.create_run(exp_id, run_name=label)
    config = json.loads((folder / "config.json").read_text())
    metadata = {"class_names": config["class_names"], "data_config": config["data_config"], "label": label}
    logged = log_model(env.mlflow_url, run.info.run_id, str(folder), metadata=metadata, final_metrics={})
    client.set_terminated(run.info.run_id)
    out = register_model(env.mlflow_url, model_name, model_uri=logged["model_uri"], model_id=logged["model_id"],
                         run_id=run.info.run_id, tags={"label": label})  # fmt: skip
    return out["version"]


def _champion(env, model_name: str) -> str:
    from tasks.tracking import mlflow_client

    return str(mlflow_client(env.mlflow_url).get_model_version_by_alias(model_name, "champion").version)


def _promote(model_name: str) -> dict:
    from flows.promote import promote

    return promote(data=DATA, registry=RegistryParams(experiment=EXPERIMENT, model_name=model_name), device="cpu")


def test_concurrent_promotions_never_make_the_champion_worse(env, models):
    from tasks.tracking import mlflow_client

    name = f"vecaf-test-race-{uuid.uuid4().hex[:8]}"
    zero = _register(env, name, models.dirs["zero"], "zero")
    assert _promote(name)["outcome"] == "promoted"  # the first model
    half = _register(env, name, models.dirs["half"], "half")
    quality = {zero: models.top1["zero"], half: models.top1["half"]}

    decisions: dict[str, dict] = {}
    errors: list[BaseException] = []

    def run(label: str) -> None:
        try:
            decisions[label] = _promote(name)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    # Each thread runs in a copy of this context: Prefect's settings (the stack's API URL) are context variables.
    first = threading.Thread(target=contextvars.copy_context().run, args=(run, "first"))
    first.start()
    time.sleep(2.0)
    good = _register(env, name, models.dirs["good"], "good")  # challenger moves between the two runs
    quality[good] = models.top1["good"]
    second = threading.Thread(target=contextvars.copy_context().run, args=(run, "second"))
    second.start()
    first.join(timeout=600)
    second.join(timeout=600)
    assert not errors, errors
    assert set(decisions) == {"first", "second"}

    # One chain: each decision compared against the champion the previous one left (one lock holder at a time).
    chain = sorted(
        decisions.values(), key=lambda d: (d["decided_at"], d["champion_before"]["version"] != zero, d["promoted"])
    )
    assert chain[0]["champion_before"]["version"] == zero
    assert chain[1]["champion_before"]["version"] == chain[0]["champion_after"]
    for decision in chain:
        before = decision["champion_before"]["version"]
        after = decision["champion_after"]
        assert quality[after] >= quality[before], decision["reason"]
        if decision["promoted"]:
            compared = decision["challenger_eval"]["top1"] - decision["champion_eval"]["top1"]
            assert compared > 0 and decision["challenger"]["version"] == after
            assert decision["challenger_eval"]["top1"] == pytest.approx(quality[after], abs=0.0051)
        assert f"v{before}" in decision["reason"] or decision["outcome"] == "refused-changed"
    assert _champion(env, name) == good  # the best version wins whatever the interleaving
    print("interleaving:", [(d["outcome"], d["challenger"]["version"], d["champion_before"]["version"]) for d in chain])

    client = mlflow_client(env.mlflow_url)
    for decision in chain:
        tags = client.get_model_version(name, decision["challenger"]["version"]).tags
        assert tags["promotion.champion_version"] == decision["champion_before"]["version"]
        assert tags["promotion.challenger_version"] == decision["challenger"]["version"]


def test_challenger_moved_during_evaluation_is_refused(env, models, monkeypatch):
    import flows.promote as promote_flow

    name = f"vecaf-test-moved-{uuid.uuid4().hex[:8]}"
    zero = _register(env, name, models.dirs["zero"], "zero")
    _promote(name)
    half = _register(env, name, models.dirs["half"], "half")
    evaluate = promote_flow.evaluate_model_task
    moved: list[str] = []

    def evaluate_then_register(tracking_uri, model_uri, data, device):
        out = evaluate(tracking_uri, model_uri, data, device)
        if model_uri.endswith(f"/{zero}") and not moved:  # while the champion is evaluated: a new challenger
            moved.append(_register(env, name, models.dirs["good"], "good"))
        return out

    monkeypatch.setattr(promote_flow, "evaluate_model_task", evaluate_then_register)
    decision = _promote(name)
    assert moved, "the champion was not evaluated"
    assert decision["outcome"] == "refused-changed" and decision["promoted"] is False
    assert f"challenger moved from version {half} to {moved[0]} during the evaluation" in decision["reason"]
    assert decision["champion_after"] == zero == _champion(env, name)

    monkeypatch.setattr(promote_flow, "evaluate_model_task", evaluate)
    again = _promote(name)  # the next promotion compares the versions the aliases point at now
    assert (again["challenger"]["version"], again["champion_before"]["version"]) == (moved[0], zero)
    assert again["outcome"] == "promoted" and _champion(env, name) == moved[0]


class _Payload:
    """Unpickling this object calls ``open(marker, "w")``: proof that a loader ran pickled code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _log_pickled_model(env, folder: Path, marker: Path) -> tuple[str, str]:
    """A logged model laid out as ``mlflow.pytorch`` pickles one, whose weights file is the payload."""
    import torch
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import Model

    from tasks.tracking import mlflow_client

    client = mlflow_client(env.mlflow_url)
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
    run = client.create_run(exp_id, run_name="pickle")
    logged = client.create_logged_model(exp_id, name="model", source_run_id=run.info.run_id)
    (folder / "data").mkdir(parents=True)
    torch.save(_Payload(str(marker)), folder / "data" / "model.pth")
    mlmodel = Model(artifact_path=logged.artifact_location, run_id=run.info.run_id, model_id=logged.model_id,
                    metadata={"class_names": [f"digit {i}" for i in range(10)]})  # fmt: skip
    mlmodel.add_flavor(
        "pytorch", model_data="data", pytorch_version=str(torch.__version__), serialization_format="pickle"
    )
    mlmodel.add_flavor("python_function", loader_module="mlflow.pytorch", data="data")
    mlmodel.save(str(folder / "MLmodel"))
    client.log_model_artifacts(logged.model_id, str(folder))
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.set_terminated(run.info.run_id)
    return logged.model_id, run.info.run_id


def test_malicious_pickle_challenger_is_refused_unloaded(env, models, tmp_path):
    import torch

    from tasks.registry import register_model
    from tasks.tracking import UnsafeModelError
    from tasks.training import evaluate_model

    live = tmp_path / "payload-is-live"
    torch.save(_Payload(str(live)), tmp_path / "probe.pth")
    torch.load(tmp_path / "probe.pth", weights_only=False)  # what a pickle-based loader does
    assert live.exists()  # the payload works: a loader that unpickles it would create the marker

    name = f"vecaf-test-pickle-{uuid.uuid4().hex[:8]}"
    zero = _register(env, name, models.dirs["zero"], "zero")
    _promote(name)
    marker = tmp_path / "pickle-ran"
    model_id, run_id = _log_pickled_model(env, tmp_path / "evil", marker)
    evil = register_model(env.mlflow_url, name, model_uri=f"models:/{model_id}", model_id=model_id, run_id=run_id,
                          tags={"label": "pickle"})["version"]  # fmt: skip

    decision = _promote(name)
    assert not marker.exists()
    assert decision["outcome"] == "refused-format" and decision["promoted"] is False
    assert decision["challenger"]["version"] == evil and decision["challenger_eval"] is None
    assert "never loaded" in decision["reason"] and "data/model.pth" in decision["reason"]
    assert _champion(env, name) == zero
    from tasks.tracking import mlflow_client

    tags = mlflow_client(env.mlflow_url).get_model_version(name, evil).tags
    assert tags["promotion.decision"] == "refused-format" and tags["promotion.challenger_top1"] == "not evaluated"

    with pytest.raises(UnsafeModelError, match="not loaded"):  # the loader itself refuses too
        evaluate_model(env.mlflow_url, f"models:/{name}/{evil}", DATA, device="cpu")
    assert not marker.exists()
