"""Flow parameters, the promotion rule and the pipeline's helpers, without servers.

Every rule is checked against numbers worked by hand here (digests and hashes with hashlib, losses with
math, the promotion rule at and around the margin).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
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


def test_training_defaults_and_limits_of_cumulative_loss_power_and_selection_loss():
    t = TrainingParams()
    assert t.cumulative is True and t.loss_power == 0.5  # the measured default (docs/engine.md, "Loop protocol")
    assert TrainingParams(cumulative=True, loss_power=1.0).loss_power == 1.0
    assert t.selection_loss == "expected" and TrainingParams(selection_loss="observed").selection_loss == "observed"
    with pytest.raises(ValidationError, match="selection_loss"):
        TrainingParams(selection_loss="label")
    for bad in (0.0, -1.0, 11.0):
        with pytest.raises(ValidationError, match="loss_power"):
            TrainingParams(loss_power=bad)


# --- Data checks before training (issue 11, findings 7 and 8) ---------------------------------------------


def _image_folder(root, classes, per_class, *, seed=0):
    """``root/<class>/<i>.png``: ``per_class`` random 8x8 RGB images per class; returns the file paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = root / name / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
            paths.append(path)
    return paths


def _refs(data, tmp_path):
    from tasks.data import describe_split, load_split

    load_split.cache_clear()
    work = tmp_path / "work"
    return describe_split(data, data.train_split, work).to_dict(), describe_split(data, data.test_split, work).to_dict()


def _hashes(ref):
    from tasks.data import read_manifest

    return read_manifest(ref["manifest"])["content_hash"].to_pylist()


def test_imagefolder_without_split_folders_is_carved_by_content_hash(tmp_path):
    from tasks.data import _whole_folder, check_splits, hash_fraction

    root = tmp_path / "pool"
    paths = _image_folder(root, ("ant", "bee", "cat"), 12)
    (root / "ant" / "copy-of-0.png").write_bytes(paths[0].read_bytes())
    _whole_folder.cache_clear()
    data = DataParams(dataset="imagefolder", root=str(root), pool_size=None, test_size=None, holdout_fraction=0.25)
    pool, test = _refs(data, tmp_path)
    pool_h, test_h = _hashes(pool), _hashes(test)
    assert pool["size"] + test["size"] == 37
    assert not set(pool_h) & set(test_h)
    checked = check_splits(data, pool, test)
    assert checked["overlap"] == 0
    assert all(n > 0 for n in checked["pool_class_counts"].values())
    assert all(n > 0 for n in checked["test_class_counts"].values())
    # The side of an image is its hash's: u(h) < 0.25 held out, except the fix-up of a class left one-sided.
    by_class = {}
    for path in paths:
        by_class.setdefault(path.parent.name, []).append(hashlib.sha256(path.read_bytes()).hexdigest())
    for name, hashes in by_class.items():
        low = {h for h in hashes if hash_fraction(h) < 0.25}
        expected = low if 0 < len(low) < len(hashes) else None
        if expected is not None:
            assert {h for h in test_h if h in hashes} == expected, name
    # The copy sits on the same side as its original.
    original = hashlib.sha256(paths[0].read_bytes()).hexdigest()
    assert (pool_h.count(original), test_h.count(original)) in ((2, 0), (0, 2))

    # Adding images never moves the others between sides.
    from PIL import Image

    Image.fromarray(np.full((8, 8, 3), 17, dtype=np.uint8)).save(root / "bee" / "new.png")
    _whole_folder.cache_clear()
    pool2, test2 = _refs(data, tmp_path)
    assert set(test_h) <= set(_hashes(test2)) and set(pool_h) <= set(_hashes(pool2))


def test_a_single_split_folder_is_refused(tmp_path):
    root = tmp_path / "pool"
    _image_folder(root / "train", ("ant", "bee"), 3)
    data = DataParams(dataset="imagefolder", root=str(root), pool_size=None, test_size=None)
    with pytest.raises(ValueError, match=r"has a 'train' split folder but no 'test' one"):
        _refs(data, tmp_path)


def test_overlapping_splits_are_refused_unless_allowed(tmp_path):
    from tasks.data import check_splits

    root = tmp_path / "pool"
    train = _image_folder(root / "train", ("ant", "bee"), 4, seed=1)
    _image_folder(root / "test", ("ant", "bee"), 2, seed=2)
    (root / "test" / "bee" / "leaked.png").write_bytes(train[5].read_bytes())
    data = DataParams(dataset="imagefolder", root=str(root), pool_size=None, test_size=None)
    pool, test = _refs(data, tmp_path)
    with pytest.raises(ValueError, match=r"1 of the 5 held-out images also are in the pool .*allow_overlap=true"):
        check_splits(data, pool, test)
    allowed = data.model_copy(update={"allow_overlap": True})
    assert check_splits(allowed, pool, test)["overlap"] == 1


def test_a_class_whose_images_are_all_corrupt_is_named(tmp_path):
    from tasks.data import _whole_folder, check_splits

    root = tmp_path / "pool"
    _image_folder(root, ("ant", "bee"), 5)
    (root / "cat").mkdir()
    for i in range(3):
        (root / "cat" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _whole_folder.cache_clear()
    data = DataParams(dataset="imagefolder", root=str(root), pool_size=None, test_size=None)
    pool, test = _refs(data, tmp_path)
    assert len(pool["skipped"]) == 3
    with pytest.raises(ValueError, match=r"1 class\(es\) have no image in the pool .* after 3 corrupt .*\['cat'\]"):
        check_splits(data, pool, test)


def test_a_class_missing_from_the_held_out_subset_is_named(tmp_path):
    from tasks.data import check_splits

    root = tmp_path / "pool"
    _image_folder(root / "train", ("ant", "bee", "cat"), 4)
    _image_folder(root / "test", ("ant", "bee"), 3, seed=5)
    (root / "test" / "cat").mkdir()
    data = DataParams(dataset="imagefolder", root=str(root), pool_size=None, test_size=None)
    pool, test = _refs(data, tmp_path)
    with pytest.raises(ValueError, match=r"no image in the held-out split imagefolder/test: \['cat'\]"):
        check_splits(data, pool, test)


def test_sizes_used_and_the_warning_when_less_than_asked(tmp_path):
    from tasks.data import check_splits, warn_smaller_than_asked

    root = tmp_path / "pool"
    _image_folder(root / "train", ("ant", "bee"), 6)
    _image_folder(root / "test", ("ant", "bee"), 5, seed=3)
    data = DataParams(dataset="imagefolder", root=str(root), pool_size=100_000, test_size=10)
    pool, test = _refs(data, tmp_path)
    checked = check_splits(data, pool, test)
    assert (checked["pool_size_used"], checked["test_size_used"]) == (12, 10)

    class Log:
        lines: list = []

        def warning(self, msg):
            self.lines.append(msg)

    log = Log()
    warned = warn_smaller_than_asked(log, checked)
    assert warned == log.lines and len(warned) == 1
    assert "data.pool_size=100000 asked, but the pool holds only 12 images" in warned[0]


def test_the_same_split_for_pool_and_held_out_needs_allow_overlap():
    with pytest.raises(ValidationError, match="held-out split would be the pool"):
        DataParams(train_split="train", test_split="train")
    assert DataParams(train_split="all", test_split="all", allow_overlap=True).allow_overlap


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: PipelineParams(ood_prompt="x" * 10_000), "ood_prompt"),
        (lambda: DataParams(root="/" + "d" * 5000), "root"),
        (lambda: DataParams(test_split="s" * 500), "test_split"),
        (lambda: ModelParams(pvm="a" * 500), "pvm"),
        (lambda: ModelParams(captioner="hf:/" + "a" * 5000), "captioner"),
        (lambda: RegistryParams(experiment="e" * 300), "experiment"),
    ],
)
def test_oversized_strings_are_refused(build, field):
    with pytest.raises(ValidationError, match=field):
        build()


def test_the_deployment_schema_refuses_unknown_parameters_and_long_strings():
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import ValidationError as SchemaError
    from prefect.utilities.schema_tools import validate

    from flows.finetune import finetune
    from flows.params import MAX_FREE_STRING_LENGTH, MAX_PROMPT_LENGTH, closed_parameter_schema
    from flows.pipeline import vecaf_pipeline

    for flow_ in (vecaf_pipeline, finetune):
        open_schema = parameter_schema(flow_).model_dump_for_openapi()
        validate({"bogus": 1}, open_schema, raise_on_error=True)  # Prefect's own schema lets it through
        schema = closed_parameter_schema(open_schema)
        assert "additionalProperties" not in open_schema
        validate(PipelineParams().flow_parameters(), schema, raise_on_error=True)
        with pytest.raises(SchemaError, match="'bogus' was unexpected"):
            validate({"bogus": 1}, schema, raise_on_error=True)
        with pytest.raises(SchemaError, match="ood_prompt.*too long"):
            validate({"ood_prompt": "x" * 10_000}, schema, raise_on_error=True)
        with pytest.raises(SchemaError, match="data"):
            validate({"data": {"pool_size": 100, "bogus": 1}}, schema, raise_on_error=True)
    bound = parameter_schema(finetune).model_dump_for_openapi()["properties"]["ood_prompt"]["anyOf"][0]["maxLength"]
    assert bound == MAX_PROMPT_LENGTH
    closed = closed_parameter_schema(parameter_schema(vecaf_pipeline).model_dump_for_openapi())
    assert closed["properties"]["ood_prompt"]["anyOf"][0]["maxLength"] in (MAX_PROMPT_LENGTH, MAX_FREE_STRING_LENGTH)


def _form(flow_) -> dict:
    from prefect.utilities.callables import parameter_schema

    from flows.params import form_schema

    return form_schema(parameter_schema(flow_).model_dump_for_openapi())


def test_the_form_schema_requires_fields_with_defaults_and_fills_them_from_the_deployment():
    from prefect.utilities.schema_tools import ValidationError as SchemaError
    from prefect.utilities.schema_tools import validate

    from flows.deploy import default_parameters
    from flows.pipeline import vecaf_pipeline

    schema = _form(vecaf_pipeline)
    training = schema["definitions"]["TrainingParams"]
    # every field whose default is not None is required (the UI then shows no "(Optional)")
    assert set(training["required"]) == set(TrainingParams.model_fields) - {"eval_every"}
    assert "pvm_checkpoint" not in schema["definitions"]["ModelParams"]["required"]
    assert set(schema["required"]) == {"data", "models", "objective", "training", "registry"}
    defaults = default_parameters(vecaf_pipeline.fn)
    assert defaults == PipelineParams().flow_parameters()
    validate(defaults, schema, raise_on_error=True)
    validate({**defaults, "training": {**defaults["training"], "loops": 5}}, schema, raise_on_error=True)
    with pytest.raises(SchemaError, match="'training'.*'mode' is a required property"):
        validate({**defaults, "training": {"loops": 5}}, schema, raise_on_error=True)
    with pytest.raises(SchemaError, match="'bogus' was unexpected"):
        validate({**defaults, "bogus": 1}, schema, raise_on_error=True)


@pytest.mark.parametrize(
    "group, field, sentences",
    [
        ("TrainingParams", "loops", ["L, selection + training loops.", "Range: 1 ≤ x ≤ 100.", "Default: 3."]),
        ("TrainingParams", "ratio", ["Range: 0 < x ≤ 0.5.", "Default: 0.01."]),
        ("TrainingParams", "lr", ["Range: 0 < x ≤ 10.", "Example: 0.05.", "Default: 0.0005."]),
        ("TrainingParams", "cea", ["Default: on."]),
        ("TrainingParams", "seed", ["Range: x ≥ 0.", "Default: 0."]),
        ("DataParams", "pool_size", ["Range: 10 ≤ x ≤ 10,000,000.", "Example: 3000.", "Default: 4000."]),
        ("DataParams", "holdout_fraction", ["Range: 0 < x < 1.", "Default: 0.2."]),
        ("ModelParams", "captioner", ["'hf:&lt;folder&gt;' or 'open_clip:&lt;spec&gt;'", "Default: imagenet-labels."]),
    ],
)
def test_form_descriptions_say_range_examples_and_default(group, field, sentences):
    from flows.pipeline import vecaf_pipeline

    description = _form(vecaf_pipeline)["definitions"][group]["properties"][field]["description"]
    for sentence in sentences:
        assert sentence in description, description
    assert not re.search(r"<\w", description), "a <placeholder> would vanish as an HTML tag in the form"


def test_form_titles_name_the_groups():
    from flows.pipeline import vecaf_pipeline
    from flows.promote import promote

    titles = {k: v["title"] for k, v in _form(vecaf_pipeline)["properties"].items()}
    assert titles == {
        "data": "Data", "models": "Models", "ood_prompt": "OOD caption prompt", "objective": "Objective",
        "training": "Training", "registry": "Tracking and registry",
    }  # fmt: skip
    assert _form(promote)["properties"]["registry"]["title"] == "Registered model"


def test_the_promote_form_carries_only_what_promotion_uses():
    from flows.promote import promote

    schema = _form(promote)
    assert set(schema["properties"]) == {"data", "registry", "device", "rollback", "to_version"}
    held_out = set(schema["definitions"]["HeldOutParams"]["properties"])
    assert held_out == set(DataParams.model_fields) - {"image_size", "shard_size"}
    assert set(schema["definitions"]["PromotionParams"]["properties"]) == {"model_name", "promotion_margin"}
    data = DataParams(dataset="digits", pool_size=500, test_size=200, image_size=32)
    registry = RegistryParams(experiment="e", model_name="m", promotion_margin=0.01, promote=False)
    assert data.held_out().model_dump() == {k: v for k, v in data.model_dump().items() if k in held_out}
    assert registry.promotion().model_dump() == {"model_name": "m", "promotion_margin": 0.01}


@pytest.mark.parametrize(
    "value, message",
    [
        (
            {"training": {"loops": 5, "batch_budget": 2}},
            "invalid parameters: training: batch_budget (2) must be at least loops (5): every loop trains a batch",
        ),
        (
            {"training": {"loops": 0}, "data": {"pool_size": 1}},
            "invalid parameters: data.pool_size: Input should be greater than or equal to 10; "
            "training.loops: Input should be greater than or equal to 1",
        ),
        (
            {"data": {"pool_size": 100}, "training": {"ratio": 0.2, "loops": 6}},
            "invalid parameters: 6 loops of K=20 fresh samples (ratio 0.2 of pool_size 100) need 120 images; "
            "lower ratio or loops, or set exclude_previous=false",
        ),
    ],
)
def test_checked_parameters_fail_with_one_line(value, message):
    from flows.params import ParameterError, checked

    with pytest.raises(ParameterError) as refused:
        checked(PipelineParams, value)
    assert str(refused.value) == message
    assert "\n" not in str(refused.value)
    assert checked(PipelineParams, PipelineParams().flow_parameters()) == PipelineParams()


def test_deployment_names_are_distinct_and_the_fan_out_finds_its_shards():
    from flows.deploy import _ENTRYPOINTS, DEPLOYMENT_DESCRIPTIONS, DEPLOYMENT_NAMES
    from tasks.fanout import CAPTION_SHARD_DEPLOYMENT, EMBED_SHARD_DEPLOYMENT

    names = [f"{flow}/{name}" for flow, variants in DEPLOYMENT_NAMES.items() for name in variants]
    assert set(DEPLOYMENT_NAMES) == set(_ENTRYPOINTS)
    assert {CAPTION_SHARD_DEPLOYMENT, EMBED_SHARD_DEPLOYMENT} <= set(names)
    assert "vecaf-pipeline/production" in names and "promote/manual" in names
    assert not any(n.endswith("/on-demand") for n in names)
    assert set(DEPLOYMENT_DESCRIPTIONS) == set(names)  # every deployment explains itself in the UI
