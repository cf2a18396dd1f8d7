"""Run keys and object locations of the run state in the bucket (``tasks.storage``), without a server."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from flows.params import DataParams, RegistryParams, TrainingParams
from tasks.data import manifest_digest
from tasks.storage import cache_path, join, manifest_uri, run_key, run_uri, split_uri


def _params(**training) -> dict:
    return {
        "data": DataParams(dataset="digits").model_dump(mode="json"),
        "models": {"pvm": "efficientnet_lite0"},
        "ood_prompt": None,
        "objective": {"kind": "ce"},
        "training": TrainingParams(**training).model_dump(mode="json"),
        "registry": RegistryParams().model_dump(mode="json"),
    }


def test_the_run_key_follows_training_parameters_and_splits_not_the_registry():
    base = run_key(_params(), "pool", "test")
    assert run_key(_params(), "pool", "test") == base
    other_registry = {**_params(), "registry": RegistryParams(experiment="x", model_name="y").model_dump(mode="json")}
    assert run_key(other_registry, "pool", "test") == base
    assert run_key(_params(seed=12345), "pool", "test") != base
    assert run_key(_params(), "pool2", "test") != base
    assert run_key(_params(), "pool", "test2") != base
    assert run_key(_params(), "pool", "test", start="champion:m-1") != base  # a warm start is another run
    assert run_key(_params(), "pool", "test", start="base") == base


def test_locations_in_the_bucket_and_in_the_cache(tmp_path):
    rt = SimpleNamespace(bucket="b", prefix="team/")
    assert run_uri(rt, "abc") == "s3://b/team/runs/abc"
    assert run_uri(SimpleNamespace(bucket="b", prefix=""), "abc") == "s3://b/runs/abc"
    digest = manifest_digest("d" * 64, "train", ["a", "b"])
    assert manifest_uri(rt, digest) == f"s3://b/team/manifests/{digest}.parquet"
    assert manifest_digest("d" * 64, "test", ["a", "b"]) != digest
    assert join("s3://b/team/runs/abc/", "checkpoints", "loop-1.pt") == "s3://b/team/runs/abc/checkpoints/loop-1.pt"
    assert cache_path("s3://b/team/runs/abc/loop-1.json", tmp_path) == tmp_path / "b/team/runs/abc/loop-1.json"
    with pytest.raises(ValueError, match="not an s3:// URI"):
        split_uri("/tmp/x")
    with pytest.raises(ValueError, match="bucket and a key"):
        split_uri("s3://bucket-only")
