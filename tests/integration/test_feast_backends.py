"""The Feast store from the user's configuration, on real servers: Redis, S3 (rclone), PostgreSQL.

Checks: ``settings.feast`` (online store Redis, registry SQL, offline Parquet under ``s3://``) and a user's
``feature_store.yaml`` become a JSON-able store spec; vectors written through it come back equal from the
offline Parquet and, after materialization, from the online store; the keys, objects and tables are where
the configuration says (asked of Redis, S3 and PostgreSQL themselves); a user's file is never rewritten;
unknown store types and unreachable servers are clear errors before any work starts.

Redis keys are scoped by a random project name (Feast suffixes every key with it) and deleted after each
test; PostgreSQL databases are created and dropped per test; S3 objects go under a random prefix.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from tasks import features as tf
from vecaf.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::FutureWarning")]

REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES = "postgresql://postgres@127.0.0.1:5432"
N = 40
D = 8


def _ids(n: int) -> list[str]:
    return [f"img-{i:03d}" for i in range(n)]


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def _settings(tmp_path: Path, **feast) -> Settings:
    return Settings(stack={"state_dir": tmp_path / "state"}, feast=feast)


def _redis_keys(client: redis.Redis, project: str) -> list[bytes]:
    """Feast's Redis keys of one project: serialized entity key + project name."""
    return list(client.scan_iter(match=b"*" + project.encode(), count=1000))


@pytest.fixture()
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:  # the machine runs Redis for CI; say so when it does not
        pytest.fail(f"Redis at {REDIS_URL} is not running: {exc}")
    yield client
    client.close()


@pytest.fixture()
def project(redis_client: redis.Redis) -> Iterator[str]:
    """A fresh Feast project name; its Redis keys are deleted after the test."""
    name = f"t{uuid.uuid4().hex[:12]}"
    yield name
    keys = _redis_keys(redis_client, name)
    if keys:
        redis_client.delete(*keys)


@pytest.fixture()
def postgres_db() -> Iterator[str]:
    """A new, empty PostgreSQL database (dropped after the test); yields its URL."""
    import psycopg

    name = f"feast_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"{POSTGRES}/{name}"
    with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _round_trip(spec: dict, project: str | None = None) -> tuple[list[str], np.ndarray]:
    """Apply, write N embeddings, materialize, and check offline and online reads return them."""
    store = tf.open_store(spec)
    assert tf.apply_definitions(store) == ["image_embeddings", "captions", "text_embeddings", "sample_losses"]
    ids, emb = _ids(N), _vectors(N)
    tf.write_image_embeddings(spec, ids, emb, labels=np.arange(N) % 3, split="train", pvm="p")
    np.testing.assert_array_equal(tf.read_embeddings(spec, pvm="p", split="train")[1], emb)
    assert tf.materialize_incremental(store) == ["image_embeddings"]
    out = tf.online_features(store, [ids[3], ids[17], "never-written"], features=["image_embeddings:embedding"])
    got = out["image_embeddings__embedding"]
    np.testing.assert_array_equal(np.asarray(got[0], np.float32), emb[3])
    np.testing.assert_array_equal(np.asarray(got[1], np.float32), emb[17])
    assert got[2] is None
    return ids, emb


# --------------------------------------------------------------------------------------------------
# Redis online store


@pytest.mark.slow
def test_redis_online_store_from_settings(tmp_path: Path, project: str, redis_client: redis.Redis):
    settings = _settings(tmp_path, project=project, online_store="redis", redis_url=REDIS_URL)
    spec = tf.store_spec(settings)
    assert json.loads(json.dumps(spec)) == spec  # travels as a task parameter
    assert "type: redis" in spec["feature_store_yaml"] and "127.0.0.1:6379,db=0" in spec["feature_store_yaml"]
    assert _redis_keys(redis_client, project) == []

    ids, _ = _round_trip(spec)

    keys = _redis_keys(redis_client, project)
    assert len(keys) == N  # one hash per image, suffixed with the project
    assert all(b"_ts:image_embeddings" in redis_client.hkeys(k) for k in keys)
    feast_dir = tmp_path / "state" / "feast"
    assert not (feast_dir / "online.db").exists()  # no SQLite stand-in
    assert not (feast_dir / "feature_store.yaml").exists()  # a spec is used, never written out


# --------------------------------------------------------------------------------------------------
# A user's feature_store.yaml


def _user_yaml(folder: Path, project: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "feature_store.yaml"
    path.write_text(
        "# my own store: Redis online, file registry next to this file\n"
        f"project: {project}\n"
        "provider: local\n"
        "registry: registry/registry.db\n"
        "online_store:\n"
        "  type: redis\n"
        "  connection_string: 127.0.0.1:6379,db=0\n"
        "offline_store:\n"
        "  type: file\n"
        "entity_key_serialization_version: 3\n"
    )
    return path


@pytest.mark.slow
def test_a_users_feature_store_yaml_is_used_as_is(tmp_path: Path, project: str, redis_client: redis.Redis):
    path = _user_yaml(tmp_path / "repo", project)
    before = path.read_bytes()
    spec = tf.store_spec(_settings(tmp_path, repo_config=path))
    assert spec["feature_store_yaml"] == before.decode() and spec["repo_dir"] == str(path.parent)
    first, second = tf.open_store(spec), tf.open_store(spec)
    assert path.read_bytes() == before
    assert first.config.online_store.type == second.config.online_store.type == "redis"

    _round_trip(spec)
    assert len(_redis_keys(redis_client, project)) == N
    assert (tmp_path / "repo" / "registry" / "registry.db").is_file()  # relative to the file's folder
    assert path.read_bytes() == before


@pytest.mark.slow
def test_a_store_folder_keeps_the_users_feature_store_yaml(tmp_path: Path, project: str, redis_client: redis.Redis):
    path = _user_yaml(tmp_path / "store", project)
    before = path.read_bytes()
    for _ in range(2):
        store = tf.open_store(path.parent)
        assert store.config.online_store.type == "redis"  # not replaced by the SQLite default
    assert path.read_bytes() == before

    ids = _ids(5)
    emb = _vectors(5, seed=3)
    tf.apply_definitions(path.parent)
    tf.write_image_embeddings(path.parent, ids, emb, labels=np.zeros(5, int), split="train", pvm="p")
    assert tf.materialize_incremental(path.parent) == ["image_embeddings"]
    assert len(_redis_keys(redis_client, project)) == 5
    got = tf.online_features(path.parent, ids[:1], features=["image_embeddings:embedding"])
    np.testing.assert_array_equal(np.asarray(got["image_embeddings__embedding"][0], np.float32), emb[0])
    assert path.read_bytes() == before


# --------------------------------------------------------------------------------------------------
# Offline Parquet on S3


@pytest.mark.slow
def test_offline_parquet_and_registry_on_s3_land_in_the_bucket(stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for key, value in stack.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # a local folder literally named "s3:" would appear here
    root = f"feast-{uuid.uuid4().hex[:10]}"
    prefix = f"{root}/data"
    settings = _settings(tmp_path, offline_path=f"s3://{stack.bucket}/{prefix}",
                         registry=f"s3://{stack.bucket}/{root}/registry.pb")
    spec = tf.store_spec(settings)
    assert spec["offline_path"] == f"s3://{stack.bucket}/{prefix}"

    ids, emb = _ids(N), _vectors(N, seed=1)
    hashes = [tf.content_hash(i) for i in ids]
    written = tf.write_image_embeddings(spec, ids, emb, labels=np.arange(N), split="train", pvm="p",
                                        content_hashes=hashes)
    tf.write_captions(spec, ids[:4], ["a", "b", "c", "d"], captioner="cap")
    assert written.startswith(f"s3://{stack.bucket}/{prefix}/image_embeddings/part-")

    client = stack.s3_client()
    listed = client.list_objects_v2(Bucket=stack.bucket, Prefix=prefix + "/")
    keys = sorted(o["Key"] for o in listed.get("Contents", []))
    assert [k.rsplit("/", 2)[1] for k in keys] == ["captions", "image_embeddings"]
    assert written == f"s3://{stack.bucket}/{keys[1]}"
    assert not list(tmp_path.rglob("s3:")) and not (Path.cwd() / "s3:").exists()

    got_ids, got, labels = tf.read_embeddings(spec, pvm="p", split="train")
    assert list(got_ids) == ids
    np.testing.assert_array_equal(got, emb)
    np.testing.assert_array_equal(labels, np.arange(N))
    assert tf.read_captions(spec, captioner="cap", ids=[ids[2]])[1] == ["c"]
    assert tf.cached_ids(spec, "image_embeddings", ids, hashes, model_name="p").all()

    # Feast itself reads the same objects: materialize from s3:// into the (SQLite) online store
    store = tf.open_store(spec)
    tf.apply_definitions(store)
    (view,) = [v for v in store.list_feature_views() if v.name == "image_embeddings"]
    assert view.batch_source.path == f"s3://{stack.bucket}/{prefix}/image_embeddings"
    assert tf.materialize_incremental(store) == ["image_embeddings", "captions"]
    out = tf.online_features(store, [ids[7]], features=["image_embeddings:embedding", "captions:caption"])
    np.testing.assert_array_equal(np.asarray(out["image_embeddings__embedding"][0], np.float32), emb[7])
    assert out["captions__caption"] == [None]  # ids[7] has no caption
    assert not list(tmp_path.rglob("s3:"))
    registry = client.head_object(Bucket=stack.bucket, Key=f"{root}/registry.pb")  # the file registry, in the bucket
    assert registry["ContentLength"] > 0
    assert not (tmp_path / "state" / "feast" / "registry.db").exists()


# --------------------------------------------------------------------------------------------------
# SQL registry on PostgreSQL


@pytest.mark.slow
def test_sql_registry_on_postgres(tmp_path: Path, postgres_db: str):
    import psycopg

    spec = tf.store_spec(_settings(tmp_path, project=f"t{uuid.uuid4().hex[:8]}", registry=postgres_db))
    assert "registry_type: sql" in spec["feature_store_yaml"]
    assert "postgresql+psycopg://" in spec["feature_store_yaml"]  # the installed driver
    _round_trip(spec)
    assert not (tmp_path / "state" / "feast" / "registry.db").exists()

    with psycopg.connect(postgres_db) as conn:
        views = conn.execute("SELECT feature_view_name FROM feature_views ORDER BY 1").fetchall()
    assert [v[0] for v in views] == ["captions", "image_embeddings", "sample_losses", "text_embeddings"]
    reopened = tf.open_store(spec)  # a second process would see the same registry
    assert len(reopened.list_feature_views()) == 4


# --------------------------------------------------------------------------------------------------
# Bad input: clear errors before any work starts


@pytest.mark.parametrize(
    "yaml_line, message",
    [
        ("online_store:\n  type: cassandra\n", r"online_store.type 'cassandra' .* \['redis', 'sqlite'\]"),
        ("offline_store:\n  type: bigquery\n", r"offline_store.type 'bigquery' .* \['dask', 'file'\]"),
        ("registry:\n  registry_type: snowflake.registry\n  path: x\n",
         r"registry.registry_type 'snowflake.registry' .* \['file', 'sql'\]"),
    ],
    ids=["online", "offline", "registry"],
)
def test_unknown_store_types_are_named_with_the_allowed_values(tmp_path: Path, yaml_line: str, message: str):
    path = tmp_path / "repo" / "feature_store.yaml"
    path.parent.mkdir()
    path.write_text(f"project: p\nprovider: local\n{yaml_line}")
    before = path.read_bytes()
    with pytest.raises(ValueError, match=message):
        tf.store_spec(_settings(tmp_path, repo_config=path))
    with pytest.raises(ValueError, match=message):
        tf.open_store(path.parent)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["feature_store.yaml"]


def test_bad_feast_settings_are_named(tmp_path: Path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"feast.online_store\n.*sqlite\|redis"):
        _settings(tmp_path, online_store="memcached")
    with pytest.raises(ValueError, match="feast.redis_url is not set"):
        tf.store_spec(_settings(tmp_path, online_store="redis"))
    with pytest.raises(ValueError, match="feast.redis_url must start with redis://"):
        tf.store_spec(_settings(tmp_path, online_store="redis", redis_url="http://127.0.0.1:6379"))
    with pytest.raises(ValueError, match="feast.registry must be a file path, an s3:// URI or a SQLAlchemy URL"):
        tf.store_spec(_settings(tmp_path, registry="gs://bucket/registry.db"))
    with pytest.raises(ValueError, match="feast.offline_path must be a folder or s3://"):
        tf.store_spec(_settings(tmp_path, offline_path="gs://bucket/data"))
    user = _user_yaml(tmp_path / "repo", "p")
    with pytest.raises(ValueError, match=r"feast.repo_config .* is used as is; remove feast.redis_url"):
        tf.store_spec(_settings(tmp_path, repo_config=user, redis_url=REDIS_URL))
    with pytest.raises(FileNotFoundError, match="feast.repo_config .*missing.yaml does not exist"):
        tf.store_spec(_settings(tmp_path, repo_config=tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="holds only the offline Parquet"):
        tf.open_store("s3://bucket/feast")


def test_unreachable_redis_names_redis_and_the_url(tmp_path: Path, free_port: Callable[[], int]):
    port = free_port()
    spec = tf.store_spec(_settings(tmp_path, online_store="redis", redis_url=f"redis://127.0.0.1:{port}/2"))
    with pytest.raises(ConnectionError, match=rf"Redis at redis://127.0.0.1:{port}/2 does not answer"):
        tf.open_store(spec)
    assert not (tmp_path / "state").exists()  # nothing was written before the check


def test_unreachable_sql_registry_names_the_registry_and_the_url(tmp_path: Path, free_port: Callable[[], int]):
    port = free_port()
    spec = tf.store_spec(_settings(tmp_path, registry=f"postgresql://postgres:pw@127.0.0.1:{port}/nope"))
    with pytest.raises(ConnectionError, match=rf"SQL registry at postgresql\+psycopg://postgres:\*\*\*@127.0.0.1:{port}"):
        tf.open_store(spec)


# --------------------------------------------------------------------------------------------------
# The pipeline's own flows on the user's store: Redis online, Parquet on S3, the user's feature_store.yaml


@pytest.mark.slow
def test_flows_write_and_serve_through_the_users_redis_and_s3_store(
    stack, tmp_path: Path, project: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
):
    """caption -> featurize -> finetune, in this process, with only the settings naming the store.

    The S3 keys are not in the AWS variables (removed) but in ``VECAF_SERVICES__S3_*``: the Parquet I/O finds
    them through the services settings where the store is opened, as a worker given only those would.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.caption import caption
    from flows.featurize import featurize
    from flows.finetune import finetune
    from flows.params import DataParams, ModelParams, RegistryParams, TrainingParams
    from flows.runtime import runtime
    from tasks.embeddings import feature_keys

    for key, value in stack.env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("VECAF_SERVICES__S3_ACCESS_KEY", stack.access_key)
    monkeypatch.setenv("VECAF_SERVICES__S3_SECRET_KEY", stack.secret_key)
    state = tmp_path / "state"
    monkeypatch.setenv("VECAF_STACK__STATE_DIR", str(state))
    monkeypatch.chdir(tmp_path)
    user = _user_yaml(tmp_path / "repo", project)
    before = user.read_bytes()
    prefix = f"feast-{uuid.uuid4().hex[:10]}/data"
    monkeypatch.setenv("VECAF_FEAST__REPO_CONFIG", str(user))
    monkeypatch.setenv("VECAF_FEAST__OFFLINE_PATH", f"s3://{stack.bucket}/{prefix}")

    data = DataParams(dataset="digits", pool_size=60, test_size=30, image_size=32, shard_size=30)
    training = TrainingParams(ratio=0.05, loops=2, batch_budget=4, batch_size=8, lr=0.05, init="base")
    registry = RegistryParams(experiment="vecaf-test-feast", model_name=f"vecaf-test-feast-{project}")
    with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api_url}):
        captioned = caption(data=data)
        featurized = featurize(data=data)
        tuned = finetune(data=data, training=training, registry=registry)
    assert captioned["new"] == 60 and len(captioned["shards"]) == 2
    assert featurized["image"]["new"] == 90 and featurized["text"]["new"] == 60
    assert featurized["materialized"] == ["image_embeddings", "captions", "text_embeddings"]

    spec = runtime().feature_store
    assert spec["offline_path"] == f"s3://{stack.bucket}/{prefix}" and spec["s3"]["keys"] == "services"
    listed = stack.s3_client().list_objects_v2(Bucket=stack.bucket, Prefix=prefix + "/")["Contents"]
    files: dict[str, int] = {}
    for obj in listed:
        view = obj["Key"][len(prefix) + 1 :].split("/")[0]
        files[view] = files.get(view, 0) + 1
    # one Parquet object per shard (2 pool + 1 test image shards), per loop for the losses
    assert files == {"captions": 2, "image_embeddings": 3, "text_embeddings": 2, "sample_losses": 2}

    keys = feature_keys(ModelParams(), data, None)
    pool_ids, pool_emb, _ = tf.read_embeddings(spec, pvm=keys.pvm, split=data.train_split)
    test_ids, _, _ = tf.read_embeddings(spec, pvm=keys.pvm, split=data.test_split)
    _, captions = tf.read_captions(spec, captioner=keys.captioner, ids=pool_ids)
    _, losses = tf.read_losses(spec, model_version=tuned["run_id"], loop=2, ids=pool_ids)
    assert len(pool_ids) == 60 and len(test_ids) == 30

    stored = _redis_keys(redis_client, project)
    assert len(stored) == len(set(pool_ids) | set(test_ids))  # one hash per image, in the user's Redis
    fields = set().union(*(redis_client.hkeys(k) for k in stored))
    assert {b"_ts:image_embeddings", b"_ts:captions", b"_ts:text_embeddings", b"_ts:sample_losses"} <= fields
    wanted = [str(pool_ids[5]), str(pool_ids[41])]
    online = tf.online_features(
        spec, wanted, features=["image_embeddings:embedding", "captions:caption", "sample_losses:loss"]
    )
    np.testing.assert_array_equal(np.asarray(online["image_embeddings__embedding"], np.float32), pool_emb[[5, 41]])
    assert online["captions__caption"] == [captions[5], captions[41]]
    np.testing.assert_allclose(online["sample_losses__loss"], losses[[5, 41]], rtol=1e-6)

    assert user.read_bytes() == before
    assert (tmp_path / "repo" / "registry" / "registry.db").is_file()
    feast_dir = state / "feast"
    assert not (feast_dir / "online.db").exists() and not (feast_dir / "feature_store.yaml").exists()
    assert not list(tmp_path.rglob("s3:")) and not list(feast_dir.rglob("*.parquet"))


def test_a_flow_with_an_unknown_store_type_fails_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """runtime() is the first call of every flow: a bad Feast config stops it there, nothing written."""
    from flows.runtime import runtime

    path = tmp_path / "repo" / "feature_store.yaml"
    path.parent.mkdir()
    path.write_text("project: p\nprovider: local\nonline_store:\n  type: dynamodb\n")
    before = path.read_bytes()
    monkeypatch.setenv("VECAF_STACK__STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("VECAF_FEAST__REPO_CONFIG", str(path))
    with pytest.raises(ValueError, match=r"online_store.type 'dynamodb' is not supported .* \['redis', 'sqlite'\]"):
        runtime()
    assert path.read_bytes() == before and not (tmp_path / "state").exists()


def test_the_store_folders_own_feature_store_yaml_is_the_default_spec(tmp_path: Path):
    """No feast.* field set: a feature_store.yaml already in stack.feast_dir is used as is; fields win over it."""
    folder = tmp_path / "state" / "feast"
    assert "type: sqlite" in tf.store_spec(_settings(tmp_path))["feature_store_yaml"]  # nothing there: the default
    path = _user_yaml(folder, "mine")
    before = path.read_bytes()
    spec = tf.store_spec(_settings(tmp_path))
    assert spec["feature_store_yaml"] == before.decode() and spec["repo_dir"] == str(folder.resolve())
    rendered = tf.store_spec(_settings(tmp_path, online_store="redis", redis_url=REDIS_URL))["feature_store_yaml"]
    assert "project: vecaf" in rendered and "registry.db" in rendered
    assert path.read_bytes() == before
