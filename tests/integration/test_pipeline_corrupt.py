"""A pool with corrupt images: they are skipped, and the skip is reported in the Prefect run and the MLflow run.

An ImageFolder of 3 classes x 4 small PNG images plus one truncated PNG and one text file named .jpg runs
through ``caption``, ``featurize`` and ``finetune`` in this process against the session stack. It has no
split folders, so its held-out split is carved out of the readable images (``tasks.data``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flows.params import DataParams, RegistryParams, TrainingParams

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def folder(tmp_path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "pool"
    for c, name in enumerate(("circle", "square", "stripes")):
        (root / name).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            pixels[:, :, c] = 255
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    good = (root / "circle" / "0.png").read_bytes()
    (root / "circle" / "truncated.png").write_bytes(good[: len(good) // 3])
    (root / "square" / "notes.jpg").write_text("not an image")
    return root


def test_corrupt_images_are_skipped_and_reported(env, folder):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    from flows.caption import caption
    from flows.featurize import featurize
    from flows.finetune import finetune
    from tasks.tracking import mlflow_client

    data = DataParams(
        dataset="imagefolder", root=str(folder), pool_size=None, test_size=None, image_size=32, shard_size=16
    )
    state = caption(data=data, return_state=True)
    assert state.is_completed()
    result = state.result()
    skipped = sorted(Path(p).name for p, _ in result["pool"]["skipped"])
    assert skipped == ["notes.jpg", "truncated.png"]
    # No train/test folders: the held-out split is carved out of the 12 readable images by content hash.
    from tasks.data import load_split

    held_out = len(load_split(data, data.test_split))
    assert 0 < held_out < 12 and result["pool"]["size"] == 12 - held_out
    assert result["new"] == result["pool"]["size"]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["skipped-images"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])),
        )
    assert len(artifacts) == 1
    assert "truncated.png" in json.dumps(artifacts[0].data) and "notes.jpg" in json.dumps(artifacts[0].data)

    featurize(data=data)
    training = TrainingParams(method="random", ratio=0.25, loops=1, batch_budget=2, batch_size=4, cea=False)
    registry = RegistryParams(experiment="vecaf-test-corrupt", model_name="vecaf-test-corrupt")
    tuned = finetune(data=data, training=training, registry=registry)
    client = mlflow_client(env.mlflow_url)
    run = client.get_run(tuned["run_id"])
    assert run.data.tags["skipped_images"] == "2"
    report = client.download_artifacts(tuned["run_id"], "data/skipped-images.json")
    names = sorted(Path(s["image"]).name for s in json.loads(Path(report).read_text())["skipped"])
    assert names == ["notes.jpg", "truncated.png"]
    assert run.data.params["data.dataset"] == "imagefolder"
