"""``vecaf simulate --days N``: labelled images arriving in daily drops, replayed against the real stack.

Fashion-MNIST's training split is cut into N daily drops that land, as ImageFolder PNGs, in a folder that
grows (``<state_dir>/simulate/pool/train/<class>/``); each day then triggers the production pipeline
deployment (``vecaf-pipeline/production``, the run its cron schedule makes, with the day's
parameters) and, for comparison, a *shadow* run through ``vecaf-pipeline/experiment``: the same parameters
with random selection (the same batch budget) registering into a sandbox model of its own. Events:

- **late classes**: two classes (``Bag``, ``Ankle boot``) first arrive on day 2, so that day's model
  predicts other classes than the champion: the warm start is refused (base PVM, noted on the run), and
  the promotion compares the two with the champion's classes mapped by name;
- **a shifted domain**: one day's drop is snowy (``vecaf.data.corruptions.snow``, ImageNet-C severity 3)
  and that day's captions carry the OOD prompt "It's a snowy day!" (Sec. 3.3);
- **an objective change**: from one day on, the user weighs ``Shirt`` (the hardest class) three times
  (class-weighted cross-entropy).

Each day records: the pool (size, images per class, new vs seen before, as the pipeline's ``pool-version``
task counted them from the feature cache), the images selected, the warm start used, the promotion
decision, the champion version and its top-1 on a fixed held-out set (Fashion-MNIST test images, the
same every day, all ten classes; evaluated here after loading the champion from the MLflow registry) and
on the same images in snow, the day's objective metric, and wall time. A day with nothing new is a no-op
run (nothing trained or registered) and is recorded as such.

Output: ``<state_dir>/simulate/summary.json``, ``simulate/simulation.png``, an MLflow run (experiment
``vecaf-simulate``: per-day metrics, the summary and the figure) and the Prefect markdown artifact
``vecaf-simulate-summary``. A simulation starts from no champion: its two registered models
(``vecaf-simulate``, ``vecaf-simulate-random``) are deleted first and the pool folder is emptied (features
already computed for the same images stay cached in Feast).

``vecaf demo`` is two such days on the production model (no shadow, no events): :func:`run_days`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from infra.progress import latest_artifacts
from vecaf.settings import Settings

SNOW_PROMPT = "It's a snowy day!"
SIM_MODEL = "vecaf-simulate"
SHADOW_MODEL = "vecaf-simulate-random"
SIM_EXPERIMENT = "vecaf-simulate"
ARTIFACT_KEY = "vecaf-simulate-summary"
MAX_DAYS = 30


@dataclass(frozen=True)
class SimConfig:
    """What a simulation does: the drops, the events, the training of each day.

    Attributes:
        days: N, the days simulated.
        per_day: training images per drop.
        holdout_per_class: held-out images per class of the pipeline's own split (promotion).
        fixed_per_class: images per class of the fixed evaluation set (0: no own evaluation; the champion's
            top-1 is then the promotion's held-out top-1).
        image_size: the PVM input side.
        ratio, loops, batch_budget, batch_size, lr: the training parameters of every day.
        late_classes: classes whose first images arrive on ``late_day``.
        late_day: the day they arrive (None: every class from day 1).
        snow_day: the day whose drop is snowy (None: never).
        objective_day: the day from which ``objective_weights`` apply (None: plain cross-entropy throughout).
        objective_weights: class name -> weight (others 1) of the class-weighted objective.
        shadow: also run the random-selection shadow each day.
        model_name, experiment: where the VeCAF runs register and are tracked.
        shadow_model: the shadow's sandbox model.
        fresh: delete the two registered models first (a simulation starts from no champion).
        mode, method: the training mode and the selection method of the main lane.
        ood_prompt: the caption suffix of the days that are not snowy.
        folder: the folder under the state dir that holds the images and the summary.
        seed: the seed of the drops, the snow and training.
        timeout_s: how long one pipeline run may take.
    """

    days: int
    per_day: int
    holdout_per_class: int
    fixed_per_class: int
    image_size: int
    ratio: float
    loops: int
    batch_budget: int
    batch_size: int
    lr: float = 5e-4
    late_classes: tuple[str, ...] = ("Bag", "Ankle boot")
    late_day: int | None = 2
    snow_day: int | None = None
    objective_day: int | None = None
    objective_weights: tuple[tuple[str, float], ...] = (("Shirt", 3.0),)
    shadow: bool = True
    model_name: str = SIM_MODEL
    experiment: str = SIM_EXPERIMENT
    shadow_model: str = SHADOW_MODEL
    fresh: bool = True
    mode: str = "head"
    method: str = "vecaf"
    ood_prompt: str | None = None
    folder: str = "simulate"
    seed: int = 0
    timeout_s: float = 3600.0


FULL = {"per_day": 600, "holdout_per_class": 50, "fixed_per_class": 100, "image_size": 64, "ratio": 0.01,
        "loops": 3, "batch_budget": 300, "batch_size": 32}  # fmt: skip
"""``vecaf simulate``: the demo's training settings, 600 images a day (3000 by day 5, the demo's pool)."""
QUICK = {"per_day": 60, "holdout_per_class": 10, "fixed_per_class": 10, "image_size": 32, "ratio": 0.2,
         "loops": 2, "batch_budget": 40, "batch_size": 16, "lr": 0.05}  # fmt: skip
"""``--quick`` (CI): 60 images a day at 32 px, 2 loops of 20 batches (lr 0.05: a fresh head must move within
40 batches); training is a small share of a day here, the runs' start-up the most."""


def simulation_config(days: int, *, quick: bool = False, shadow: bool = True, **overrides: Any) -> SimConfig:
    """The simulation of ``days`` days with the default events: late classes on day 2 (N >= 2), the snowy
    drop on day max(2, N - 1) and the objective change on day N (N >= 3).

    Raises:
        ValueError: days outside 1..30, or drops that Fashion-MNIST's 60 000 training images cannot fill.
    """
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise ValueError(f"--days must be an integer in 1..{MAX_DAYS}, got {days!r}")
    values: dict[str, Any] = dict(QUICK if quick else FULL)
    values.update(
        days=days, shadow=shadow, late_day=2 if days >= 2 else None, snow_day=max(2, days - 1) if days >= 3 else None,
        objective_day=days if days >= 3 else None,
    )  # fmt: skip
    values.update(overrides)
    config = SimConfig(**values)
    if config.per_day * config.days > 60_000:
        raise ValueError(f"{config.days} drops of {config.per_day} images exceed Fashion-MNIST's 60000 training images")
    return config


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers: the drops, the objective of a day, its metric


def folder_name(class_name: str) -> str:
    """A class name as a folder name ("T-shirt/top" -> "T-shirt_top")."""
    return class_name.replace("/", "_")


def plan_drops(
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    days: int,
    per_day: int,
    late_classes: Sequence[str] = (),
    late_day: int | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """Which training images arrive on which day.

    On day d the classes present are all classes, less ``late_classes`` while d < ``late_day``. Each day
    draws, without replacement and never an image of an earlier day, floor(per_day / C_d) images of each of
    its C_d classes, and the remainder one each from classes chosen at random (seeded).

    Returns:
        One sorted index array per day (disjoint; the day's drop).

    Raises:
        ValueError: an unknown late class, or a class that runs out of images.
    """
    labels = np.asarray(labels)
    names = list(class_names)
    unknown = sorted(set(late_classes) - set(names))
    if unknown:
        raise ValueError(f"late classes {unknown} are not classes of the dataset ({names})")
    rng = np.random.default_rng(seed)
    queues = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in range(len(names))}
    late = {names.index(c) for c in late_classes}
    drops = []
    for day in range(1, days + 1):
        present = [c for c in range(len(names)) if c not in late or (late_day is not None and day >= late_day)]
        share, rest = divmod(per_day, len(present))
        extra = set(rng.choice(present, size=rest, replace=False).tolist()) if rest else set()
        picked: list[int] = []
        for c in present:
            want = share + (c in extra)
            if len(queues[c]) < want:
                raise ValueError(f"class {names[c]!r} has no {want} images left for day {day}")
            picked += [int(i) for i in queues[c][:want]]
            queues[c] = queues[c][want:]
        drops.append(np.sort(np.asarray(picked, dtype=np.int64)))
    return drops


def day_objective(config: SimConfig, day: int, class_names: Sequence[str]) -> dict[str, Any]:
    """The ``ObjectiveParams`` (as a dict) of ``day``: class-weighted from ``objective_day`` on, else CE.

    ``class_names`` are the pool's classes that day, in label order (the weights follow it)."""
    weights = day_weights(config, day)
    if weights is None:
        return {"kind": "ce"}
    return {"kind": "class-weighted", "class_weights": [float(weights.get(c, 1.0)) for c in class_names]}


def day_weights(config: SimConfig, day: int) -> dict[str, float] | None:
    """The class weights by class name in force on ``day`` (None: plain cross-entropy)."""
    if config.objective_day is None or day < config.objective_day:
        return None
    return {folder_name(c): float(w) for c, w in config.objective_weights}


def objective_metric(per_class: Sequence[float | None], class_names: Sequence[str],
                     weights: Mapping[str, float] | None, *, top1: float) -> float:  # fmt: skip
    """The day's objective as a metric of an evaluation: top-1 under cross-entropy (``weights`` None); under
    class weights w_c (by class name, 1 when not named), the weighted accuracy sum_c w_c acc_c / sum_c w_c
    over the classes evaluated (acc_c not None)."""
    if weights is None:
        return float(top1)
    pairs = [(float(weights.get(c, 1.0)), a) for c, a in zip(class_names, per_class) if a is not None]
    return float(sum(w * a for w, a in pairs) / sum(w for w, _ in pairs))


# ----------------------------------------------------------------------------------------------------------------
# Files: the growing pool, the fixed evaluation sets


def _write_pngs(folder: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, class_names: Sequence[str],
                *, suffix: str = "") -> None:  # fmt: skip
    from PIL import Image

    for i in indices.tolist():
        target = folder / folder_name(class_names[int(labels[i])]) / f"{i:05d}{suffix}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(target)


def _snowy(images: np.ndarray, indices: np.ndarray, seed: int) -> np.ndarray:
    from vecaf.data.corruptions import snow

    out = images.copy()
    rng = np.random.default_rng(seed)
    for i in indices.tolist():
        out[i] = snow(images[i], severity=3, rng=rng)
    return out


@dataclass
class Folders:
    """Where a simulation's images are (under ``<state_dir>/simulate``)."""

    root: Path
    pool: Path = field(init=False)
    fixed_clean: Path = field(init=False)
    fixed_snow: Path = field(init=False)

    def __post_init__(self) -> None:
        self.pool = self.root / "pool"
        self.fixed_clean = self.root / "fixed" / "clean"
        self.fixed_snow = self.root / "fixed" / "snow"


def _test_indices(labels: np.ndarray, per_class: int, *, offset: int, seed: int) -> np.ndarray:
    """per_class test images of each class, after the first ``offset`` of its seeded order (disjoint sets)."""
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[offset : offset + per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


class Arrivals:
    """Fashion-MNIST and the plan of a simulation: writes each day's drop into the growing folder."""

    def __init__(self, config: SimConfig, folders: Folders) -> None:
        from vecaf.data import load_dataset

        self.config = config
        self.folders = folders
        train = load_dataset("fashion-mnist", split="train")
        test = load_dataset("fashion-mnist", split="test")
        self.class_names = list(train.class_names)
        self.train_images, self.train_labels = train.images, np.asarray(train.labels)
        self.test_images, self.test_labels = test.images, np.asarray(test.labels)
        self.drops = plan_drops(
            self.train_labels, self.class_names, days=config.days, per_day=config.per_day,
            late_classes=config.late_classes if config.late_day else (), late_day=config.late_day, seed=config.seed,
        )  # fmt: skip
        self.holdout = _test_indices(self.test_labels, config.holdout_per_class, offset=0, seed=config.seed)
        self.fixed = _test_indices(
            self.test_labels, config.fixed_per_class, offset=config.holdout_per_class, seed=config.seed
        )

    def start(self) -> None:
        """Empty the pool folder (day 1 starts it again) and write the fixed evaluation sets (clean and snowy)."""
        if self.folders.pool.exists():
            shutil.rmtree(self.folders.pool)
        if self.config.fixed_per_class:
            for folder in (self.folders.fixed_clean, self.folders.fixed_snow):
                if folder.exists():
                    shutil.rmtree(folder)
            _write_pngs(self.folders.fixed_clean / "test", self.test_images, self.test_labels, self.fixed,
                        self.class_names)  # fmt: skip
            snowy = _snowy(self.test_images, self.fixed, self.config.seed + 10_000)
            _write_pngs(self.folders.fixed_snow / "test", snowy, self.test_labels, self.fixed, self.class_names)

    def drop(self, day: int) -> dict[str, Any]:
        """Write day ``day``'s images into ``pool/train`` (snowy on the snow day) and the held-out images of
        the classes present into ``pool/test``.

        Returns:
            ``{"images", "domain", "classes_new": [names first seen today], "classes": [present, label order]}``.
        """
        indices = self.drops[day - 1]
        snowy = day == self.config.snow_day
        images = _snowy(self.train_images, indices, self.config.seed + day) if snowy else self.train_images
        _write_pngs(self.folders.pool / "train", images, self.train_labels, indices, self.class_names,
                    suffix="-snow" if snowy else "")  # fmt: skip
        before = {int(c) for d in self.drops[: day - 1] for c in np.unique(self.train_labels[d])}
        now = before | {int(c) for c in np.unique(self.train_labels[indices])}
        holdout = self.holdout[np.isin(self.test_labels[self.holdout], sorted(now))]
        _write_pngs(self.folders.pool / "test", self.test_images, self.test_labels, holdout, self.class_names)
        present = sorted(folder_name(self.class_names[c]) for c in now)
        return {
            "images": int(indices.size),
            "domain": "snow" if snowy else "clean",
            "classes_new": [folder_name(self.class_names[c]) for c in sorted(now - before)] if day > 1 else [],
            "classes": present,
        }


# ----------------------------------------------------------------------------------------------------------------
# One day against the stack


def day_parameters(config: SimConfig, day: int, folders: Folders, classes: Sequence[str], *, method: str | None = None,
                   model_name: str | None = None) -> Any:  # fmt: skip
    """The ``PipelineParams`` of ``day`` (validated): the growing ImageFolder, the day's prompt and objective."""
    from flows.params import DataParams, ObjectiveParams, PipelineParams, RegistryParams, TrainingParams

    objective = day_objective(config, day, classes)
    return PipelineParams(
        data=DataParams(dataset="imagefolder", root=str(folders.pool), pool_size=None, test_size=None,
                        image_size=config.image_size, subset_seed=config.seed),  # fmt: skip
        ood_prompt=SNOW_PROMPT if day == config.snow_day else config.ood_prompt,
        objective=ObjectiveParams(**objective),
        training=TrainingParams(
            mode=config.mode, method=method or config.method, ratio=config.ratio, loops=config.loops,
            batch_budget=config.batch_budget,
            batch_size=config.batch_size, lr=config.lr, seed=config.seed,
        ),  # fmt: skip
        registry=RegistryParams(experiment=config.experiment, model_name=model_name or config.model_name, promote=True),
    )


def read_pool_version(artifact: Any) -> dict[str, Any]:
    """The pool version the ``pool-version`` table artifact holds (class counts, size, new, cached, digest)."""
    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    counts = {r["class"]: int(r["images"]) for r in rows if not str(r["class"]).startswith("(")}
    totals = {r["class"]: int(r["images"]) for r in rows if str(r["class"]).startswith("(")}
    digest = (artifact.description or "").rsplit("digest ", 1)[-1].rstrip(".")
    return {"size": totals.get("(all)", sum(counts.values())), "new": totals.get("(new)"),
            "cached": totals.get("(seen before)"), "class_counts": counts, "digest": digest}  # fmt: skip


def noop_reason(artifacts: Mapping[str, Any]) -> str | None:
    """Why a pipeline run did nothing, from its ``vecaf-pipeline-summary`` artifact (None: it trained)."""
    text = str(getattr(artifacts.get("vecaf-pipeline-summary"), "data", "") or "")
    if not text.startswith("# VeCAF pipeline run: nothing to do"):
        return None
    reason = text.split("**", 2)[1].split(": ", 1)[-1].rstrip(".") if "**" in text else ""
    return reason or "nothing new"


def pipeline_noop(settings: Settings, flow_run_id: Any) -> str | None:
    """:func:`noop_reason` of a finished ``vecaf-pipeline`` flow run, read from the Prefect API."""
    from flows.deploy import prefect_api

    with prefect_api(settings):
        return noop_reason(latest_artifacts(flow_run_id))


def run_pipeline_day(settings: Settings, deployment: str, params: Any, *, timeout: float,
                     on_poll: Any = None, console: Any = None) -> dict[str, Any]:  # fmt: skip
    """Trigger one pipeline run, wait for it (with the run's progress bars on ``console`` when given), and read
    back what it did.

    Returns:
        ``{"flow_run_id", "flow_run_url", "state", "seconds", "pool", "noop", "run_id", "mlflow_run_url",
        "loops", "selected", "final_top1", "version", "decision", "reason", "init_used", "init_reason",
        "heldout": {"challenger", "champion"}}``.

    Raises:
        RuntimeError: the run did not complete (its state message is in the error).
    """
    from flows.deploy import prefect_api, trigger, wait_for_run
    from infra.demo import collect_summary
    from infra.progress import wait_with_progress
    from tasks.tracking import mlflow_client

    start = time.monotonic()
    run = trigger(settings, deployment, params.flow_parameters())
    if console is None:
        run = wait_for_run(settings, run.id, timeout=timeout, on_poll=on_poll, poll_s=2.0)
    else:
        run = wait_with_progress(
            settings, run.id, console, timeout=timeout, on_poll=on_poll, show_state=False, poll_s=2.0
        )
    seconds = round(time.monotonic() - start, 1)
    if not run.state.is_completed():
        raise RuntimeError(f"{deployment} run {run.name} ended {run.state.name}: {run.state.message}")
    with prefect_api(settings):
        artifacts = latest_artifacts(run.id)
    out: dict[str, Any] = {"flow_run_id": str(run.id), "state": run.state.name, "seconds": seconds, "noop": None}
    out["pool"] = read_pool_version(artifacts["pool-version"]) if "pool-version" in artifacts else None
    reason = noop_reason(artifacts)
    if reason is not None:
        return {**out, "noop": reason, "selected": 0, "version": None, "decision": "no-op", "reason": reason}
    summary = collect_summary(settings, run)
    out["summary"] = summary
    client = mlflow_client(str(settings_mlflow_url(settings)))
    tags = client.get_run(summary["run_id"]).data.tags
    model = summary["model"]
    version_tags = client.get_model_version(model["name"], model["version"]).tags if model.get("version") else {}
    out.update(
        flow_run_url=summary["flow_run_url"], run_id=summary["run_id"], mlflow_run_url=summary["mlflow_run_url"],
        loops=summary["loops"], selected=int(sum(r["selected"] for r in summary["loops"])),
        final_top1=summary["final_top1"], version=model.get("version"), decision=model.get("decision"),
        reason=model.get("reason"), init_used=tags.get("training.init_used"),
        init_reason=tags.get("training.init_reason"),
        heldout={"challenger": _float(version_tags.get("promotion.challenger_top1")),
                 "champion": _float(version_tags.get("promotion.champion_top1"))},
    )  # fmt: skip
    return out


def settings_mlflow_url(settings: Settings) -> str:
    """The MLflow tracking URI of the settings' services."""
    from infra.stack import stack_urls

    return stack_urls(settings)["mlflow_url"]


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class ChampionEvaluator:
    """Top-1 of a registered model's champion on the fixed evaluation sets, each version evaluated once."""

    def __init__(self, tracking_uri: str, config: SimConfig, folders: Folders) -> None:
        from flows.params import DataParams

        self.tracking_uri = tracking_uri
        self.cache: dict[tuple[str, str, str], dict[str, Any]] = {}
        common = {"dataset": "imagefolder", "train_split": "test", "test_split": "test", "allow_overlap": True,
                  "pool_size": None, "test_size": None, "image_size": config.image_size}  # fmt: skip
        self.sets = {
            "clean": DataParams(root=str(folders.fixed_clean), **common),
            "snow": DataParams(root=str(folders.fixed_snow), **common),
        }

    def champion(self, name: str) -> str | None:
        """The version behind ``name@champion`` (None: none)."""
        from tasks.registry import read_aliases

        champion = read_aliases(self.tracking_uri, name)["champion"]
        return None if champion is None else champion["version"]

    def evaluate(self, name: str, version: str, which: str) -> dict[str, Any]:
        """``tasks.training.evaluate_model`` of version ``version`` on the fixed set ``which`` (clean, snow)."""
        from tasks.training import evaluate_model

        key = (name, version, which)
        if key not in self.cache:
            self.cache[key] = evaluate_model(
                self.tracking_uri, f"models:/{name}/{version}", self.sets[which], device="cpu"
            )
        return self.cache[key]


def champion_scores(evaluator: ChampionEvaluator | None, name: str, weights: Mapping[str, float] | None,
                    run: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The champion after a day: its version and its top-1 (fixed clean and snowy sets, or the promotion's
    held-out split without fixed sets), with the day's objective metric on the clean set."""
    if evaluator is None:
        from tasks.registry import read_aliases

        champion = read_aliases(run["tracking_uri"], name)["champion"]
        version = None if champion is None else champion["version"]
        heldout = run.get("heldout") or {}
        promoted = run.get("decision") == "promoted"
        top1 = heldout.get("challenger") if promoted else heldout.get("champion")
        return {"champion_version": version, "top1": top1, "top1_snow": None, "objective_metric": top1}
    version = evaluator.champion(name)
    if version is None:
        return {"champion_version": None, "top1": None, "top1_snow": None, "objective_metric": None}
    clean = evaluator.evaluate(name, version, "clean")
    snowy = evaluator.evaluate(name, version, "snow")
    names = [folder_name(c) for c in _FASHION_NAMES()]
    metric = objective_metric(clean["per_class"], names, weights, top1=clean["top1"])
    return {"champion_version": version, "top1": clean["top1"], "top1_snow": snowy["top1"], "objective_metric": metric,
            "per_class": dict(zip(names, clean["per_class"]))}  # fmt: skip


def _FASHION_NAMES() -> list[str]:  # noqa: N802 - a constant read lazily
    from vecaf.data import FASHION_MNIST_CLASSES

    return sorted(folder_name(c) for c in FASHION_MNIST_CLASSES)


def day_events(config: SimConfig, day: int, drop: Mapping[str, Any]) -> list[str]:
    """What is special about ``day``, in words (late classes, the snowy drop, the objective change)."""
    events = []
    if drop.get("classes_new"):
        events.append(f"new classes arrive: {', '.join(drop['classes_new'])}")
    if day == config.snow_day:
        events.append(f"snowy drop; captions end with {SNOW_PROMPT!r}")
    if day == config.objective_day:
        weights = ", ".join(f"{folder_name(c)} x{w:g}" for c, w in config.objective_weights)
        events.append(f"objective changes to class-weighted CE ({weights})")
    return events


def delete_models(tracking_uri: str, names: Sequence[str]) -> list[str]:
    """Delete registered models (a fresh simulation's own); returns those that existed."""
    from mlflow.exceptions import MlflowException

    from tasks.tracking import mlflow_client

    client = mlflow_client(tracking_uri)
    deleted = []
    for name in names:
        try:
            client.delete_registered_model(name)
            deleted.append(name)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
    return deleted


def run_days(settings: Settings, config: SimConfig, *, console: Any, on_poll: Any = None) -> dict[str, Any]:
    """Replay ``config.days`` days against the stack (the deployments must exist); returns the summary.

    Args:
        settings: the settings (stack URLs; ``<state_dir>/simulate`` holds the images).
        config: the simulation.
        console: a rich console for the per-day lines.
        on_poll: ``(day, which) -> callback`` given each flow run's polls (progress display), or None.

    Returns:
        ``{"config", "folders", "days": [...], "seconds"}``; each day ``{"day", "drop", "events", "ood_prompt",
        "objective", "vecaf": {...}, "shadow": {...} | None, "seconds"}``.
    """
    from flows.deploy import EXPERIMENT_DEPLOYMENT, PIPELINE_DEPLOYMENT
    from infra.stack import state_dir

    start = time.monotonic()
    folders = Folders(state_dir(settings) / config.folder)
    tracking = settings_mlflow_url(settings)
    if config.fresh:
        delete_models(tracking, [config.model_name] + [config.shadow_model] * config.shadow)
    arrivals = Arrivals(config, folders)
    arrivals.start()
    evaluator = ChampionEvaluator(tracking, config, folders) if config.fixed_per_class else None
    days = []
    for day in range(1, config.days + 1):
        t0 = time.monotonic()
        drop = arrivals.drop(day)
        events = day_events(config, day, drop)
        console.print(f"[bold]Day {day}[/]: {drop['images']} new images ({drop['domain']})"
                      + (f"; {'; '.join(events)}" if events else ""))  # fmt: skip
        weights = day_weights(config, day)
        runs: dict[str, Any] = {}
        lanes = [("vecaf", config.method, config.model_name, PIPELINE_DEPLOYMENT)]
        if config.shadow:
            lanes.append(("shadow", "random", config.shadow_model, EXPERIMENT_DEPLOYMENT))
        for lane, method, name, deployment in lanes:
            params = day_parameters(config, day, folders, drop["classes"], method=method, model_name=name)
            run = run_pipeline_day(
                settings, f"vecaf-pipeline/{deployment}", params, timeout=config.timeout_s,
                on_poll=on_poll(day, lane) if on_poll else None, console=console,
            )  # fmt: skip
            run.update(champion_scores(evaluator, name, weights, {**run, "tracking_uri": tracking}))
            runs[lane] = run
            console.print("   " + day_line(lane, method, run))
        days.append({
            "day": day, "drop": drop, "events": events, "ood_prompt": params.ood_prompt,
            "objective": {"kind": "ce"} if weights is None else {"kind": "class-weighted", "weights": weights},
            "vecaf": runs["vecaf"], "shadow": runs.get("shadow"), "seconds": round(time.monotonic() - t0, 1),
        })  # fmt: skip
    return {"config": asdict(config), "folders": {k: str(v) for k, v in vars(folders).items()}, "days": days,
            "seconds": round(time.monotonic() - start, 1)}  # fmt: skip


def day_line(lane: str, method: str, run: Mapping[str, Any]) -> str:
    """One line on a lane's day: the pool, what was done, the decision, the champion's score."""
    pool = run.get("pool") or {}
    head = (f"{lane} ({method}): pool {pool.get('size')} images ({pool.get('new')} new, {pool.get('cached')} seen "
            "before)")  # fmt: skip
    if run.get("noop"):
        return f"{head}; no-op: {run['noop']}"
    top1 = run.get("top1")
    score = "none" if top1 is None else f"{top1:.4f}"
    snow = f", snow {run['top1_snow']:.4f}" if run.get("top1_snow") is not None else ""
    return (f"{head}; {run.get('selected')} selected, start {run.get('init_used')}; version {run.get('version')} "
            f"{run.get('decision')}; champion v{run.get('champion_version')} top-1 {score}{snow}; "
            f"{run['seconds']:.0f} s")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Outputs: summary.json, the figure, the MLflow run, the Prefect artifact


def summary_table(days: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per day: pool, new, selected, decision, champion, top-1 (VeCAF and random shadow), time."""
    rows = []
    for d in days:
        v, s = d["vecaf"], d.get("shadow") or {}
        rows.append({
            "day": d["day"], "events": "; ".join(d["events"]) or "-", "pool": (v.get("pool") or {}).get("size"),
            "new": (v.get("pool") or {}).get("new"), "selected": v.get("selected"), "decision": v.get("decision"),
            "champion": v.get("champion_version"), "top1": v.get("top1"), "top1_snow": v.get("top1_snow"),
            "objective": v.get("objective_metric"), "shadow_top1": s.get("top1"),
            "shadow_top1_snow": s.get("top1_snow"),
            "shadow_objective": s.get("objective_metric"), "shadow_decision": s.get("decision"),
            "seconds": round(d["seconds"]),
        })  # fmt: skip
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The simulation as a markdown table (the Prefect artifact, and what docs/pipeline.md quotes)."""
    config = summary["config"]
    lines = [
        f"# VeCAF simulation: {config['days']} days", "",
        f"{config['per_day']} Fashion-MNIST images a day at {config['image_size']} px; {config['loops']} loops, "
        f"{config['batch_budget']} batches a day; champion top-1 on {config['fixed_per_class'] * 10} fixed held-out "
        "test images (clean / snowy). VeCAF: the production deployment; random: the shadow (experiment "
        "deployment, its own sandbox model).", "",
        "| day | events | pool | new | selected | decision | champion | VeCAF top-1 | random top-1 | VeCAF snow | "
        "random snow | VeCAF objective | random objective | seconds |",
        "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in summary["table"]:
        lines.append("| " + " | ".join(_fmt(r[k]) for k in (
            "day", "events", "pool", "new", "selected", "decision", "champion", "top1", "shadow_top1", "top1_snow",
            "shadow_top1_snow", "objective", "shadow_objective", "seconds")) + " |")  # fmt: skip
    lines += ["", f"Wall time: {summary['seconds']:.0f} s."]
    return "\n".join(lines)


def simulation_figure(table: Sequence[Mapping[str, Any]]) -> Any:
    """Champion top-1 per day (VeCAF vs random shadow, clean and snowy) above the pool's growth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = [r["day"] for r in table]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    lines = (("top1", "VeCAF", "-o"), ("shadow_top1", "random (shadow)", "--o"),
             ("top1_snow", "VeCAF, snowy set", "-^"), ("shadow_top1_snow", "random, snowy set", "--^"))  # fmt: skip
    for key, label, style in lines:
        values = [r.get(key) for r in table]
        if any(v is not None for v in values):
            top.plot(days, [np.nan if v is None else v for v in values], style, label=label)
    top.set_ylabel("champion top-1 (fixed held-out)")
    top.legend(loc="best", fontsize=8)
    top.grid(alpha=0.3)
    words = (("new classes", "new classes"), ("snowy", "snow"), ("objective", "objective"))
    for r in table:
        label = ", ".join(short for key, short in words if key in r["events"])
        if label:
            top.axvline(r["day"], color="#999", linestyle=":", linewidth=1)
            top.text(r["day"], 1.01, label, transform=top.get_xaxis_transform(), ha="center", fontsize=7)
    bottom.bar(days, [r["pool"] or 0 for r in table], color="#bbb", label="pool")
    bottom.bar(days, [r["new"] or 0 for r in table], color="#48c", label="new images")
    bottom.set_xlabel("day")
    bottom.set_ylabel("images")
    bottom.set_xticks(days)
    bottom.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_outputs(settings: Settings, summary: dict[str, Any]) -> dict[str, str]:
    """summary.json, simulation.png, the MLflow run and the Prefect artifact; returns where they are."""
    import matplotlib.pyplot as plt

    from flows.deploy import prefect_api
    from tasks.tracking import ensure_training_experiment, mlflow_client, mlflow_run_url

    root = Path(summary["folders"]["root"])
    figure_path = root / "simulation.png"
    fig = simulation_figure(summary["table"])
    fig.savefig(figure_path, dpi=120)
    plt.close(fig)
    tracking = settings_mlflow_url(settings)
    client = mlflow_client(tracking)
    config = summary["config"]
    experiment_id = ensure_training_experiment(client, config["experiment"])
    run = client.create_run(experiment_id, run_name=f"simulate-{config['days']}d", tags={"vecaf.kind": "simulation"})
    run_id = run.info.run_id
    from mlflow.entities import Metric, Param

    params = [Param(k, str(v)[:500]) for k, v in config.items()]
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(r[k]), now, r["day"]) for r in summary["table"] for k in (
        "pool", "new", "selected", "top1", "top1_snow", "objective", "shadow_top1", "shadow_top1_snow",
        "shadow_objective", "seconds") if isinstance(r.get(k), (int, float))]  # fmt: skip
    client.log_batch(run_id, params=params, metrics=metrics)
    summary["mlflow_run_url"] = mlflow_run_url(tracking, experiment_id, run_id)
    summary["outputs"] = {"summary": str(root / "summary.json"), "figure": str(figure_path)}
    summary["markdown"] = summary_markdown(summary)
    (root / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    client.log_artifact(run_id, str(root / "summary.json"))
    client.log_artifact(run_id, str(figure_path))
    client.set_terminated(run_id, "FINISHED")
    with prefect_api(settings):
        publish_summary(summary["markdown"])
    return {**summary["outputs"], "mlflow_run": summary["mlflow_run_url"]}


def publish_summary(markdown: str) -> None:
    """The Prefect markdown artifact ``vecaf-simulate-summary``, created in a short flow run of its own
    (``vecaf-simulate``, run here) that it is attached to (Prefect deprecates artifacts made outside a run)."""
    from prefect import flow
    from prefect.artifacts import create_markdown_artifact

    @flow(name="vecaf-simulate", description="The summary of a `vecaf simulate` run (its days ran as deployments).")
    def vecaf_simulate_summary(markdown: str) -> None:
        create_markdown_artifact(markdown=markdown, key=ARTIFACT_KEY,
                                 description="vecaf simulate: the days, VeCAF vs random shadow")  # fmt: skip

    vecaf_simulate_summary(markdown)


def ensure_deployments(settings: Settings, console: Any) -> None:
    """Deploy the flows (default parameters) when the pipeline's deployments do not exist yet."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from flows.deploy import EXPERIMENT_DEPLOYMENT, PIPELINE_DEPLOYMENT, deploy, prefect_api

    with prefect_api(settings), get_client(sync_client=True) as client:
        try:
            for name in (PIPELINE_DEPLOYMENT, EXPERIMENT_DEPLOYMENT):
                client.read_deployment_by_name(f"vecaf-pipeline/{name}")
            return
        except ObjectNotFound:
            pass
    console.print("Deploying the flows (they were not deployed yet)...")
    deploy(settings)


def run_simulation(settings: Settings, config: SimConfig, *, console: Any = None) -> dict[str, Any]:
    """``vecaf simulate``: the days (:func:`run_days`), then the summary, figure, MLflow run and artifact.

    Raises:
        RuntimeError: a day's pipeline run did not complete.
    """
    console = console or wide_console()
    console.rule(f"[bold]VeCAF simulation: {config.days} days")
    ensure_deployments(settings, console)
    summary = run_days(settings, config, console=console)
    summary["table"] = summary_table(summary["days"])
    where = write_outputs(settings, summary)
    print_table(console, summary["table"])
    for label, location in where.items():
        console.print(f"{label}: {location}")
    return summary


def wide_console() -> Any:
    """A rich console; off a terminal (a log file, CI) 150 columns wide, so the day tables do not wrap."""
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 150)


def print_table(console: Any, table: Sequence[Mapping[str, Any]]) -> None:
    """The per-day table as a rich table."""
    from rich.table import Table

    out = Table(title="Days (champion top-1 on the fixed held-out set)", title_justify="left")
    columns = ("day", "pool", "new", "selected", "decision", "champion", "top1", "shadow_top1", "top1_snow",
               "shadow_top1_snow", "objective", "shadow_objective", "seconds")  # fmt: skip
    for col in columns:
        out.add_column(col.replace("shadow_", "random "), justify="right")
    for r in table:
        out.add_row(*(_fmt(r[c]) for c in columns))
    console.print(out)
