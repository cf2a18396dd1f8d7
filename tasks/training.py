"""Training tasks: one loop of VeCAF active finetuning, per-sample losses, evaluation of a logged model.

The loop (Sec. 3.1, Appendix C) is ``vecaf.train.finetune``: a pass over the pool gives each sample's
embedding e_i and loss L_i (Eq. 3), ``vecaf.select`` picks K = ratio * N samples (ODS, Eq. 7, or a
baseline), the model trains B/L batches on them with CEA in the forward pass (Eq. 8-10), and the test split
is evaluated. The engine runs all L loops in one call; here each loop is its own task: ``train-loop`` for
loop l resumes the engine from the checkpoint written at the end of loop l-1 (``resume=<file>``; the
engine restores weights, optimizer, schedule and RNG, so the L tasks give exactly the single-call result)
and stops it after loop l has written its checkpoint (``stop_after_loop``, on every rank). A retried task
starts again from loop l-1's checkpoint, never from a later one. With ``models.train_processes`` > 1 (the
settings of the worker that runs the task) the loop runs data-parallel under torchrun on that worker
(``tasks.train_process``, one process per GPU, gloo on CPU); rank 0 writes the files the task then uploads.

Inputs come from Feast, not from re-running models: in ``head`` mode the frozen PVM's pool and test
embeddings are the features (``read_embeddings``); the caption embeddings t_i feed CEA
(``read_text_embeddings``). In ``full`` mode the images are reloaded and the stored embeddings replace the
engine's first pool pass.

Outputs are objects under the run's prefix in the bucket, ``s3://<bucket>/<prefix>runs/<run key>/`` (see
``tasks.storage``; never Prefect results, never a worker's local path): ``checkpoints/loop-<l>.pt``,
``picks-loop-<l>.parquet`` (image id, label, loss, centroid, caption), after the last loop ``model/`` (the
whole network: backbone + trained head, so it classifies images, as ``vecaf.models.classifier`` stores it
without pickle: ``config.json`` + ``model.safetensors``) and ``result.json``, and last ``loop-<l>.json`` (the
loop record, its evaluations and its per-batch training loss), whose presence marks loop l as complete. The
tasks answer with these URIs; a task that needs a file fetches it into its worker's cache when missing (a
loop resuming from loop l-1 downloads that checkpoint), so any worker may run any loop.

Resume: ``train-loop`` for loop l first looks for loop l's record in the bucket. When it is there (a rerun
with the same run key, or a retry after the upload finished), the loop is not trained again: the task logs
``loop l/L: stored in <uri>, not retrained`` and answers with the stored files (``"resumed": True``).

``compute-losses`` writes L_i of every pool image under the model at the end of loop l to the Feast
``sample_losses`` view (model version = the MLflow run id, loop = l), the losses the next loop selects with.
``evaluate-model`` re-evaluates a registered model on the held-out split from its images, with the
preprocessing stored in the model's metadata (promotion trusts no logged number).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task

from flows.params import DataParams, ModelParams, ObjectiveParams, TrainingParams
from tasks.data import load_split, read_manifest
from tasks.embeddings import GPU_TASK, feature_keys, get_pvm
from tasks.progress import LoopProgress

_LIBRARY_OBJECTIVE = {"ce": "cross_entropy", "one-vs-all": "one_vs_all", "class-weighted": "weighted_cross_entropy"}


@dataclass(frozen=True)
class TrainSpec:
    """Everything a loop task needs to call the engine exactly as the other loops did.

    Attributes:
        data, models, objective, training: the flow parameters.
        ood_prompt: the caption suffix (selects which text embeddings feed CEA).
        store: the Feast store spec (``tasks.features.store_spec``; a local store folder also works).
        run_uri: this run's state in the bucket, ``s3://<bucket>/<prefix>runs/<run key>`` (checkpoints, loop
            records, picks, model; see ``tasks.storage.run_key``).
        pool_manifest, test_manifest: the manifests of the pool and the held-out split.
        num_classes: C.
        class_names: the C class names.
        allow_hub: allow hub downloads for named models.
        init_model: the champion's downloaded folder (config.json + weights) when the run warm-starts from it
        init_artifact_uri: where the champion's files are in MLflow (fetched again when the cache lost them)
            (``training.init``, ``tasks.registry.resolve_init``); None: the base PVM.
    """

    data: DataParams
    models: ModelParams
    objective: ObjectiveParams
    training: TrainingParams
    ood_prompt: str | None
    store: dict[str, Any] | str
    run_uri: str
    pool_manifest: str
    test_manifest: str
    num_classes: int
    class_names: tuple[str, ...]
    allow_hub: bool = False
    init_model: str | None = None
    init_artifact_uri: str | None = None


def make_objective(objective: ObjectiveParams) -> Any:
    """The per-sample loss (logits (B, C), labels (B,)) -> (B,) of ``vecaf.objectives`` for these parameters."""
    from vecaf import objectives

    name = _LIBRARY_OBJECTIVE[objective.kind]
    weights = None if objective.class_weights is None else np.asarray(objective.class_weights, dtype=np.float64)

    def loss(logits: Any, labels: Any) -> Any:
        kwargs: dict[str, Any] = {"objective": name}
        if name == "one_vs_all":
            kwargs["target"] = objective.target_class
        if name == "weighted_cross_entropy":
            kwargs["class_weights"] = weights
        return objectives.per_sample_losses(logits, labels, **kwargs)

    suffix = {"one_vs_all": f"(target={objective.target_class})", "weighted_cross_entropy": "(weights)"}.get(name, "")
    loss.__name__ = name + suffix
    return loss


def _manifest_ids_labels(path: str) -> tuple[list[str], np.ndarray]:
    table = read_manifest(path)
    return table["image_id"].to_pylist(), table["label"].to_numpy().astype(np.int64)


def _features(spec: TrainSpec, split: str, manifest: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, e_i, labels) of a manifest's images; an image stored under another split (the same file in
    both splits of an ImageFolder without split folders) is embedded once, so the split is not filtered.

    The labels are the manifest's (this run's class list): the label index Feast stored with an embedding is
    the one of the run that computed it, and shifts when a growing ImageFolder gains a class folder (class
    indices follow the sorted folder names), while the embedding, keyed by the image's content, stays valid."""
    from tasks.features import read_embeddings

    keys = feature_keys(spec.models, spec.data, spec.ood_prompt)
    ids, labels = _manifest_ids_labels(manifest)
    try:
        _, emb, _stored_labels = read_embeddings(spec.store, pvm=keys.pvm, split=None, ids=ids)
    except ValueError as exc:
        raise ValueError(f"{exc}; run the featurize flow for {split} with PVM {keys.pvm!r} first") from exc
    return ids, emb, labels


def _text(spec: TrainSpec, ids: list[str]) -> np.ndarray | None:
    from tasks.features import read_text_embeddings

    if not spec.training.cea or spec.training.method == "full":
        return None
    keys = feature_keys(spec.models, spec.data, spec.ood_prompt)
    try:
        _, text = read_text_embeddings(spec.store, encoder=keys.encoder, prompt_suffix=keys.prompt, ids=ids)
    except ValueError as exc:
        raise ValueError(
            f"{exc}; run the caption and featurize flows with text encoder {keys.encoder!r} and prompt "
            f"{keys.prompt!r} first, or set training.cea=false"
        ) from exc
    return text


def engine_inputs(spec: TrainSpec) -> dict[str, Any]:
    """The data arguments of ``finetune`` for this spec (features from Feast; images in full mode).

    Returns:
        ``{"pvm", "train_data", "test_data", "train_features", "test_features", "text_embeddings",
        "pool_ids", "pool_labels"}``.
    """
    pvm = get_pvm(spec.models.pvm, spec.models.pvm_checkpoint, spec.allow_hub)
    pool_ids, pool_x, pool_y = _features(spec, spec.data.train_split, spec.pool_manifest)
    test_ids, test_x, test_y = _features(spec, spec.data.test_split, spec.test_manifest)
    out: dict[str, Any] = {
        "pvm": pvm, "pool_ids": pool_ids, "pool_labels": pool_y, "text_embeddings": _text(spec, pool_ids),
    }  # fmt: skip
    if spec.training.mode == "head":
        out.update(train_data=(pool_x, pool_y), test_data=(test_x, test_y), train_features=None, test_features=None)
    else:
        pool = load_split(spec.data, spec.data.train_split)
        test = load_split(spec.data, spec.data.test_split)
        if list(pool.ids) != pool_ids or list(test.ids) != test_ids:
            raise ValueError("the dataset's images no longer match its manifest; re-run the pipeline from featurize")
        out.update(train_data=pool, test_data=test, train_features=pool_x, test_features=None)
    return out


def _run_dir(spec: TrainSpec) -> Path:
    """The cached copy of the run's prefix on this worker."""
    from tasks.storage import cache_path

    return cache_path(spec.run_uri)


def _checkpoint_dir(spec: TrainSpec) -> Path:
    return _run_dir(spec) / "checkpoints"


def _checkpoint_uri(spec: TrainSpec, loop: int) -> str:
    """The URI of the checkpoint written at the end of ``loop`` (0-based)."""
    from tasks.storage import join

    return join(spec.run_uri, "checkpoints", f"loop-{loop + 1}.pt")


def _stored_loop(spec: TrainSpec, loop: int) -> dict[str, Any] | None:
    """The answer of :func:`train_loop` for a loop whose files are already in the bucket, else None."""
    from tasks.storage import exists, get_file, join

    record_uri = join(spec.run_uri, f"loop-{loop + 1}.json")
    if not exists(record_uri):
        return None
    record = json.loads(get_file(record_uri).read_text())
    out = {
        **{k: record[k] for k in ("loop", "top1", "test_loss", "train_loss", "budget", "batches", "end_batches")},
        "record": record_uri,
        "picks": join(spec.run_uri, f"picks-loop-{loop + 1}.parquet"),
        "checkpoint": _checkpoint_uri(spec, loop),
        "model": None,
        "result": None,
        "resumed": True,
    }
    if loop == spec.training.loops - 1:
        result_uri = join(spec.run_uri, "result.json")
        result = json.loads(get_file(result_uri).read_text())
        out.update(model=join(spec.run_uri, "model"), result=result_uri, final_top1=float(result["final"]["top1"]))
    return out


def spec_to_json(spec: TrainSpec) -> dict[str, Any]:
    """A JSON-ready form of ``spec`` (:func:`spec_from_json` rebuilds it), for a process torchrun starts."""
    out = {name: getattr(spec, name) for name in spec.__dataclass_fields__}
    for name in ("data", "models", "objective", "training"):
        out[name] = out[name].model_dump(mode="json")
    out["class_names"] = list(spec.class_names)
    return out


def spec_from_json(payload: dict[str, Any]) -> TrainSpec:
    """The :class:`TrainSpec` of :func:`spec_to_json`'s output."""
    kinds = {"data": DataParams, "models": ModelParams, "objective": ObjectiveParams, "training": TrainingParams}
    values = {**payload, **{k: cls.model_validate(payload[k]) for k, cls in kinds.items()}}
    values["class_names"] = tuple(payload["class_names"])
    return TrainSpec(**values)


def train_processes(setting: int | None = None, *, batch_size: int | None = None) -> int:
    """How many data-parallel processes a train-loop uses: ``models.train_processes`` of this worker's settings
    (``setting`` when given); 0 means one per visible CUDA device (1 without).

    Raises:
        ValueError: ``batch_size`` does not split evenly over the processes (each takes B / W rows of a batch).
    """
    if setting is None:
        from vecaf.settings import load_settings

        setting = load_settings().models.train_processes
    n = int(setting)
    if n == 0:
        import torch

        n = max(1, torch.cuda.device_count())
    if n < 1:
        raise ValueError(f"models.train_processes must be >= 0, got {setting}")
    if batch_size is not None and n > 1 and batch_size % n:
        raise ValueError(
            f"training.batch_size {batch_size} does not split evenly over models.train_processes={n} processes "
            "(each takes an equal share of every batch); choose a multiple of the process count"
        )
    return n


def _finetune(
    spec: TrainSpec, inputs: dict[str, Any], *, resume: Any, stop_after_loop: int | None, callbacks: Any = None
) -> Any:
    from vecaf.train import finetune

    t = spec.training
    model, start = _start_model(spec, inputs)
    return finetune(
        model,
        inputs["train_data"],
        inputs["test_data"],
        mode=t.mode,
        method=t.method,
        ratio=t.ratio,
        loops=t.loops,
        batch_budget=t.batch_budget,
        batch_size=t.batch_size,
        lr=t.lr,
        objective=make_objective(spec.objective),
        text_embeddings=inputs["text_embeddings"],
        eta=t.eta,
        lam_bw=t.lam_bw,
        exclude_previous=t.exclude_previous,
        cumulative=t.cumulative,
        selection_options={"loss_power": t.loss_power} if t.method == "vecaf" else None,
        selection_loss=t.selection_loss,
        eval_every=t.eval_every,
        seed=t.seed,
        device=spec.models.device,
        image_size=spec.data.image_size,
        test_features=inputs["test_features"],
        num_classes=spec.num_classes,
        checkpoint_dir=_checkpoint_dir(spec),
        resume=resume,
        return_model=True,
        stop_after_loop=stop_after_loop,
        callbacks=callbacks,
        **start,
    )


def save_final(spec: TrainSpec, inputs: dict[str, Any], result: Any) -> None:
    """After the last loop: the whole network as ``<run dir>/model/`` (config + safetensors) and ``result.json``."""
    from vecaf.models.classifier import classifier_config, save_classifier

    if result is None or result.model is None:
        raise RuntimeError("the engine returned no model after the last loop")
    network = result.model.cpu().eval()
    config = classifier_config(
        inputs["pvm"], network, class_names=spec.class_names, mode=spec.training.mode, image_size=spec.data.image_size,
    )  # fmt: skip
    save_classifier(network, config, _run_dir(spec) / "model")
    _write_json(_run_dir(spec) / "result.json", result.to_dict())


def run_engine(
    spec: TrainSpec, loop: int, resume: Any, inputs: dict[str, Any] | None = None, callbacks: list[Any] | None = None
) -> None:
    """Train loop ``loop`` in this process (one rank under torchrun): checkpoint, and after the last loop the
    model and ``result.json``, in the run's cached folder (written by rank 0). ``callbacks`` go to the engine
    (the Prefect progress of this process)."""
    from vecaf.train import ddp

    inputs = engine_inputs(spec) if inputs is None else inputs
    last = loop == spec.training.loops - 1
    result = _finetune(spec, inputs, resume=resume, callbacks=callbacks, stop_after_loop=None if last else loop)
    if last and ddp.current_context().is_main:
        save_final(spec, inputs, result)


def run_engine_under_torchrun(spec: TrainSpec, loop: int, resume: Any, processes: int) -> str:
    """Train loop ``loop`` with ``processes`` data-parallel processes (``torch.distributed.run --standalone``
    on this machine, ``tasks.train_process`` in each); returns the tail of their output.

    Every rank stops after the loop (the engine's ``stop_after_loop``), so all of them exit; a failing rank
    makes torchrun stop the others.

    Raises:
        RuntimeError: torchrun exited non-zero (the tail of the ranks' output in the message).
    """
    import subprocess
    import sys

    run_dir = _run_dir(spec)
    job = run_dir / f"train-loop-{loop + 1}.job.json"
    job.write_text(json.dumps({"spec": spec_to_json(spec), "loop": loop, "resume": str(resume) if resume else False}))
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "tasks.train_process", str(job)]  # fmt: skip
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    tail = (done.stdout + done.stderr)[-4000:]
    if done.returncode != 0:
        raise RuntimeError(f"train-loop {loop + 1} under torchrun ({processes} processes) failed:\n{tail}")
    return tail


def _start_model(spec: TrainSpec, inputs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The model the engine starts from and its input keywords: the base PVM, or the champion (warm start).

    A champion (``spec.init_model``) is rebuilt without pickle; it takes the base PVM's preprocessing (same
    architecture and input size, checked by ``choose_init``). In ``full`` mode the stored features come from
    the base backbone, not the champion's, so the engine computes loop 1's pass itself.
    """
    if spec.init_model is None:
        return inputs["pvm"], {"train_features": inputs["train_features"]}
    from vecaf.models.classifier import CONFIG_FILE, WEIGHTS_FILE, load_classifier

    folder = Path(spec.init_model)
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / f).is_file()]
    if missing and spec.init_artifact_uri:  # the worker's cache lost the champion: fetch it again
        import mlflow.artifacts

        from flows.runtime import runtime

        folder.mkdir(parents=True, exist_ok=True)
        for name in missing:
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{spec.init_artifact_uri.rstrip('/')}/{name}", dst_path=str(folder),
                tracking_uri=runtime().tracking_uri,
            )  # fmt: skip
    model, _ = load_classifier(spec.init_model)
    start = {"transform": inputs["pvm"].transform(image_size=spec.data.image_size)}
    start["train_features"] = inputs["train_features"] if spec.training.mode == "head" else None
    return model, start


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_json_default))
    os.replace(tmp, path)


def _captions_of(spec: TrainSpec, ids: list[str]) -> list[str | None]:
    from tasks.features import read_captions

    keys = feature_keys(spec.models, spec.data, spec.ood_prompt)
    try:
        _, captions = read_captions(spec.store, captioner=keys.captioner, prompt_suffix=keys.prompt, ids=ids)
    except ValueError:
        return [None] * len(ids)
    return list(captions)


def train_loop(spec: TrainSpec, loop: int, *, processes: int | None = None) -> dict[str, Any]:
    """Run loop ``loop`` (0-based) of the engine from loop ``loop - 1``'s checkpoint and store its files.

    A loop already stored under the run's prefix is not trained again (see the module docstring). With more
    than one process (``processes``, default ``models.train_processes`` of this worker's settings) the engine
    runs data-parallel under torchrun (:func:`run_engine_under_torchrun`); the result equals one process's up
    to float rounding (``vecaf.train.ddp``).

    Returns:
        ``{"loop" (1-based), "top1", "test_loss", "train_loss", "budget", "batches", "end_batches", "record",
        "picks", "checkpoint", "model", "result", "resumed"}`` (``s3://`` URIs; ``model``/``result``, and
        ``final_top1``, only after the last loop). The record's evaluations count loops from 1 (0: before
        training).
    """
    from tasks.storage import get_file, join, put_file, put_folder
    from vecaf.train.checkpoint import checkpoint_path, load_checkpoint

    t = spec.training
    if not 0 <= loop < t.loops:
        raise ValueError(f"loop must be in 0..{t.loops - 1}, got {loop}")
    stored = _stored_loop(spec, loop)
    progress = LoopProgress(t.loops, t.batch_budget, loop)
    if stored is not None:
        progress.stored(stored["end_batches"])
        return stored
    run_dir = _run_dir(spec)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume: Any = False
    if loop > 0:
        try:
            resume = get_file(_checkpoint_uri(spec, loop - 1))
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"loop {loop + 1} needs loop {loop}'s checkpoint: {exc}; run the loops in order"
            ) from exc
    last = loop == t.loops - 1
    n = train_processes(processes, batch_size=t.batch_size)
    inputs = engine_inputs(spec)
    if n > 1:
        run_engine_under_torchrun(spec, loop, resume, n)
    else:
        run_engine(spec, loop, resume, inputs, callbacks=[progress])
    ckpt = checkpoint_path(_checkpoint_dir(spec), loop)
    state = load_checkpoint(ckpt)
    rec = state["records"][-1]
    if int(rec["loop"]) != loop:
        raise RuntimeError(f"checkpoint {ckpt} ends with loop {int(rec['loop']) + 1}, expected {loop + 1}")
    start_batch = int(rec["end_batches"]) - int(rec["batches"])
    evals = [
        {"batches": int(p["batches"]), "top1": float(p["top1"]), "loss": float(p["loss"]), "loop": int(p["loop"]) + 1}
        for p in state["curve"]
        if int(p["loop"]) == loop or (loop == 0 and int(p["loop"]) == -1)
    ]
    end = int(rec["end_batches"])
    train_curve = [[int(b), float(v)] for b, v in state["train_curve"] if start_batch < int(b) <= end]
    picks = None if rec["picks"] is None else rec["picks"].numpy().astype(np.int64)
    pick_losses = None if rec["pick_losses"] is None else rec["pick_losses"].numpy().astype(np.float32)
    record = {
        "loop": loop + 1,
        "budget": int(rec["budget"]),
        "batches": int(rec["batches"]),
        "end_batches": int(rec["end_batches"]),
        "train_loss": float(rec["train_loss"]),
        "top1": float(rec["top1"]),
        "test_loss": float(rec["test_loss"]),
        "mean_pick_loss": None if pick_losses is None else float(pick_losses.mean()),
        "seconds": {k: float(v) for k, v in rec["seconds"].items()},
        "evals": evals,
        "start_batches": start_batch,
        "train_curve": train_curve,
        "notes": list(state.get("notes", [])),
    }
    record_path = run_dir / f"loop-{loop + 1}.json"
    picks_path = run_dir / f"picks-loop-{loop + 1}.parquet"
    ids = inputs["pool_ids"]
    labels = inputs["pool_labels"]
    rows = np.arange(len(ids)) if picks is None else picks
    chosen = [ids[i] for i in rows]
    table = pa.table(
        {
            "image_id": pa.array(chosen, pa.string()),
            "pool_index": pa.array(rows, pa.int64()),
            "label": pa.array(labels[rows], pa.int64()),
            "class_name": pa.array([spec.class_names[int(y)] for y in labels[rows]], pa.string()),
            "loss": pa.array(
                np.full(len(rows), np.nan, np.float32) if pick_losses is None else pick_losses, pa.float32()
            ),
            "centroid": pa.array(np.arange(len(rows)) if picks is not None else np.full(len(rows), -1), pa.int64()),
            "caption": pa.array(_captions_of(spec, chosen) if picks is not None else [None] * len(rows), pa.string()),
            "loop": pa.array(np.full(len(rows), loop + 1), pa.int64()),
        }
    )
    pq.write_table(table, str(picks_path))
    out = {
        **{k: record[k] for k in ("loop", "top1", "test_loss", "train_loss", "budget", "batches", "end_batches")},
        "record": join(spec.run_uri, record_path.name),
        "picks": put_file(picks_path, join(spec.run_uri, picks_path.name)),
        "checkpoint": put_file(ckpt, _checkpoint_uri(spec, loop)),
        "model": None,
        "result": None,
        "resumed": False,
    }
    if last:
        result_path = run_dir / "result.json"
        out.update(
            model=put_folder(run_dir / "model", join(spec.run_uri, "model")),
            result=put_file(result_path, join(spec.run_uri, "result.json")),
            final_top1=float(json.loads(result_path.read_text())["final"]["top1"]),
        )
    _write_json(record_path, record)
    put_file(record_path, out["record"])  # last: its presence marks the loop complete
    return out


def preprocessing(spec: TrainSpec) -> dict[str, Any]:
    """The model's input preprocessing (timm data config of the PVM at the run's input size), JSON-ready."""
    pvm = get_pvm(spec.models.pvm, spec.models.pvm_checkpoint, spec.allow_hub)
    config = pvm.transform(image_size=spec.data.image_size).data_config
    return json.loads(json.dumps(config, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


def _network_logits(spec: TrainSpec, state: dict[str, Any], inputs: dict[str, Any]) -> np.ndarray:
    import torch

    weights = state["model"]
    if spec.training.mode == "head":
        w = weights["head.weight"].float()
        b = weights["head.bias"].float() if "head.bias" in weights else torch.zeros(w.shape[0])
        x = torch.as_tensor(np.asarray(inputs["train_data"][0], dtype=np.float32))
        return (x @ w.T + b).numpy()
    from vecaf.models._runtime import device_of
    from vecaf.train.head import prepare_backbone

    net, _ = prepare_backbone(inputs["pvm"].model, spec.num_classes, seed=0)
    net.load_state_dict({k[len("backbone.") :]: v for k, v in weights.items() if k.startswith("backbone.")})
    return _predict(net, inputs["train_data"], inputs["pvm"].transform(image_size=spec.data.image_size),
                    device=str(device_of(spec.models.device)), batch_size=spec.models.batch_size)  # fmt: skip


def _predict(model: Any, dataset: Any, transform: Any, *, device: str, batch_size: int) -> np.ndarray:
    import torch

    model = model.to(device).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            stop = min(start + batch_size, len(dataset))
            x = torch.stack([transform(dataset.load_image(i)) for i in range(start, stop)])
            out.append(model(x.to(device)).float().cpu().numpy())
    return np.concatenate(out)


def compute_losses(spec: TrainSpec, loop: int, model_version: str) -> dict[str, Any]:
    """L_i of every pool image under the model at the end of loop ``loop``, written to Feast.

    Returns:
        ``{"loop", "n", "mean", "path"}`` (loop 1-based, as stored in ``sample_losses.loop``).
    """
    import torch

    from tasks.features import write_sample_losses
    from vecaf.train.checkpoint import load_checkpoint

    from tasks.storage import get_file

    state = load_checkpoint(get_file(_checkpoint_uri(spec, loop)))
    inputs = engine_inputs(spec)
    logits = _network_logits(spec, state, inputs)
    loss_fn = make_objective(spec.objective)
    losses = loss_fn(torch.from_numpy(logits).double(), torch.from_numpy(inputs["pool_labels"]))
    losses = losses.detach().cpu().numpy().astype(np.float32)
    path = write_sample_losses(spec.store, inputs["pool_ids"], losses, model_version=model_version, loop=loop + 1)
    return {"loop": loop + 1, "n": int(losses.size), "mean": float(losses.mean()), "path": path}


def evaluate_model(
    tracking_uri: str, model_uri: str, data: DataParams, *, device: str = "auto", batch_size: int = 64
) -> dict[str, Any]:
    """Top-1 and cross-entropy of a logged model on the held-out split, computed here from the images.

    The model is loaded without pickle (``tasks.tracking.load_stored_model``: its format is checked before
    anything is read, then the network is rebuilt from its JSON config and its safetensors weights). Its
    MLmodel metadata gives its preprocessing (``data_config``) and class names; the class names must equal
    the held-out dataset's.

    A model that predicts a subset of the held-out classes (a champion from before new classes arrived in a
    growing pool) is evaluated with its classes mapped by name onto the held-out's: an image of a class it
    does not know counts as an error; ``loss`` is then the cross-entropy over the images of classes it knows.

    Returns:
        ``{"model_uri", "top1", "loss", "n", "per_class": [C], "unknown_classes": [held-out classes the model
        does not predict]}`` (per-class in the held-out's class order).

    Raises:
        tasks.tracking.UnsafeModelError: the model is not stored as config + safetensors (never loaded).
        ValueError: the model predicts a class the held-out split does not have.
    """
    import torch
    import torch.nn.functional as F

    from tasks.tracking import load_stored_model
    from vecaf.models._runtime import device_of
    from vecaf.models.pvm import PVMTransform
    from vecaf.train.evaluate import per_class_accuracy, top1_accuracy

    model, meta, _mlmodel_metadata = load_stored_model(tracking_uri, model_uri)
    dataset = load_split(data, data.test_split)
    theirs, ours = list(meta["class_names"]), list(dataset.class_names)
    if not set(theirs) <= set(ours):
        raise ValueError(f"model {model_uri} predicts classes {theirs} but the held-out split has {ours}")
    transform = PVMTransform(meta["data_config"])
    logits = _predict(model, dataset, transform, device=str(device_of(device)), batch_size=batch_size)
    labels = np.asarray(dataset.labels, dtype=np.int64)
    columns = [ours.index(c) for c in theirs]
    mapped = np.full((len(labels), len(ours)), -np.inf, dtype=np.float64)
    mapped[:, columns] = logits
    known = np.isin(labels, columns)
    inverse = {c: i for i, c in enumerate(columns)}
    known_labels = np.asarray([inverse[int(y)] for y in labels[known]], dtype=np.int64)
    loss = (
        float(F.cross_entropy(torch.from_numpy(logits[known]).double(), torch.from_numpy(known_labels)).item())
        if known.any() else float("nan")
    )  # fmt: skip
    per_class = per_class_accuracy(mapped, labels, num_classes=dataset.num_classes)
    return {
        "model_uri": model_uri,
        "top1": float(top1_accuracy(mapped, labels)),
        "loss": loss,
        "n": int(labels.size),
        "per_class": [None if not np.isfinite(v) else float(v) for v in per_class],
        "unknown_classes": [c for c in ours if c not in theirs],
    }


@task(name="train-loop", **GPU_TASK)
def train_loop_task(spec: TrainSpec, loop: int) -> dict[str, Any]:
    """Prefect task around :func:`train_loop` (select + train one loop + evaluate; files, no big result)."""
    out = train_loop(spec, loop)
    logger = get_run_logger()
    if out["resumed"]:
        logger.info("loop %d/%d: stored in %s, not retrained", loop + 1, spec.training.loops, out["record"])
    logger.info(
        "loop %d/%d: %d selected, %d batches, test top-1 %.4f", loop + 1, spec.training.loops, out["budget"],
        out["batches"], out["top1"],
    )  # fmt: skip
    return out


@task(name="compute-losses", **GPU_TASK)
def compute_losses_task(spec: TrainSpec, loop: int, model_version: str) -> dict[str, Any]:
    """Prefect task around :func:`compute_losses` (writes one Parquet file to Feast)."""
    out = compute_losses(spec, loop, model_version)
    get_run_logger().info("loop %d: pool losses written (mean %.4f)", out["loop"], out["mean"])
    return out


@task(name="evaluate-model", retries=2, retry_delay_seconds=[2, 10], **GPU_TASK)
def evaluate_model_task(tracking_uri: str, model_uri: str, data: DataParams, device: str = "auto") -> dict[str, Any]:
    """Prefect task around :func:`evaluate_model`."""
    out = evaluate_model(tracking_uri, model_uri, data, device=device)
    get_run_logger().info("%s: held-out top-1 %.4f on %d images", model_uri, out["top1"], out["n"])
    return out
