"""Feature storage against a real Feast store (file offline store + SQLite online store) in a tmp dir.

Checks: bulk Parquet round trip is exact; apply registers the repo; materialization fills the online store
and online look-ups return what was written; the latest row wins (event time, then write time);
incremental materialization takes only rows after the previous end; the rerun cache; bad input raises
ValueError and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from tasks import features as tf

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::FutureWarning")]

N = 300
D = 16


def _ids(n: int, prefix: str = "img") -> list[str]:
    return [f"{prefix}-{i:04d}" for i in range(n)]


def _vectors(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _files(store_dir: Path) -> list[Path]:
    data = store_dir / "data"
    return sorted(p for p in data.rglob("*") if p.is_file()) if data.exists() else []


@pytest.fixture()
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "feast"


@pytest.fixture()
def store(store_dir: Path):
    fs = tf.open_store(store_dir)
    tf.apply_definitions(fs)
    return fs


def test_rendered_yaml_points_every_path_into_the_store_dir(tmp_path: Path):
    text = tf.render_feature_store_yaml(tmp_path / "s")
    root = str((tmp_path / "s").resolve())
    assert "project: vecaf" in text and "provider: local" in text
    assert f'"{root}/registry.db"' in text and f'"{root}/online.db"' in text
    assert "type: sqlite" in text and "type: file" in text
    fs = tf.open_store(tmp_path / "s")
    assert fs.config.project == "vecaf"
    assert fs.config.online_store.path == f"{root}/online.db"
    assert fs.config.offline_store.type == "file"
    with pytest.raises(ValueError, match="project"):
        tf.render_feature_store_yaml(tmp_path, project="bad name")


def test_apply_registers_the_entity_and_four_views(store, store_dir: Path):
    assert tf.apply_definitions(store) == ["image_embeddings", "captions", "text_embeddings", "sample_losses"]
    views = {fv.name: fv for fv in store.list_feature_views()}
    assert set(views) == {"image_embeddings", "captions", "text_embeddings", "sample_losses"}
    assert [f.name for f in views["image_embeddings"].features] == ["embedding", "label", "split", "pvm"]
    assert [f.name for f in views["sample_losses"].features] == ["loss", "model_version", "loop"]
    assert views["captions"].batch_source.path == str((store_dir / "data" / "captions").resolve())
    (entity,) = store.list_entities()
    assert (entity.name, entity.join_key) == ("image", "image_id")


def test_bulk_write_then_read_is_exact(store_dir: Path):
    ids = _ids(N)
    emb = _vectors(N)
    labels = np.arange(N) % 10
    path = tf.write_image_embeddings(store_dir, ids, emb, labels=labels, split="train", pvm="pvm-a")
    assert Path(path).parent == (store_dir / "data" / "image_embeddings").resolve()
    got_ids, got, got_labels = tf.read_embeddings(store_dir, pvm="pvm-a", split="train")
    assert list(got_ids) == sorted(ids)
    assert got.dtype == np.float32 and got.shape == (N, D)
    np.testing.assert_array_equal(got, emb)
    np.testing.assert_array_equal(got_labels, labels)

    wanted = [ids[7], ids[250], ids[3]]
    got_ids, got, got_labels = tf.read_embeddings(store_dir, pvm="pvm-a", split="train", ids=wanted)
    assert list(got_ids) == wanted
    np.testing.assert_array_equal(got, emb[[7, 250, 3]])
    np.testing.assert_array_equal(got_labels, labels[[7, 250, 3]])


def test_reads_filter_by_provenance(store_dir: Path):
    ids = _ids(20)
    tf.write_image_embeddings(store_dir, ids, _vectors(20, seed=1), labels=np.zeros(20, int), split="train", pvm="a")
    tf.write_image_embeddings(store_dir, ids, _vectors(20, seed=2), labels=np.ones(20, int), split="train", pvm="b")
    tf.write_image_embeddings(store_dir, ids[:5], _vectors(5, seed=3), labels=np.ones(5, int), split="test", pvm="a")
    np.testing.assert_array_equal(tf.read_embeddings(store_dir, pvm="a", split="train")[1], _vectors(20, seed=1))
    np.testing.assert_array_equal(tf.read_embeddings(store_dir, pvm="b", split="train")[1], _vectors(20, seed=2))
    np.testing.assert_array_equal(tf.read_embeddings(store_dir, pvm="a", split="test")[1], _vectors(5, seed=3))
    everything = tf.read_embeddings(store_dir, pvm="a", split=None)[1]
    np.testing.assert_array_equal(everything[:5], _vectors(5, seed=3))
    np.testing.assert_array_equal(everything[5:], _vectors(20, seed=1)[5:])
    with pytest.raises(ValueError, match="no image_embeddings rows"):
        tf.read_embeddings(store_dir, pvm="c", split="train")
    with pytest.raises(ValueError, match="2 ids have no image_embeddings"):
        tf.read_embeddings(store_dir, pvm="a", split="test", ids=[ids[0], ids[10], ids[11]])


def test_latest_row_wins_by_event_time_then_write_time(store_dir: Path):
    ids = _ids(10)
    t0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
    first, second, older, tie = (_vectors(10, seed=s) for s in (1, 2, 3, 4))
    kw = {"split": "train", "pvm": "p"}
    tf.write_image_embeddings(store_dir, ids, first, labels=np.zeros(10, int), event_time=t0, **kw)
    later = t0 + timedelta(hours=1)
    tf.write_image_embeddings(store_dir, ids[:4], second[:4], labels=np.ones(4, int), event_time=later, **kw)
    tf.write_image_embeddings(store_dir, ids, older, labels=np.full(10, 2), event_time=t0 - timedelta(hours=1), **kw)
    tf.write_image_embeddings(store_dir, ids[8:], tie[8:], labels=np.full(2, 3), event_time=t0, **kw)
    _, got, labels = tf.read_embeddings(store_dir, pvm="p", split="train")
    np.testing.assert_array_equal(got, np.concatenate([second[:4], first[4:8], tie[8:]]))
    assert labels.tolist() == [1] * 4 + [0] * 4 + [3] * 2


def test_materialize_then_online_lookup_returns_the_written_vectors(store, store_dir: Path):
    ids = _ids(N)
    emb = _vectors(N)
    labels = np.arange(N) % 7
    tf.write_image_embeddings(store_dir, ids, emb, labels=labels, split="train", pvm="pvm-a")
    assert tf.materialize_incremental(store) == ["image_embeddings"]

    selected = [ids[5], ids[123], ids[299], "never-written"]
    out = tf.online_features(store, selected, features=["image_embeddings:embedding", "image_embeddings:label",
                                                        "image_embeddings:pvm"])
    assert out["image_id"] == selected
    for row, i in enumerate([5, 123, 299]):
        np.testing.assert_array_equal(np.asarray(out["image_embeddings__embedding"][row], np.float32), emb[i])
        assert out["image_embeddings__label"][row] == labels[i]
        assert out["image_embeddings__pvm"][row] == "pvm-a"
    assert out["image_embeddings__embedding"][3] is None


def test_incremental_materialize_takes_only_rows_after_the_previous_end(store, store_dir: Path):
    now = datetime.now(timezone.utc)
    ids = _ids(30)
    base, newer, backfill = _vectors(30, seed=1), _vectors(30, seed=2), _vectors(30, seed=3)
    kw = {"labels": np.zeros(10, int), "split": "train", "pvm": "p"}
    tf.write_image_embeddings(store_dir, ids, base, labels=np.zeros(30, int), split="train", pvm="p",
                              event_time=now - timedelta(hours=2))
    first_end = now - timedelta(minutes=30)
    tf.materialize_incremental(store, end_date=first_end)

    tf.write_image_embeddings(store_dir, ids[:10], newer[:10], event_time=now - timedelta(minutes=10), **kw)
    tf.write_image_embeddings(store_dir, ids[10:20], backfill[10:20], event_time=now - timedelta(hours=1), **kw)
    new_ids = _ids(5, prefix="new")
    tf.write_image_embeddings(store_dir, new_ids, _vectors(5, seed=4), labels=np.zeros(5, int), split="train",
                              pvm="p", event_time=now - timedelta(minutes=5))
    tf.materialize_incremental(store, end_date=now)

    out = tf.online_features(store, ids + new_ids, features=["image_embeddings:embedding"])
    online = np.asarray(out["image_embeddings__embedding"], np.float32)
    np.testing.assert_array_equal(online[:10], newer[:10])
    np.testing.assert_array_equal(online[10:20], base[10:20])  # event time before the previous end: not taken
    np.testing.assert_array_equal(online[20:30], base[20:30])
    np.testing.assert_array_equal(online[30:], _vectors(5, seed=4))
    np.testing.assert_array_equal(tf.read_embeddings(store_dir, pvm="p", split="train", ids=ids[10:20])[1],
                                  backfill[10:20])

    (view,) = [fv for fv in store.list_feature_views() if fv.name == "image_embeddings"]
    intervals = sorted(view.materialization_intervals)
    assert len(intervals) == 2
    assert intervals[1][0] == intervals[0][1]
    assert abs(intervals[0][1] - first_end) < timedelta(seconds=1)


def test_all_four_views_reach_the_online_store(store, store_dir: Path):
    ids = _ids(6)
    t = datetime.now(timezone.utc) - timedelta(minutes=1)
    tf.write_image_embeddings(store_dir, ids, _vectors(6), labels=np.arange(6), split="train", pvm="p", event_time=t)
    tf.write_captions(store_dir, ids, [f"a photo of {i}" for i in ids], captioner="cap", prompt_suffix=" snowy",
                      event_time=t)
    tf.write_text_embeddings(store_dir, ids, _vectors(6, d=8, seed=5), encoder="enc", prompt_suffix=" snowy",
                             event_time=t)
    losses_1 = np.linspace(0.1, 0.6, 6)
    losses_2 = np.linspace(1.0, 2.0, 6)
    tf.write_sample_losses(store_dir, ids, losses_1, model_version="v1", loop=1, event_time=t - timedelta(seconds=30))
    tf.write_sample_losses(store_dir, ids, losses_2, model_version="v1", loop=2, event_time=t)
    assert tf.materialize_incremental(store) == ["image_embeddings", "captions", "text_embeddings", "sample_losses"]
    out = tf.online_features(store, [ids[2]])
    assert out["captions__caption"] == [f"a photo of {ids[2]}"]
    assert out["captions__prompt_suffix"] == [" snowy"]
    assert out["text_embeddings__encoder"] == ["enc"]
    np.testing.assert_array_equal(np.asarray(out["text_embeddings__embedding"][0], np.float32),
                                  _vectors(6, d=8, seed=5)[2])
    assert out["sample_losses__loop"] == [2] and out["sample_losses__model_version"] == ["v1"]
    assert out["sample_losses__loss"][0] == pytest.approx(np.float32(losses_2[2]))

    _, loop1 = tf.read_losses(store_dir, model_version="v1", loop=1)
    np.testing.assert_array_equal(loop1, losses_1.astype(np.float32))
    _, latest = tf.read_losses(store_dir, model_version="v1")
    np.testing.assert_array_equal(latest, losses_2.astype(np.float32))
    got_ids, texts = tf.read_captions(store_dir, captioner="cap", ids=[ids[4], ids[0]])
    assert list(got_ids) == [ids[4], ids[0]] and texts == [f"a photo of {ids[4]}", f"a photo of {ids[0]}"]
    _, temb = tf.read_text_embeddings(store_dir, encoder="enc", prompt_suffix=" snowy")
    np.testing.assert_array_equal(temb, _vectors(6, d=8, seed=5))


def test_materialize_skips_empty_views_and_checks_its_arguments(store, store_dir: Path):
    assert tf.materialize_incremental(store) == []
    tf.write_sample_losses(store_dir, _ids(3), np.ones(3), model_version="v", loop=0)
    assert tf.materialize_incremental(store) == ["sample_losses"]
    with pytest.raises(ValueError, match="timezone-aware"):
        tf.materialize_incremental(store, end_date=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="not registered"):
        tf.materialize_incremental(store, views=["nope"])
    with pytest.raises(ValueError, match="unknown feature reference"):
        tf.online_features(store, ["a"], features=["image_embeddings"])
    with pytest.raises(ValueError, match="unknown feature reference"):
        tf.online_features(store, ["a"], features=["image_embeddings:colour"])


def test_content_key_is_sha256_of_the_json_triple():
    h = hashlib.sha256(b"pixels").hexdigest()
    assert tf.content_hash(b"pixels") == h
    assert tf.content_hash("caption") == hashlib.sha256("caption".encode()).hexdigest()
    expected = hashlib.sha256(json.dumps([h, "blip", " snowy"]).encode()).hexdigest()
    assert tf.content_key(h, "blip", " snowy") == expected
    assert tf.content_key(h, "blip") != tf.content_key(h, "blip", " snowy")
    assert tf.content_key("a|b", "c") != tf.content_key("a", "b|c")
    with pytest.raises(ValueError, match="model_name"):
        tf.content_key(h, "")
    with pytest.raises(ValueError, match="image_bytes_hash"):
        tf.content_key(None, "m")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bytes or str"):
        tf.content_hash(3)  # type: ignore[arg-type]


def test_cached_ids_reports_ids_already_stored_for_that_content_and_model(store_dir: Path):
    ids = _ids(10)
    hashes = [tf.content_hash(f"pixels of {i}") for i in ids]
    assert not tf.cached_ids(store_dir, "image_embeddings", ids, hashes, model_name="p").any()
    tf.write_image_embeddings(store_dir, ids[:6], _vectors(6), labels=np.zeros(6, int), split="train", pvm="p",
                              content_hashes=hashes[:6])
    tf.write_image_embeddings(store_dir, ids[6:8], _vectors(2), labels=np.zeros(2, int), split="train", pvm="p")
    mask = tf.cached_ids(store_dir, "image_embeddings", ids, hashes, model_name="p")
    np.testing.assert_array_equal(mask, [True] * 6 + [False] * 4)
    assert not tf.cached_ids(store_dir, "image_embeddings", ids, hashes, model_name="other").any()
    changed = [tf.content_hash("edited")] + hashes[1:]
    assert tf.cached_ids(store_dir, "image_embeddings", ids, changed, model_name="p").tolist()[:2] == [False, True]

    tf.write_captions(store_dir, ids[:3], ["x", "y", "z"], captioner="cap", prompt_suffix=" snowy",
                      content_hashes=hashes[:3])
    np.testing.assert_array_equal(
        tf.cached_ids(store_dir, "captions", ids[:4], hashes[:4], model_name="cap", prompt=" snowy"),
        [True, True, True, False],
    )
    assert not tf.cached_ids(store_dir, "captions", ids[:4], hashes[:4], model_name="cap").any()
    with pytest.raises(ValueError, match="cached_ids works on"):
        tf.cached_ids(store_dir, "sample_losses", ids, hashes, model_name="p")
    with pytest.raises(ValueError, match="content_hashes has 9 entries"):
        tf.cached_ids(store_dir, "captions", ids, hashes[:9], model_name="cap")


def test_integer_ids_are_stored_as_decimal_strings(store_dir: Path):
    tf.write_image_embeddings(store_dir, np.array([3, 10, 7]), _vectors(3), labels=[0, 1, 2], split="t", pvm="p")
    got_ids, _, labels = tf.read_embeddings(store_dir, pvm="p", split="t", ids=[7, 3])
    assert list(got_ids) == ["7", "3"] and labels.tolist() == [2, 0]


_GOOD = {"labels": np.zeros(4, int), "split": "train", "pvm": "p"}
_BAD_EMBEDDINGS = [
    ("ids and rows", dict(ids=_ids(5)), "has 4 rows but ids has 5"),
    ("NaN", dict(embeddings=np.where(np.eye(4, 3, dtype=bool), np.nan, 0).astype(np.float32)), "NaN or inf in 3 rows"),
    ("inf", dict(embeddings=np.full((4, 3), np.inf, np.float32)), "NaN or inf"),
    ("float64", dict(embeddings=np.zeros((4, 3))), "must be float32, got dtype float64"),
    ("1-D", dict(embeddings=np.zeros(4, np.float32)), r"shape \(N, D\)"),
    ("3-D", dict(embeddings=np.zeros((4, 3, 1), np.float32)), r"shape \(N, D\)"),
    ("D=0", dict(embeddings=np.zeros((4, 0), np.float32)), "D = 0"),
    ("list", dict(embeddings=[[0.0] * 3] * 4), "numpy array"),
    ("labels length", dict(labels=np.zeros(3, int)), r"labels must have shape \(4,\)"),
    ("labels float", dict(labels=np.zeros(4)), "labels must be integers"),
    ("duplicate ids", dict(ids=["a", "b", "a", "c"]), "'a' repeats"),
    ("empty id", dict(ids=["a", "", "b", "c"]), "empty strings"),
    ("float ids", dict(ids=[1.0, 2.0, 3.0, 4.0]), "strings or integers"),
    ("one string", dict(ids="abcd"), "not a single string"),
    ("no ids", dict(ids=[], embeddings=np.zeros((0, 3), np.float32), labels=np.zeros(0, int)), "ids is empty"),
    ("empty split", dict(split=""), "split must be a non-empty string"),
    ("split length", dict(split=["a", "b"]), "split has 2 entries"),
    ("empty pvm", dict(pvm=""), "pvm must be a non-empty string"),
    ("hashes length", dict(content_hashes=["h"] * 3), "content_hashes has 3 entries"),
    ("naive time", dict(event_time=datetime(2030, 1, 1)), "timezone-aware"),
]


@pytest.mark.parametrize(("case", "change", "message"), _BAD_EMBEDDINGS, ids=[c[0] for c in _BAD_EMBEDDINGS])
def test_bad_image_embeddings_raise_and_write_nothing(store_dir: Path, case: str, change: dict, message: str):
    args = {"ids": _ids(4), "embeddings": np.zeros((4, 3), np.float32), **_GOOD, **change}
    with pytest.raises(ValueError, match=message):
        tf.write_image_embeddings(store_dir, args.pop("ids"), args.pop("embeddings"), **args)
    assert _files(store_dir) == []


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d: tf.write_sample_losses(d, _ids(3), np.array([0.1, np.nan, 0.2]), model_version="v", loop=1),
         "NaN or inf at 1 rows, first id 'img-0001'"),
        (lambda d: tf.write_sample_losses(d, _ids(3), np.array([1, 2, 3]), model_version="v", loop=1),
         "losses must be floating point"),
        (lambda d: tf.write_sample_losses(d, _ids(3), np.ones(2), model_version="v", loop=1), r"shape \(3,\)"),
        (lambda d: tf.write_sample_losses(d, _ids(3), np.ones(3), model_version="v", loop=-1), "loop must be >= 0"),
        (lambda d: tf.write_sample_losses(d, _ids(3), np.ones(3), model_version="v", loop=True), "loop must be an int"),
        (lambda d: tf.write_sample_losses(d, _ids(3), np.ones(3), model_version="", loop=0), "model_version"),
        (lambda d: tf.write_captions(d, _ids(2), ["ok", None], captioner="c"), "captions must hold non-empty"),
        (lambda d: tf.write_captions(d, _ids(2), ["ok"], captioner="c"), "captions has 1 entries"),
        (lambda d: tf.write_captions(d, _ids(2), ["a", "b"], captioner="c", prompt_suffix=None), "prompt_suffix"),
        (lambda d: tf.write_text_embeddings(d, _ids(2), np.ones((2, 3), np.float16), encoder="e"), "float32"),
        (lambda d: tf.write_text_embeddings(d, _ids(2), np.ones((2, 3), np.float32), encoder=""), "encoder"),
    ],
    ids=["loss-nan", "loss-int", "loss-length", "loop-negative", "loop-bool", "no-version", "caption-none",
         "caption-length", "suffix-none", "text-float16", "no-encoder"],
)
def test_bad_other_writes_raise_and_write_nothing(store_dir: Path, call, message: str):
    with pytest.raises(ValueError, match=message):
        call(store_dir)
    assert _files(store_dir) == []


def test_reading_vectors_of_different_lengths_or_an_empty_view_raises(store_dir: Path):
    with pytest.raises(ValueError, match="no image_embeddings stored"):
        tf.read_embeddings(store_dir, pvm="p", split="train")
    tf.write_image_embeddings(store_dir, ["a"], _vectors(1, d=4), labels=[0], split="train", pvm="p")
    tf.write_image_embeddings(store_dir, ["b"], _vectors(1, d=5), labels=[0], split="train", pvm="p")
    with pytest.raises(ValueError, match="differ in length"):
        tf.read_embeddings(store_dir, pvm="p", split="train")


def test_prefect_tasks_wrap_the_plain_functions():
    pairs = [
        (tf.write_image_embeddings_task, "write-image-embeddings", tf.write_image_embeddings),
        (tf.write_captions_task, "write-captions", tf.write_captions),
        (tf.write_text_embeddings_task, "write-text-embeddings", tf.write_text_embeddings),
        (tf.write_sample_losses_task, "write-sample-losses", tf.write_sample_losses),
        (tf.find_cached_ids_task, "find-cached-ids", tf.cached_ids),
        (tf.feast_apply_task, "feast-apply", tf.apply_definitions),
        (tf.feast_materialize_task, "feast-materialize-incremental", tf.materialize_incremental),
        (tf.online_features_task, "online-features", tf.online_features),
    ]
    for task_obj, name, fn in pairs:
        assert (task_obj.name, task_obj.fn) == (name, fn)
    assert tf.feast_materialize_task.retries == 2 and tf.write_image_embeddings_task.retries == 0
