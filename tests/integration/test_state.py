"""Run state lives in the bucket: the pipeline survives a worker that loses its disk, and a rerun resumes.

On the session stack, in this process, the flows ``caption``, ``featurize``, ``finetune`` and ``promote`` run
on scikit-learn's digits (tiny: 2 loops, head mode) with the worker's cache folder deleted before every flow
and before every task of the finetuning loops. They all complete; the bucket holds the manifests
(content-addressed) and, under the run's prefix, every loop's checkpoint, picks and record and the model; the
MLflow datasets of the pool and the held-out split name the manifests' ``s3://`` URIs. A rerun with the same
parameters trains nothing (both loops are found in the bucket); with loop 2's record removed it trains loop 2
only, resuming from loop 1's stored checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from flows.params import DataParams, RegistryParams, TrainingParams

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATA = DataParams(dataset="digits", pool_size=200, test_size=100, image_size=32, shard_size=200)
# init="base": a rerun resumes only from the same start, and the first run becomes the champion
TRAINING = TrainingParams(ratio=0.05, loops=2, batch_budget=8, batch_size=8, lr=0.05, init="base")
REGISTRY = RegistryParams(experiment="vecaf-test-state", model_name="vecaf-test-state")


class DiskLoss:
    """Deletes the worker's cache (and all its scratch space) on demand, counting the deletions and the
    engine calls (a loop trained, not found in the bucket)."""

    def __init__(self, work_dir: str) -> None:
        self.work_dir = Path(work_dir)
        self.deleted = 0
        self.engine_calls: list[Any] = []

    def wipe(self) -> None:
        if self.work_dir.exists():
            shutil.rmtree(self.work_dir)
            self.deleted += 1


@pytest.fixture
def disk_loss(env, monkeypatch):
    """Wipe the work folder before every task of the finetuning loops; count the engine calls."""
    import flows.finetune as finetune_flow
    import tasks.training as training
    from flows.runtime import runtime

    loss = DiskLoss(runtime().work_dir)
    for name in ("train_loop_task", "compute_losses_task", "log_loop_task", "log_model_task"):
        original = getattr(finetune_flow, name)

        def wrapped(*args, __original=original, **kwargs):
            loss.wipe()
            return __original(*args, **kwargs)

        monkeypatch.setattr(finetune_flow, name, wrapped)
    engine = training._finetune

    def counted(spec, inputs, *, resume, **kw):
        loss.engine_calls.append(resume)
        return engine(spec, inputs, resume=resume, **kw)

    monkeypatch.setattr(training, "_finetune", counted)
    return loss


def _finetune() -> dict[str, Any]:
    from flows.finetune import finetune

    state = finetune(data=DATA, training=TRAINING, registry=REGISTRY, return_state=True)
    assert state.is_completed(), state.message
    return state.result()


def test_pipeline_survives_a_lost_disk_and_a_rerun_resumes(env, disk_loss):
    from flows.caption import caption
    from flows.featurize import featurize
    from flows.promote import promote
    from flows.runtime import runtime
    from tasks.storage import exists, join, list_keys, split_uri
    from tasks.tracking import mlflow_client

    rt = runtime()
    for step in (lambda: caption(data=DATA), lambda: featurize(data=DATA)):
        disk_loss.wipe()
        step()
    disk_loss.wipe()
    first = _finetune()
    assert len(disk_loss.engine_calls) == 2 and disk_loss.deleted >= 2 * 3 + 1  # each loop's tasks began empty
    assert disk_loss.engine_calls[0] is False and Path(disk_loss.engine_calls[1]).name == "loop-1.pt"
    disk_loss.wipe()
    decision = promote(data=DATA, registry=REGISTRY)
    assert decision["champion_after"] == first["model"]["version"]  # the first model becomes champion

    client = mlflow_client(rt.tracking_uri)
    run = client.get_run(first["run_id"])
    state_uri = run.data.tags["run_state_uri"]
    bucket, key = split_uri(state_uri)
    assert bucket == rt.bucket and key == f"{rt.prefix}runs/{run.data.tags['run_key']}"
    stored = set(list_keys(state_uri))
    assert {"checkpoints/loop-1.pt", "checkpoints/loop-2.pt", "loop-1.json", "loop-2.json", "picks-loop-1.parquet",
            "picks-loop-2.parquet", "result.json", "model/config.json", "model/model.safetensors"} <= stored  # fmt: skip
    sources = {
        {t.key: t.value for t in d.tags}["mlflow.data.context"]: d.dataset.source for d in run.inputs.dataset_inputs
    }
    for context in ("pool", "evaluation"):
        manifest = next(u for u in sources[context].replace('"', " ").split() if u.startswith("s3://"))
        assert manifest.startswith(join(f"s3://{rt.bucket}", f"{rt.prefix}manifests/")) and exists(manifest)

    # A rerun of the same parameters: nothing is trained again, yet a new MLflow run logs both loops.
    disk_loss.engine_calls.clear()
    disk_loss.wipe()
    again = _finetune()
    assert disk_loss.engine_calls == []
    assert again["run_id"] != first["run_id"] and again["final_top1"] == first["final_top1"]
    assert client.get_run(again["run_id"]).data.tags["run_state_uri"] == state_uri
    assert [o["top1"] for o in again["loops"]] == [o["top1"] for o in first["loops"]]

    # Loop 2 lost from the bucket: only loop 2 is trained, from loop 1's stored checkpoint, to the same result.
    s3 = rt.s3_client()
    for name in ("loop-2.json", "result.json"):
        s3.delete_object(Bucket=bucket, Key=f"{key}/{name}")
    disk_loss.engine_calls.clear()
    disk_loss.wipe()
    third = _finetune()
    assert len(disk_loss.engine_calls) == 1 and Path(disk_loss.engine_calls[0]).name == "loop-1.pt"
    assert third["final_top1"] == first["final_top1"]
