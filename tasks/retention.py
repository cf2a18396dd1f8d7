"""Retention: what ``vecaf gc`` deletes, rotates and compacts, planned first and applied only when asked.

Each small run leaves about 14 MB of work files, 14 MB of S3 objects and 11 MB of Feast Parquet; nothing
pruned them. A plan (:func:`plan_gc`) lists, without changing anything:

- MLflow runs: per experiment, the top-level runs beyond the ``keep_runs`` most recent that started more than
  ``older_than_days`` ago, are not RUNNING, and are not the source of a model version that stays. Their
  nested runs (one per loop) go with them; their artifacts are deleted through the tracking server (which
  proxies the bucket), then the run is deleted.
- Model versions: per registered model, the versions beyond the ``keep_versions`` newest, created more than
  ``older_than_days`` ago, that hold no alias (``champion``, ``challenger``... are never deleted). With a
  version go its logged model and that model's artifacts, unless another version that stays uses them.
- Work folders ``<state_dir>/work/runs/<run id>``: those of runs that FAILED or were KILLED, of runs that are
  deleted or unknown to MLflow, and of runs this plan deletes.
- Log files ``<state_dir>/logs/*.log`` larger than ``log_max_bytes``: rotated by copy and truncate
  (``name.log`` -> ``name.log.1`` -> ... -> ``name.log.<log_keep>``), because the servers keep them open in
  append mode (a rename would leave them writing to the old file).
- Run prefixes in the bucket ``s3://<bucket>/<prefix>runs/<run key>/`` (loop checkpoints, picks, records, the
  model; ``tasks.storage``), by the rules of the work folders applied to the MLflow runs tagged with that
  ``run_key`` (several runs share a key when a rerun resumed): a prefix goes when every such run is deleted by
  this plan, already deleted, FAILED or KILLED, or when no run names it, *and* its newest object is older than
  ``older_than_days`` (so a failed run stays resumable that long). Never: a prefix of a RUNNING run, of a
  FINISHED run that stays, of the run behind a model version that stays (the champion's above all), of a run
  in an experiment outside ``experiments``.
- Feast offline Parquet ``<store>/data/<view>/part-*.parquet``: a view with more than one file is rewritten
  as one file with the same rows (the "latest row per id" reads give the same answers), then the files read
  are removed; a file written meanwhile is left alone.

:func:`apply_gc` carries a plan out. MLflow's deletions are soft on the server (the rows stay marked
deleted, as ``mlflow gc`` expects); the artifacts are removed from the bucket at once.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

DAY_MS = 86_400_000
PARENT_TAG = "mlflow.parentRunId"


@dataclass
class GcPlan:
    """What ``vecaf gc`` would do (see the module docstring).

    Attributes:
        runs: top-level MLflow runs to delete: ``{"run_id", "experiment", "name", "status", "started",
            "children", "artifact_uri"}``.
        versions: model versions to delete: ``{"name", "version", "created", "model_id", "run_id"}``.
        kept_versions: ``"<name>/<version>"`` of versions that stay, with why (alias, among the newest, recent).
        work_dirs: ``{"path", "run_id", "reason", "bytes"}``.
        logs: ``{"path", "bytes"}`` of logs to rotate.
        parquet: ``{"view", "folder", "files", "bytes"}`` of Feast views to compact.
        run_prefixes: ``{"uri", "run_key", "reason", "objects", "bytes", "newest"}`` of bucket run prefixes to
            delete (``newest``: the last-modified time of its newest object, epoch ms).
        kept_prefixes: ``run key -> why`` for the bucket run prefixes that stay.
        kept_version_runs: run ids behind the model versions that stay (their prefixes are never deleted).
        cutoff: the "older than" instant (UTC).
    """

    runs: list[dict[str, Any]] = field(default_factory=list)
    versions: list[dict[str, Any]] = field(default_factory=list)
    kept_versions: dict[str, str] = field(default_factory=dict)
    work_dirs: list[dict[str, Any]] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    parquet: list[dict[str, Any]] = field(default_factory=list)
    run_prefixes: list[dict[str, Any]] = field(default_factory=list)
    kept_prefixes: dict[str, str] = field(default_factory=dict)
    kept_version_runs: set[str] = field(default_factory=set)
    cutoff: str = ""

    def lines(self) -> list[str]:
        """A human-readable listing, one line per item."""
        out = [f"older than: {self.cutoff}"]
        for r in self.runs:
            out.append(
                f"run      {r['run_id']}  {r['experiment']}/{r['name']}  {r['status']}  started {r['started']}"
                f"  (+{len(r['children'])} nested)"
            )
        for v in self.versions:
            out.append(f"version  {v['name']}/{v['version']}  created {v['created']}  run {v['run_id']}")
        for w in self.work_dirs:
            out.append(f"work     {w['path']}  {w['reason']}  {w['bytes'] / 1e6:.1f} MB")
        for log in self.logs:
            out.append(f"log      {log['path']}  {log['bytes'] / 1e6:.1f} MB -> rotate")
        for p in self.parquet:
            out.append(f"parquet  {p['folder']}  {len(p['files'])} files, {p['bytes'] / 1e6:.1f} MB -> 1 file")
        for p in self.run_prefixes:
            out.append(f"bucket   {p['uri']}/  {p['reason']}  {p['objects']} objects, {p['bytes'] / 1e6:.1f} MB")
        return out

    def counts(self) -> dict[str, int]:
        """How many items of each kind."""
        return {
            "runs": len(self.runs),
            "nested_runs": sum(len(r["children"]) for r in self.runs),
            "versions": len(self.versions),
            "work_dirs": len(self.work_dirs),
            "logs": len(self.logs),
            "parquet_views": len(self.parquet),
            "run_prefixes": len(self.run_prefixes),
        }


def _iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _all_runs(client: Any, experiment_id: str) -> list[Any]:
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
            order_by=["attributes.start_time DESC"], page_token=token,
        )  # fmt: skip
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _all_versions(client: Any, name: str) -> list[Any]:
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", max_results=1000, page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            return versions


def plan_mlflow(
    tracking_uri: str,
    *,
    keep_runs: int,
    keep_versions: int,
    older_than_days: float,
    experiments: list[str] | None = None,
    models: list[str] | None = None,
    now_ms: int | None = None,
) -> GcPlan:
    """The MLflow part of the plan: runs and model versions to delete (nothing is changed).

    Args:
        tracking_uri: the MLflow tracking server.
        keep_runs: top-level runs kept per experiment, newest first, whatever their age.
        keep_versions: versions kept per registered model, newest first, whatever their age.
        older_than_days: only what is older than this may be deleted.
        experiments: experiment names to prune (None: every active experiment).
        models: registered model names to prune (None: every registered model).
        now_ms: "now" in epoch milliseconds (tests); None: the clock.

    Raises:
        ValueError: a negative count or age, or an unknown experiment name.
    """
    from tasks.tracking import mlflow_client

    if keep_runs < 0 or keep_versions < 0 or older_than_days < 0:
        raise ValueError(
            f"keep_runs ({keep_runs}), keep_versions ({keep_versions}) and older_than_days ({older_than_days}) "
            "must not be negative"
        )
    now = int(time.time() * 1000) if now_ms is None else now_ms
    cutoff = now - int(older_than_days * DAY_MS)
    plan = GcPlan(cutoff=_iso(cutoff))
    client = mlflow_client(tracking_uri)

    model_names = models if models is not None else [m.name for m in client.search_registered_models()]
    protected_runs: set[str] = set()
    kept_model_ids: set[str] = set()
    doomed_versions = []
    for name in model_names:
        aliased = {str(v) for v in client.get_registered_model(name).aliases.values()}
        versions = sorted(_all_versions(client, name), key=lambda v: int(v.version), reverse=True)
        for rank, mv in enumerate(versions):
            key = f"{name}/{mv.version}"
            if str(mv.version) in aliased:
                plan.kept_versions[key] = "holds an alias"
            elif rank < keep_versions:
                plan.kept_versions[key] = f"among the {keep_versions} newest"
            elif mv.creation_timestamp >= cutoff:
                plan.kept_versions[key] = "recent"
            else:
                doomed_versions.append(mv)
                continue
            if mv.run_id:
                protected_runs.add(mv.run_id)
                plan.kept_version_runs.add(mv.run_id)
            if getattr(mv, "model_id", None):
                kept_model_ids.add(mv.model_id)
    for mv in doomed_versions:
        model_id = getattr(mv, "model_id", None)
        plan.versions.append({
            "name": mv.name, "version": str(mv.version), "created": _iso(mv.creation_timestamp),
            "model_id": None if model_id in kept_model_ids else model_id, "run_id": mv.run_id,
        })  # fmt: skip

    if experiments is None:
        chosen = client.search_experiments()
    else:
        chosen = []
        for name in experiments:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise ValueError(f"MLflow experiment {name!r} does not exist at {tracking_uri}")
            chosen.append(exp)
    for exp in chosen:
        runs = _all_runs(client, exp.experiment_id)
        children: dict[str, list[str]] = {}
        for run in runs:
            parent = run.data.tags.get(PARENT_TAG)
            if parent:
                children.setdefault(parent, []).append(run.info.run_id)
        top = [r for r in runs if not r.data.tags.get(PARENT_TAG)]
        top.sort(key=lambda r: r.info.start_time or 0, reverse=True)
        for rank, run in enumerate(top):
            info = run.info
            if rank < keep_runs or (info.start_time or 0) >= cutoff or info.status == "RUNNING":
                continue
            if info.run_id in protected_runs or protected_runs & set(children.get(info.run_id, [])):
                continue
            plan.runs.append({
                "run_id": info.run_id, "experiment": exp.name, "name": info.run_name, "status": info.status,
                "started": _iso(info.start_time), "children": children.get(info.run_id, []),
                "artifact_uri": info.artifact_uri,
            })  # fmt: skip
    return plan


def plan_work_dirs(work_dir: str | os.PathLike, tracking_uri: str, deleting: set[str]) -> list[dict[str, Any]]:
    """Work folders ``<work_dir>/runs/<run id>`` to remove: failed, killed, deleted, unknown or being deleted.

    A folder whose run is RUNNING or FINISHED (and stays) is kept.
    """
    from mlflow.exceptions import MlflowException

    from tasks.tracking import mlflow_client

    root = Path(work_dir) / "runs"
    if not root.is_dir():
        return []
    client = mlflow_client(tracking_uri)
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        run_id = folder.name
        if run_id in deleting:
            reason = "run deleted by this gc"
        else:
            try:
                run = client.get_run(run_id)
            except MlflowException:
                reason = "run unknown to MLflow"
            else:
                if run.info.lifecycle_stage == "deleted":
                    reason = "run deleted"
                elif run.info.status in ("FAILED", "KILLED"):
                    reason = f"run {run.info.status}"
                else:
                    continue
        out.append({"path": str(folder), "run_id": run_id, "reason": reason, "bytes": _folder_bytes(folder)})
    return out


def plan_log_rotation(log_dir: str | os.PathLike, max_bytes: int) -> list[dict[str, Any]]:
    """``*.log`` files in ``log_dir`` larger than ``max_bytes``."""
    folder = Path(log_dir)
    if not folder.is_dir():
        return []
    return [
        {"path": str(p), "bytes": p.stat().st_size}
        for p in sorted(folder.glob("*.log"))
        if p.is_file() and p.stat().st_size > max_bytes
    ]


def _part_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith((".", "_")))


def plan_parquet_compaction(store_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Feast views whose offline folder ``<store>/data/<view>`` holds more than one Parquet file."""
    data = Path(store_dir) / "data"
    if not data.is_dir():
        return []
    out = []
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        files = _part_files(folder)
        if len(files) > 1:
            out.append({
                "view": folder.name, "folder": str(folder), "files": [str(f) for f in files],
                "bytes": sum(f.stat().st_size for f in files),
            })  # fmt: skip
    return out


RUN_KEY_TAG = "run_key"
_LIVE = ("RUNNING", "SCHEDULED", "FINISHED")


def _list_objects(s3: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj for page in pages for obj in page.get("Contents", [])]


def _tagged_runs(client: Any) -> dict[str, list[Any]]:
    """``run key -> MLflow runs tagged with it``, over every experiment, deleted runs included."""
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    out: dict[str, list[Any]] = {}
    for start in range(0, len(experiments), 100):  # the server takes at most 100 experiments per search
        token = None
        while True:
            page = client.search_runs(
                experiments[start : start + 100], filter_string=f"tags.{RUN_KEY_TAG} LIKE '%'",
                run_view_type=ViewType.ALL, max_results=1000, page_token=token,
            )  # fmt: skip
            for run in page:
                out.setdefault(run.data.tags[RUN_KEY_TAG], []).append(run)
            token = page.token
            if not token:
                break
    return out


def _aliased_runs(client: Any) -> set[str]:
    """Run ids behind a model version that holds an alias, in every registered model."""
    runs = set()
    for model in client.search_registered_models():
        for version in set(model.aliases.values()):
            run_id = client.get_model_version(model.name, str(version)).run_id
            if run_id:
                runs.add(run_id)
    return runs


def plan_run_prefixes(
    runs_uri: str,
    tracking_uri: str,
    *,
    deleting: set[str],
    protected_runs: set[str],
    cutoff_ms: int,
    experiments: list[str] | None = None,
    s3: Any = None,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Bucket run prefixes ``<runs_uri>/<run key>/`` to delete, and why the others stay (module docstring).

    Args:
        runs_uri: ``s3://<bucket>/<prefix>runs`` (``tasks.storage.store_uri(bucket, prefix, "runs")``).
        tracking_uri: the MLflow server whose runs carry the ``run_key`` tag.
        deleting: run ids this gc deletes.
        protected_runs: run ids behind model versions that stay.
        cutoff_ms: only a prefix whose newest object is older than this (epoch ms) may go.
        experiments: experiment names being pruned (None: all); a run elsewhere keeps its prefix.
        s3: a boto3 S3 client (None: ``tasks.storage.client()``, the services' S3).

    Returns:
        ``(to delete, run key -> why kept)``.
    """
    from tasks.storage import client as storage_client
    from tasks.storage import join, split_uri
    from tasks.tracking import mlflow_client

    bucket, root = split_uri(runs_uri.rstrip("/"))
    root = root.rstrip("/") + "/"
    s3 = s3 if s3 is not None else storage_client()
    prefixes: dict[str, dict[str, Any]] = {}
    for obj in _list_objects(s3, bucket, root):
        key = obj["Key"][len(root) :].split("/", 1)[0]
        entry = prefixes.setdefault(key, {"objects": 0, "bytes": 0, "newest": 0})
        entry["objects"] += 1
        entry["bytes"] += int(obj.get("Size", 0))
        entry["newest"] = max(entry["newest"], int(obj["LastModified"].timestamp() * 1000))
    if not prefixes:
        return [], {}
    client = mlflow_client(tracking_uri)
    tagged = _tagged_runs(client)
    protected = set(protected_runs) | _aliased_runs(client)
    chosen = None
    if experiments is not None:
        chosen = {client.get_experiment_by_name(name).experiment_id for name in experiments}
    out, kept = [], {}
    for key, entry in sorted(prefixes.items()):
        runs = tagged.get(key, [])
        reasons = []
        why_kept = None
        for run in runs:
            info = run.info
            if info.run_id in protected:
                why_kept = f"run {info.run_id} is behind a model version that stays"
            elif chosen is not None and info.experiment_id not in chosen:
                why_kept = f"run {info.run_id} is in an experiment this gc does not prune"
            elif info.run_id in deleting:
                reasons.append("run deleted by this gc")
                continue
            elif info.lifecycle_stage == "deleted":
                reasons.append("run deleted")
                continue
            elif info.status in _LIVE:
                why_kept = f"run {info.run_id} is {info.status}"
            else:
                reasons.append(f"run {info.status}")
                continue
            break
        if why_kept is None and entry["newest"] >= cutoff_ms:
            why_kept = f"written {_iso(entry['newest'])}, after the cutoff"
        if why_kept is not None:
            kept[key] = why_kept
            continue
        reason = ", ".join(sorted(set(reasons))) if reasons else "no MLflow run names it"
        out.append({"uri": join(runs_uri, key), "run_key": key, "reason": reason, **entry})
    return out, kept


def delete_run_prefix(uri: str, *, newest_ms: int, s3: Any = None) -> int:
    """Delete every object under ``<uri>/``, unless one was written after ``newest_ms`` (a resumed run).

    Returns:
        The number of objects deleted (0 when the prefix was left alone).
    """
    from tasks.storage import client as storage_client
    from tasks.storage import split_uri

    bucket, key = split_uri(uri)
    s3 = s3 if s3 is not None else storage_client()
    objects = _list_objects(s3, bucket, key.rstrip("/") + "/")
    if any(int(o["LastModified"].timestamp() * 1000) > newest_ms for o in objects):
        return 0
    for start in range(0, len(objects), 1000):
        batch = [{"Key": o["Key"]} for o in objects[start : start + 1000]]
        answer = s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        if answer.get("Errors"):
            first = answer["Errors"][0]
            raise RuntimeError(f"S3 refused to delete {first.get('Key')} under {uri}: {first.get('Message')}")
    return len(objects)


def plan_gc(
    *,
    tracking_uri: str | None,
    state_dir: str | os.PathLike,
    store_dir: str | os.PathLike | None,
    keep_runs: int = 20,
    keep_versions: int = 5,
    older_than_days: float = 30.0,
    log_max_bytes: int = 10_000_000,
    experiments: list[str] | None = None,
    models: list[str] | None = None,
    now_ms: int | None = None,
    runs_uri: str | None = None,
    s3: Any = None,
) -> GcPlan:
    """The whole plan (see the module docstring); ``tracking_uri`` None leaves MLflow, work folders and the
    bucket out; ``runs_uri`` (``s3://<bucket>/<prefix>runs``) None leaves the bucket's run prefixes out."""
    state = Path(state_dir)
    if tracking_uri is not None:
        plan = plan_mlflow(
            tracking_uri, keep_runs=keep_runs, keep_versions=keep_versions, older_than_days=older_than_days,
            experiments=experiments, models=models, now_ms=now_ms,
        )  # fmt: skip
        deleting = {r["run_id"] for r in plan.runs} | {c for r in plan.runs for c in r["children"]}
        plan.work_dirs = plan_work_dirs(state / "work", tracking_uri, deleting)
        if runs_uri is not None:
            now = int(time.time() * 1000) if now_ms is None else now_ms
            plan.run_prefixes, plan.kept_prefixes = plan_run_prefixes(
                runs_uri, tracking_uri, deleting=deleting, protected_runs=plan.kept_version_runs,
                cutoff_ms=now - int(older_than_days * DAY_MS), experiments=experiments, s3=s3,
            )  # fmt: skip
    else:
        plan = GcPlan(cutoff="-")
    plan.logs = plan_log_rotation(state / "logs", log_max_bytes)
    if store_dir is not None:
        plan.parquet = plan_parquet_compaction(store_dir)
    return plan


def rotate_log(path: str | os.PathLike, keep: int = 3) -> str:
    """Copy ``path`` to ``path.1`` (shifting older copies up to ``path.<keep>``) and truncate it in place.

    Lines a server writes between the copy and the truncation are lost (as with logrotate's copytruncate).

    Returns:
        The path of the copy.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    log = Path(path)
    Path(f"{log}.{keep}").unlink(missing_ok=True)
    for n in range(keep - 1, 0, -1):
        older = Path(f"{log}.{n}")
        if older.exists():
            os.replace(older, f"{log}.{n + 1}")
    copy = Path(f"{log}.1")
    shutil.copyfile(log, copy)
    os.chmod(copy, log.stat().st_mode & 0o777)
    with open(log, "r+b") as handle:
        handle.truncate(0)
    return str(copy)


def compact_parquet_folder(folder: str | os.PathLike, files: list[str] | None = None) -> str | None:
    """Rewrite the Parquet files of one view folder as a single file with the same rows, then remove them.

    Args:
        folder: ``<store>/data/<view>``.
        files: the files to merge (default: every ``*.parquet`` there now); files added later stay.

    Returns:
        The new file, or None when there was nothing to merge.
    """
    folder = Path(folder)
    parts = [Path(f) for f in files] if files is not None else _part_files(folder)
    if len(parts) < 2:
        return None
    tables = [pq.read_table(p) for p in parts]
    schema = tables[0].schema
    merged = pa.concat_tables([t.cast(schema) if t.schema != schema else t for t in tables])
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    name = f"part-{stamp}-{uuid.uuid4().hex[:12]}.parquet"
    tmp = folder / f".{name}.tmp"
    try:
        pq.write_table(merged, tmp, row_group_size=65_536)
        os.replace(tmp, folder / name)
    finally:
        tmp.unlink(missing_ok=True)
    for p in parts:
        p.unlink(missing_ok=True)
    return str(folder / name)


def _delete_artifacts(artifact_uri: str | None, tracking_uri: str) -> None:
    if not artifact_uri:
        return
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    get_artifact_repository(artifact_uri, tracking_uri=tracking_uri).delete_artifacts()


def apply_gc(plan: GcPlan, *, tracking_uri: str | None, log_keep: int = 3, s3: Any = None) -> dict[str, int]:
    """Carry a plan out: delete versions (never one holding an alias), runs, work folders, bucket run prefixes;
    rotate; compact.

    An alias is re-read just before each version is deleted: a version that gained an alias since the plan
    was made is skipped, and so is its run (and its bucket prefix). A bucket prefix that received an object
    after the plan was made (a rerun resuming there) is left alone.

    Returns:
        How many items of each kind were handled (``versions_skipped`` for versions that gained an alias).
    """
    done = {"versions": 0, "versions_skipped": 0, "runs": 0, "nested_runs": 0, "work_dirs": 0, "logs": 0,
            "parquet_views": 0, "run_prefixes": 0, "run_prefix_objects": 0}  # fmt: skip
    spared_runs: set[str] = set()
    if plan.versions or plan.runs:
        if tracking_uri is None:
            raise ValueError("the plan deletes MLflow runs or versions but no tracking URI was given")
        from mlflow.exceptions import MlflowException

        from tasks.tracking import mlflow_client

        client = mlflow_client(tracking_uri)
        for v in plan.versions:
            aliases = client.get_registered_model(v["name"]).aliases
            if str(v["version"]) in {str(x) for x in aliases.values()}:
                done["versions_skipped"] += 1
                if v["run_id"]:
                    spared_runs.add(v["run_id"])
                continue
            client.delete_model_version(v["name"], v["version"])
            if v["model_id"]:
                try:
                    model = client.get_logged_model(v["model_id"])
                    _delete_artifacts(model.artifact_location, tracking_uri)
                    client.delete_logged_model(v["model_id"])
                except MlflowException:
                    pass
            done["versions"] += 1
        for r in plan.runs:
            if r["run_id"] in spared_runs or spared_runs & set(r["children"]):
                continue
            for child in r["children"]:
                _delete_artifacts(client.get_run(child).info.artifact_uri, tracking_uri)
                client.delete_run(child)
                done["nested_runs"] += 1
            _delete_artifacts(r["artifact_uri"], tracking_uri)
            client.delete_run(r["run_id"])
            done["runs"] += 1
    for w in plan.work_dirs:
        if w["run_id"] in spared_runs:
            continue
        shutil.rmtree(w["path"], ignore_errors=True)
        done["work_dirs"] += 1
    spared_keys = set()
    if spared_runs and plan.run_prefixes:
        from tasks.tracking import mlflow_client

        client = mlflow_client(tracking_uri)
        spared_keys = {client.get_run(r).data.tags.get(RUN_KEY_TAG) for r in spared_runs}
    for p in plan.run_prefixes:
        if p["run_key"] in spared_keys:
            continue
        removed = delete_run_prefix(p["uri"], newest_ms=p["newest"], s3=s3)
        if removed:
            done["run_prefixes"] += 1
            done["run_prefix_objects"] += removed
    for log in plan.logs:
        rotate_log(log["path"], keep=log_keep)
        done["logs"] += 1
    for p in plan.parquet:
        if compact_parquet_folder(p["folder"], p["files"]) is not None:
            done["parquet_views"] += 1
    return done
