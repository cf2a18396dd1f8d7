"""Flow parameters, the promotion rule and the pipeline's helpers, without servers.

Every rule is checked against numbers worked by hand here (digests and hashes with hashlib, losses with
math, the promotion rule at and around the margin).
"""

from __future__ import annotations

import hashlib
import json
import math
import socket

import numpy as np
import pytest
from pydantic import ValidationError

from flows.params import (
    METHODS,
    DataParams,
    ModelParams,
    ObjectiveParams,
    PipelineParams,
    RegistryParams,
    TrainingParams,
)
from tasks.data import dataset_digest, image_content_hashes, shard_bounds
from tasks.embeddings import feature_keys
from tasks.registry import decide, promotion_markdown
from tasks.tracking import EndpointUnreachableError, check_mlflow, flatten_params, s3_location, talking_to


def test_defaults_validate_and_match_the_pipeline_signature():
    import inspect

    from flows.pipeline import vecaf_pipeline

    params = PipelineParams().flow_parameters()
    assert set(params) == set(inspect.signature(vecaf_pipeline.fn).parameters)
    assert params["data"]["dataset"] == "fashion-mnist"
    assert params["models"] == {
        "pvm": "efficientnet_lite0", "pvm_checkpoint": None, "captioner": "imagenet-labels",
        "text_encoder": "all-MiniLM-L6-v2", "batch_size": 64, "device": "auto",
    }  # fmt: skip
    assert PipelineParams(**params) == PipelineParams()


@pytest.mark.parametrize(
    "field, value",
    [
        ("ratio", 0.0),
        ("ratio", 0.51),
        ("loops", 0),
        ("batch_budget", 0),
        ("method", "kmeans"),
        ("mode", "partial"),
        ("lam_bw", 1.5),
        ("eta", -0.1),
    ],
)
def test_training_out_of_range_is_rejected(field, value):
    with pytest.raises(ValidationError, match=field):
        TrainingParams(**{field: value})


def test_batch_budget_must_cover_the_loops():
    TrainingParams(loops=3, batch_budget=3)
    with pytest.raises(ValidationError, match=r"batch_budget \(2\) must be at least loops \(3\)"):
        TrainingParams(loops=3, batch_budget=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dataset": "mnist"}, "dataset"),
        ({"image_size": 8}, "image_size"),
        ({"pool_size": 5}, "pool_size"),
        ({"dataset": "imagefolder"}, "needs root"),
    ],
)
def test_data_out_of_range_is_rejected(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        DataParams(**kwargs)


def test_model_names_are_checked():
    assert ModelParams(captioner="blip-base", text_encoder="clip").captioner == "blip-base"
    assert ModelParams(captioner="hf:/some/folder").captioner == "hf:/some/folder"
    with pytest.raises(ValidationError, match="unknown captioner 'gpt-vision'"):
        ModelParams(captioner="gpt-vision")
    with pytest.raises(ValidationError, match="unknown text encoder 'word2vec'"):
        ModelParams(text_encoder="word2vec")
    with pytest.raises(ValidationError, match="without spaces"):
        ModelParams(pvm="resnet 50")
    with pytest.raises(ValidationError, match="device"):
        ModelParams(device="tpu")


def test_objective_needs_its_arguments():
    assert ObjectiveParams(kind="one-vs-all", target_class=3).target_class == 3
    with pytest.raises(ValidationError, match="needs target_class"):
        ObjectiveParams(kind="one-vs-all")
    with pytest.raises(ValidationError, match="needs class_weights"):
        ObjectiveParams(kind="class-weighted")
    with pytest.raises(ValidationError, match="finite and positive"):
        ObjectiveParams(kind="class-weighted", class_weights=[1.0, 0.0])
    with pytest.raises(ValidationError, match="only used by the 'one-vs-all'"):
        ObjectiveParams(kind="ce", target_class=1)


def test_cross_checks_against_the_pool():
    # K = round(0.5 * 10) = 5 fresh samples per loop; 3 loops need 15 > 10 images.
    data = DataParams(pool_size=10)
    with pytest.raises(ValidationError, match=r"need 15 images"):
        PipelineParams(data=data, training=TrainingParams(ratio=0.5, loops=3, batch_budget=3))
    PipelineParams(data=data, training=TrainingParams(ratio=0.5, loops=2, batch_budget=3))
    PipelineParams(data=data, training=TrainingParams(ratio=0.5, loops=3, batch_budget=3, exclude_previous=False))
    with pytest.raises(ValidationError, match="outside 0..9"):
        PipelineParams(objective=ObjectiveParams(kind="one-vs-all", target_class=10))
    with pytest.raises(ValidationError, match="has 2 entries, the dataset has 10"):
        PipelineParams(objective=ObjectiveParams(kind="class-weighted", class_weights=[1.0, 2.0]))
    with pytest.raises(ValidationError, match="model_name"):
        RegistryParams(model_name="bad name!")


def test_methods_are_the_library_registry_plus_full():
    import vecaf

    assert sorted(METHODS) == sorted([*vecaf.list_methods(), "full"])


def test_the_ui_form_schema_carries_the_bounds():
    from flows.pipeline import vecaf_pipeline

    schema = vecaf_pipeline.parameters.model_dump()
    definitions = schema["definitions"]
    ratio = definitions["TrainingParams"]["properties"]["ratio"]
    assert ratio["exclusiveMinimum"] == 0.0 and ratio["maximum"] == 0.5
    assert definitions["TrainingParams"]["properties"]["loops"]["minimum"] == 1
    assert set(definitions["TrainingParams"]["properties"]["method"]["enum"]) == set(METHODS)


@pytest.mark.parametrize(
    "challenger, champion, margin, promoted",
    [
        (0.50, None, 0.0, True),  # first model becomes champion
        (0.80, 0.78, 0.01, True),  # gain 0.02 > 0.01
        (0.80, 0.79, 0.01, False),  # gain 0.01 is not more than 0.01
        (0.70, 0.80, 0.0, False),  # worse
        (0.80, 0.80, 0.0, False),  # tie keeps the champion
    ],
)
def test_promotion_rule(challenger, champion, margin, promoted):
    assert decide(challenger, champion, margin)[0] is promoted


def test_promotion_rule_rejects_negative_margin():
    with pytest.raises(ValueError, match="margin must be >= 0"):
        decide(0.5, 0.4, -0.1)


def test_promotion_markdown_states_the_verdict():
    decision = {
        "promoted": False, "reason": "challenger gains -0.1000", "margin": 0.0, "champion_after": "1",
        "challenger": {"version": "2"}, "challenger_eval": {"top1": 0.5, "loss": 1.2, "n": 200},
        "champion_before": {"version": "1"}, "champion_eval": {"top1": 0.6, "loss": 1.0, "n": 200},
    }  # fmt: skip
    text = promotion_markdown("m", decision)
    assert "**not promoted**" in text and "| challenger | 2 | 0.5000 |" in text and "version 1" in text


def test_s3_location_of_proxied_artifacts():
    assert s3_location("mlflow-artifacts:/1/abc/artifacts", "b") == "s3://b/mlflow/1/abc/artifacts"
    proxied = "mlflow-artifacts://127.0.0.1:5000/2/models/m-1/artifacts"
    assert s3_location(proxied, "b") == "s3://b/mlflow/2/models/m-1/artifacts"
    assert s3_location("s3://x/y", "b") == "s3://x/y"
    with pytest.raises(ValueError, match="neither"):
        s3_location("file:///tmp/x", "b")


def test_flatten_params():
    flat = flatten_params({"a": {"b": 1, "c": {"d": None}}, "e": [1.0, 2.0], "f": "x"})
    assert flat == {"a.b": "1", "a.c.d": "None", "e": "[1.0, 2.0]", "f": "x"}


def test_dataset_digest_by_hand():
    ids, hashes, labels = ["a/1", "a/2"], ["h1", "h2"], np.array([3, 0])
    expected = hashlib.sha256(b"a/1\th1\t3\na/2\th2\t0\n").hexdigest()
    assert dataset_digest(ids, hashes, labels) == expected
    assert dataset_digest(ids, hashes, np.array([3, 1])) != expected
    with pytest.raises(ValueError, match="differ in length"):
        dataset_digest(ids, hashes[:1], labels)


def test_shard_bounds():
    assert shard_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_bounds(0, 4) == []
    with pytest.raises(ValueError):
        shard_bounds(5, 0)


def test_image_hashes_by_hand():
    from vecaf.data import ArrayImageDataset

    images = np.zeros((3, 2, 2), dtype=np.uint8)
    images[2, 0, 0] = 7
    ds = ArrayImageDataset(
        images, name="t", split="train", ids=["x0", "x1", "x2"], labels=[0, 1, 0], class_names=["a", "b"]
    )
    hashes = image_content_hashes(ds)
    assert hashes[0] == hashlib.sha256(b"2x2|" + bytes(4)).hexdigest()
    assert hashes[0] == hashes[1] != hashes[2]


def test_feature_keys_name_everything_that_changes_the_output(tmp_path):
    data = DataParams(image_size=64)
    keys = feature_keys(ModelParams(), data, "It's a snowy day!")
    assert keys.pvm == "efficientnet_lite0@64px"
    assert keys.captioner == "imagenet-labels@efficientnet_lite0@64px"
    assert keys.encoder == "all-MiniLM-L6-v2" and keys.prompt == "It's a snowy day!"
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"weights")
    with_ckpt = feature_keys(ModelParams(pvm_checkpoint=str(ckpt)), DataParams(image_size=None), None)
    assert with_ckpt.pvm == f"efficientnet_lite0+w.pth:{hashlib.sha256(b'weights').hexdigest()[:12]}"
    assert with_ckpt.prompt == ""


def test_objectives_by_hand():
    import torch

    from tasks.training import make_objective

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    ce = make_objective(ObjectiveParams())(logits, labels)
    by_hand = [
        -(2.0 - math.log(math.exp(2.0) + 1.0 + math.exp(-1.0))),
        -(0.5 - math.log(3 * math.exp(0.5))),
    ]
    assert np.allclose(ce.numpy(), by_hand)
    # one-vs-all, target class 2: s = z_2 - log sum_{j != 2} exp(z_j); positive: -log sigmoid(s).
    ova = make_objective(ObjectiveParams(kind="one-vs-all", target_class=2))(logits, labels)
    s0 = -1.0 - math.log(math.exp(2.0) + 1.0)
    s1 = 0.5 - math.log(2 * math.exp(0.5))
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    assert np.allclose(ova.numpy(), [-math.log(1 - sig(s0)), -math.log(sig(s1))])
    weighted = make_objective(ObjectiveParams(kind="class-weighted", class_weights=[2.0, 1.0, 0.5]))(logits, labels)
    assert np.allclose(weighted.numpy(), [2.0 * by_hand[0], 0.5 * by_hand[1]])


def test_talking_to_names_the_endpoint():
    with pytest.raises(EndpointUnreachableError, match=r"S3 endpoint at http://127\.0\.0\.1:1 is unreachable"):
        with talking_to("S3 endpoint", "http://127.0.0.1:1"):
            raise ConnectionRefusedError("refused")
    with pytest.raises(KeyError):
        with talking_to("S3 endpoint", "http://127.0.0.1:1"):
            raise KeyError("not a connection problem")


def test_check_mlflow_on_a_closed_port(free_port):
    port = free_port()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    message = f"MLflow tracking server at http://127.0.0.1:{port} is unreachable"
    with pytest.raises(EndpointUnreachableError, match=message):
        check_mlflow(f"http://127.0.0.1:{port}", timeout=2.0)


def test_json_ready_parameters_round_trip():
    params = PipelineParams(ood_prompt="  It's a snowy day!  ", training=TrainingParams(method="activeft"))
    again = PipelineParams(**json.loads(json.dumps(params.flow_parameters())))
    assert again == params and again.ood_prompt == "It's a snowy day!"


def test_training_defaults_and_limits_of_cumulative_and_loss_power():
    t = TrainingParams()
    assert t.cumulative is False and t.loss_power == 0.5
    assert TrainingParams(cumulative=True, loss_power=1.0).loss_power == 1.0
    for bad in (0.0, -1.0, 11.0):
        with pytest.raises(ValidationError, match="loss_power"):
            TrainingParams(loss_power=bad)
