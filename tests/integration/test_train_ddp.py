"""``train-loop`` under torchrun: 2 CPU processes (gloo) give the 1-process result, and every rank exits.

On the session stack's S3 (run state lives in the bucket), with a local Feast folder holding the PVM
embeddings of scikit-learn's digits (64 pool images, 32 held out, 32 px, head mode): the two loops of a run
are trained once in the task's own process and once with ``processes=2`` (``models.train_processes``), each
under its own run prefix. Tolerance, as in ``tests/unit/test_ddp.py`` (the runs differ only in the order of
float sums: the global-batch gradient is the mean of two half-batch means): the same picks and top-1, losses
within 1e-4 relative, final weights within 1e-5 absolute. ``result.json`` says the second run had world size 2.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from flows.params import DataParams, ModelParams, ObjectiveParams, TrainingParams

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATA = DataParams(dataset="digits", pool_size=64, test_size=32, image_size=32, shard_size=64)
TRAINING = TrainingParams(ratio=0.125, loops=2, batch_budget=6, batch_size=8, lr=0.05, cea=False, init="base")


@pytest.fixture
def setup(stack, tmp_path, monkeypatch):
    """Manifests in the bucket, embeddings in a Feast folder; a factory of train specs under fresh run prefixes."""
    from tasks.data import describe_split, store_manifest
    from tasks.embeddings import embed_image_shard
    from tasks.storage import store_uri
    from tasks.training import TrainSpec

    for key, value in stack.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("VECAF_STACK__STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    store = str(tmp_path / "feast")
    refs = {}
    for split in (DATA.train_split, DATA.test_split):
        refs[split] = store_manifest(describe_split(DATA, split, tmp_path / "work"))
        embed_image_shard(DATA, ModelParams(), split, 0, refs[split].size, store)
    root = f"ddp-{uuid.uuid4().hex[:8]}"

    def spec(name: str, **training) -> TrainSpec:
        pool, test = refs[DATA.train_split], refs[DATA.test_split]
        return TrainSpec(
            data=DATA, models=ModelParams(), objective=ObjectiveParams(),
            training=TRAINING.model_copy(update=training), ood_prompt=None, store=store,
            run_uri=store_uri(stack.bucket, root, "runs", name), pool_manifest=pool.manifest,
            test_manifest=test.manifest, num_classes=pool.num_classes, class_names=tuple(pool.class_names),
        )  # fmt: skip

    return spec


def _ranks_left(marker: str) -> list[int]:
    """Pids of live processes whose command line mentions ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _weights(spec) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    from tasks.storage import get_folder, join

    return load_file(str(get_folder(join(spec.run_uri, "model")) / "model.safetensors"))


def test_two_gloo_processes_match_one_process_and_all_ranks_exit(setup):
    import pyarrow.parquet as pq

    from tasks.storage import get_file, join
    from tasks.training import spec_to_json, spec_from_json, train_loop

    one, two = setup("one"), setup("two")
    assert spec_from_json(json.loads(json.dumps(spec_to_json(two)))) == two  # what each rank receives
    single = [train_loop(one, loop, processes=1) for loop in range(TRAINING.loops)]
    double = [train_loop(two, loop, processes=2) for loop in range(TRAINING.loops)]
    assert _ranks_left(two.run_uri.split("/")[3]) == []  # every rank (and torchrun) has exited: the job file's folder

    result_one = json.loads(get_file(single[-1]["result"]).read_text())
    result_two = json.loads(get_file(double[-1]["result"]).read_text())
    assert (result_one["config"]["world_size"], result_two["config"]["world_size"]) == (1, 2)
    for a, b in zip(single, double, strict=True):
        assert not a["resumed"] and not b["resumed"]
        assert (a["loop"], a["budget"], a["batches"], a["top1"]) == (b["loop"], b["budget"], b["batches"], b["top1"])
        np.testing.assert_allclose([b["test_loss"], b["train_loss"]], [a["test_loss"], a["train_loss"]], rtol=1e-4)
        picks_a, picks_b = (pq.read_table(get_file(x["picks"])) for x in (a, b))
        assert picks_a["image_id"].to_pylist() == picks_b["image_id"].to_pylist()
        record_a, record_b = (json.loads(get_file(x["record"]).read_text()) for x in (a, b))
        assert [e["top1"] for e in record_a["evals"]] == [e["top1"] for e in record_b["evals"]]
        np.testing.assert_allclose([v for _, v in record_b["train_curve"]], [v for _, v in record_a["train_curve"]],
                                   rtol=1e-4)  # fmt: skip
    assert single[-1]["final_top1"] == double[-1]["final_top1"]
    weights_one, weights_two = _weights(one), _weights(two)
    assert weights_one.keys() == weights_two.keys()
    for name in weights_one:
        np.testing.assert_allclose(weights_two[name], weights_one[name], rtol=0, atol=1e-5, err_msg=name)
    # loop 2 of a 2-process run resumed from a checkpoint written by 2 processes: the stored loop is reused
    assert train_loop(two, 1, processes=2)["resumed"]
    assert join(two.run_uri, "checkpoints", "loop-2.pt") == double[-1]["checkpoint"]


def test_a_batch_that_does_not_split_over_the_processes_is_refused_before_any_work(setup, monkeypatch):
    from tasks.storage import list_keys
    from tasks.training import train_loop, train_processes

    spec = setup("three")
    with pytest.raises(ValueError, match=r"training.batch_size 8 does not split evenly over models.train_processes=3"):
        train_loop(spec, 0, processes=3)
    assert list_keys(spec.run_uri) == []
    monkeypatch.setenv("VECAF_MODELS__TRAIN_PROCESSES", "2")
    assert train_processes() == 2  # the worker's settings decide when the caller does not
    monkeypatch.setenv("VECAF_MODELS__TRAIN_PROCESSES", "0")
    assert train_processes() == 1  # one per CUDA device; none here
