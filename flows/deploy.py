"""Deployments of the pipeline's flows on the work pools of the settings, and triggering them.

``deploy`` registers every flow from ``deploy.source`` (default: this checkout's folder, so a worker on this
machine runs the code in place; or a git URL at ``deploy.branch``; or an ``s3://`` copy of the repository):

- ``vecaf-pipeline/production``: caption -> featurize -> finetune -> promote on cron ``0 3 * * *`` (UTC),
  registering into the production model, with the pipeline's default parameters or those given (what
  ``vecaf run`` triggers);
- ``vecaf-pipeline/experiment``: the same pipeline for one-off runs (the UI's "Custom run"), no schedule;
  its defaults register into the sandbox model ``vecaf-sandbox`` in experiment ``vecaf-experiments`` with
  promotion off, so a trial never becomes the production model's "latest version" or ``@challenger``;
- ``promote/manual``: promotion (or a rollback) started by hand, no schedule; its form holds only what
  promotion uses (held-out data, model name, margin, device);
- ``caption/standalone``, ``featurize/standalone``, ``finetune/standalone``: each step alone, no schedule;
- ``caption-shard/fan-out``, ``embed-shard/fan-out``: one shard of captions / embeddings, the unit a
  deployed caption or featurize run fans out to the pool's workers (``tasks/fanout.py``).

Every deployment stores its flow's defaults as its parameters and the form schema of
``flows.params.form_schema`` (fields with defaults required, so the UI shows no "(Optional)"; ranges and
defaults in the descriptions; unknown keys refused), with ``enforce_parameter_schema`` on.

Flows named in ``deploy.gpu_flows`` (finetune, the pipeline) go to ``deploy.gpu_pool``, the others to
``deploy.cpu_pool`` (both default to ``stack.work_pool``, the local stack's ``process`` pool). Before anything
is registered, every pool must exist with the type ``deploy.pool_type`` (else a ``WorkPoolError`` naming the
pool and how to create it) and ``deploy.job_variables`` must fit the pools' job templates. With
``deploy.manage_pool_templates`` the pools get the project's base job template from ``infra/work_pools/``:
it exposes no ``command``, no image, no volumes or privileges and only an allow-list of environment names,
so a caller of ``create_flow_run`` cannot make a worker run something else (issue 11, finding 5a).

It also sets the tag concurrency limit ``gpu`` (default 1): tasks that run a model carry that tag, so at
most that many run at once, whichever flow runs them (set it to the number of accelerators of the pools).
Everything is idempotent: deploying again updates the deployments and templates in place, and deletes the
deployments earlier versions registered under retired names (``on-demand``, ``recurring-finetune``).

``trigger`` creates a flow run of a deployment (the Prefect server validates the parameters against the
flow's schema first, so an out-of-range value is refused before any run exists) and can wait for it.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from vecaf.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PIPELINE_DEPLOYMENT = "production"
"""The scheduled pipeline: production model, promotion on (``vecaf run`` triggers it)."""
EXPERIMENT_DEPLOYMENT = "experiment"
"""The pipeline for one-off runs from the UI: sandbox model name and experiment, promotion off by default."""
PROMOTE_DEPLOYMENT = "manual"
"""Promotion or rollback started by hand (``vecaf promote``, the UI)."""
STEP_DEPLOYMENT = "standalone"
"""One step of the pipeline run alone."""
FAN_OUT_DEPLOYMENT = "fan-out"
"""One shard, started by a caption or featurize run (``tasks.fanout.CAPTION_SHARD_DEPLOYMENT`` and
``EMBED_SHARD_DEPLOYMENT`` name these; a test keeps them equal)."""
RETIRED_DEPLOYMENTS = ("recurring-finetune", "on-demand")
"""Names earlier versions registered (``vecaf-pipeline/recurring-finetune``, ``<flow>/on-demand``): ``deploy``
deletes them from this project's flows, so the UI lists each deployment once, under its current name."""
SANDBOX_MODEL = "vecaf-sandbox"
SANDBOX_EXPERIMENT = "vecaf-experiments"
DEFAULT_CRON = "0 3 * * *"
GPU_TAG = "gpu"

WORK_POOL_TEMPLATES = PROJECT_ROOT / "infra" / "work_pools"
POOL_TYPES = ("process", "kubernetes", "docker")
POOL_ROLES = ("cpu", "gpu")

_ENTRYPOINTS = {
    "vecaf-pipeline": "flows/pipeline.py:vecaf_pipeline",
    "promote": "flows/promote.py:promote",
    "caption": "flows/caption.py:caption",
    "featurize": "flows/featurize.py:featurize",
    "finetune": "flows/finetune.py:finetune",
    "caption-shard": "flows/caption.py:caption_shard_flow",
    "embed-shard": "flows/featurize.py:embed_shard_flow",
}


DEPLOYMENT_NAMES: dict[str, tuple[str, ...]] = {
    "vecaf-pipeline": (PIPELINE_DEPLOYMENT, EXPERIMENT_DEPLOYMENT),
    "promote": (PROMOTE_DEPLOYMENT,),
    "caption": (STEP_DEPLOYMENT,),
    "featurize": (STEP_DEPLOYMENT,),
    "finetune": (STEP_DEPLOYMENT,),
    "caption-shard": (FAN_OUT_DEPLOYMENT,),
    "embed-shard": (FAN_OUT_DEPLOYMENT,),
}
"""The deployments of each flow (``<flow>/<name>``), the first one the flow's main deployment."""

DEPLOYMENT_DESCRIPTIONS = {
    f"vecaf-pipeline/{PIPELINE_DEPLOYMENT}": (
        "Production: caption, featurize, finetune, then promote by held-out accuracy, on a schedule. Registers "
        "into the production model; use vecaf-pipeline/experiment for one-off runs."
    ),
    f"vecaf-pipeline/{EXPERIMENT_DEPLOYMENT}": (
        f"One-off experiment: the whole pipeline, registering into the sandbox model {SANDBOX_MODEL!r} "
        f"(experiment {SANDBOX_EXPERIMENT!r}) with promotion off by default: production aliases never move."
    ),
    f"promote/{PROMOTE_DEPLOYMENT}": (
        "Promotion by hand: the @challenger version against @champion on the held-out split (or, with Roll back / "
        "Move champion to version, the champion alias moved without evaluation)."
    ),
    f"caption/{STEP_DEPLOYMENT}": "Captions of a pool (one step of the pipeline, run alone).",
    f"featurize/{STEP_DEPLOYMENT}": "Embeddings of a pool and its captions into Feast (one step, run alone).",
    f"finetune/{STEP_DEPLOYMENT}": "The VeCAF loops alone, tracked in MLflow; registers @challenger (one step).",
    f"caption-shard/{FAN_OUT_DEPLOYMENT}": "Internal: one shard of captions (fan-out unit of caption).",
    f"embed-shard/{FAN_OUT_DEPLOYMENT}": "Internal: one shard of embeddings (fan-out unit of featurize).",
}


def default_parameters(fn: Callable[..., Any]) -> dict[str, Any]:
    """The JSON of each default of a flow function's parameters (a deployment's parameters, the form's values)."""
    import inspect

    from pydantic_core import to_jsonable_python

    return {
        name: to_jsonable_python(p.default)
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def experiment_parameters(pipeline_parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The experiment deployment's defaults: the pipeline's, with the sandbox registry and promotion off."""
    from flows.params import PipelineParams, RegistryParams

    params = dict(pipeline_parameters or PipelineParams().flow_parameters())
    registry = {**dict(params.get("registry") or RegistryParams().model_dump(mode="json"))}
    registry.update(model_name=SANDBOX_MODEL, experiment=SANDBOX_EXPERIMENT, promote=False)
    params["registry"] = registry
    return params


class WorkPoolError(ValueError):
    """A work pool named by the settings is missing, of the wrong type, or refuses the job variables."""


def work_pools(settings: Settings) -> dict[str, str]:
    """``{"cpu": name, "gpu": name}``: the pools of the settings (defaults: ``stack.work_pool`` for both)."""
    cpu = settings.deploy.cpu_pool or settings.stack.work_pool
    return {"cpu": cpu, "gpu": settings.deploy.gpu_pool or cpu}


def pool_role(settings: Settings, flow_name: str) -> str:
    """``"gpu"`` for a flow named in ``deploy.gpu_flows``, else ``"cpu"``."""
    return "gpu" if flow_name in settings.deploy.gpu_flows else "cpu"


def template_file(pool_type: str, role: str) -> Path:
    """The shipped base job template of a pool type and role (``process`` has one for both roles)."""
    if pool_type not in POOL_TYPES:
        raise ValueError(f"deploy.pool_type must be one of {list(POOL_TYPES)}, got {pool_type!r}")
    if role not in POOL_ROLES:
        raise ValueError(f"pool role must be one of {list(POOL_ROLES)}, got {role!r}")
    name = "process.json" if pool_type == "process" else f"{pool_type}-{role}.json"
    return WORK_POOL_TEMPLATES / name


def base_job_template(pool_type: str, role: str, *, image: str | None = None) -> dict[str, Any]:
    """The project's base job template of a pool (``infra/work_pools/``), with ``image`` written in when given.

    The image is part of the template, not a job variable, so a flow run cannot choose what a worker runs.
    """
    template = json.loads(template_file(pool_type, role).read_text())
    if image:
        config = template["job_configuration"]
        if pool_type == "docker":
            config["image"] = image
        elif pool_type == "kubernetes":
            for container in config["job_manifest"]["spec"]["template"]["spec"]["containers"]:
                container["image"] = image
    return template


def check_job_variables(
    settings: Settings, templates: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """Validate ``deploy.job_variables`` against the job templates of the pools; returns them per role.

    Args:
        settings: the settings.
        templates: ``{role: base job template}`` to check against (default: the project's templates of
            ``deploy.pool_type``; ``prepare_work_pools`` passes the pools' own ones when it does not manage them).

    Raises:
        WorkPoolError: an unknown role key, or variables the template does not expose (e.g. ``command``).
    """
    from prefect.utilities.schema_tools import ValidationError, validate

    given = dict(settings.deploy.job_variables)
    unknown = sorted(set(given) - set(POOL_ROLES))
    if unknown:
        raise WorkPoolError(f"deploy.job_variables keys must be pool roles {list(POOL_ROLES)}, got {unknown}")
    out: dict[str, dict[str, Any]] = {}
    for role in POOL_ROLES:
        values = dict(given.get(role) or {})
        template = templates[role] if templates else base_job_template(settings.deploy.pool_type, role)
        schema = template.get("variables") or {}
        where = (
            f"work pool {work_pools(settings)[role]!r}"
            if templates
            else f"{settings.deploy.pool_type} job template {template_file(settings.deploy.pool_type, role).name}"
        )
        try:
            validate(values, schema, raise_on_error=True, preprocess=False, ignore_required=True)
        except ValidationError as exc:
            raise WorkPoolError(
                f"deploy.job_variables.{role} = {values!r} is refused by the {where}: {exc}; allowed variables: "
                f"{sorted(schema.get('properties', {}))}"
            ) from exc
        out[role] = values
    return out


def prepare_work_pools(settings: Settings) -> dict[str, Any]:
    """Check that the pools exist with the right type and (``manage_pool_templates``) write their templates.

    Nothing is created: a missing pool is an operator's typo or a missing worker far more often than a wish
    for a new pool (the local stack's worker creates its own pool at ``vecaf stack up``).

    Returns:
        ``{role: WorkPool}`` as read (before the template update).

    Raises:
        WorkPoolError: a pool does not exist, or has another type than ``deploy.pool_type``.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    pool_type = settings.deploy.pool_type
    names = work_pools(settings)
    setting_of = {"cpu": "deploy.cpu_pool (default stack.work_pool)", "gpu": "deploy.gpu_pool (default the CPU pool)"}
    found: dict[str, Any] = {}
    with get_client(sync_client=True) as client:
        for role, name in names.items():
            try:
                found[role] = client.read_work_pool(name)
            except ObjectNotFound:
                hint = template_file(pool_type, role).relative_to(PROJECT_ROOT)
                raise WorkPoolError(
                    f"work pool {name!r} ({setting_of[role]}) does not exist on the Prefect server "
                    f"{PREFECT_API_URL.value()}; nothing was deployed. Create it with `prefect work-pool create "
                    f"{name} --type {pool_type} --base-job-template {hint}` and start a worker on it (`prefect "
                    f"worker start --pool {name}`), or start the local stack (`vecaf stack up`, pool "
                    f"{settings.stack.work_pool!r}), or name an existing pool in {setting_of[role].split()[0]}."
                ) from None
            if found[role].type != pool_type:
                raise WorkPoolError(
                    f"work pool {name!r} ({setting_of[role]}) has type {found[role].type!r}, but deploy.pool_type is "
                    f"{pool_type!r}; nothing was deployed"
                )
        if settings.deploy.manage_pool_templates:
            for role, name in names.items():
                # one pool serving both roles gets the GPU template (training must find its accelerator)
                role_here = "gpu" if names["cpu"] == names["gpu"] else role
                template = base_job_template(pool_type, role_here, image=settings.deploy.image)
                client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
    return found


def flow_source(settings: Settings) -> Any:
    """What ``Flow.from_source`` pulls the code from: this checkout's folder, a git repository, or S3.

    Raises:
        ValueError: a ``deploy.branch`` without a git source, or an ``s3://`` source without s3fs installed.
    """
    source = (settings.deploy.source or "").strip()
    branch = settings.deploy.branch
    if not source:
        if branch:
            raise ValueError(f"deploy.branch = {branch!r} needs a git URL in deploy.source")
        return str(PROJECT_ROOT)
    if _is_git_url(source):
        from prefect.runner.storage import GitRepository

        return GitRepository(url=source, branch=branch)
    if branch:
        raise ValueError(f"deploy.branch = {branch!r} needs a git URL in deploy.source, got {source!r}")
    if source.startswith("s3://"):
        try:
            import s3fs  # noqa: F401
        except ImportError:
            raise ValueError(
                f"deploy.source = {source!r} needs the s3fs package here and on the workers (pip install s3fs)"
            ) from None
        from prefect.runner.storage import RemoteStorage

        return RemoteStorage(url=source)
    return source


def _is_git_url(source: str) -> bool:
    return (
        source.startswith(("git@", "git://", "ssh://"))
        or source.removesuffix("/").endswith(".git")
        or (source.startswith(("https://", "http://")) and "/" in source.split("://", 1)[1])
    )


@contextlib.contextmanager
def prefect_api(settings: Settings) -> Iterator[str]:
    """Point this process's Prefect client at the services' API (with its credentials); yields the API URL."""
    from flows.runtime import prefect_client_settings

    with prefect_client_settings(settings) as url:
        yield url


def ensure_gpu_limit(limit: int = 1) -> int:
    """Create (or reset) the tag concurrency limit ``gpu``; returns the limit."""
    from prefect.client.orchestration import get_client

    if limit < 1:
        raise ValueError(f"the gpu concurrency limit must be >= 1, got {limit}")
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=limit)
    return limit


def deploy(
    settings: Settings,
    *,
    pipeline_parameters: Mapping[str, Any] | None = None,
    cron: str = DEFAULT_CRON,
    timezone: str = "UTC",
    paused: bool = False,
    gpu_limit: int = 1,
    flows: tuple[str, ...] = tuple(_ENTRYPOINTS),
) -> dict[str, str]:
    """Register the deployments on the work pools of ``settings.deploy`` (the pools must exist).

    Args:
        settings: the settings (stack URLs, ``deploy`` section: source, pools, image, job variables).
        pipeline_parameters: default parameters of the scheduled pipeline (``PipelineParams.flow_parameters()``);
            None keeps the flow's defaults.
        cron: the pipeline's schedule (recurring finetuning).
        timezone: the schedule's time zone.
        paused: create the schedule paused.
        gpu_limit: the ``gpu`` tag concurrency limit.
        flows: which flows to deploy (names of the table above).

    Returns:
        ``{"<flow>/<deployment>": deployment id}``.

    Raises:
        ValueError: an unknown flow name or a bad source.
        WorkPoolError: a pool is missing or of another type, or the job variables do not fit the template;
            raised before anything is registered.
    """
    from prefect import Flow
    from prefect.schedules import Cron

    from flows.params import close_deployment_parameters
    from tasks.reconcile import reconcile
    from vecaf.services import resolve_services

    unknown = sorted(set(flows) - set(_ENTRYPOINTS))
    if unknown:
        raise ValueError(f"unknown flow(s) {unknown}; deployable: {sorted(_ENTRYPOINTS)}")
    pools = work_pools(settings)
    manage = settings.deploy.manage_pool_templates
    job_variables = check_job_variables(settings) if manage else {}
    flow_source(settings)  # a bad source fails here, before any pool is touched
    out: dict[str, str] = {}
    with prefect_api(settings):
        found = prepare_work_pools(settings)
        if not manage:  # the pools keep their own templates: check against those
            job_variables = check_job_variables(settings, {r: pool.base_job_template for r, pool in found.items()})
        ensure_gpu_limit(gpu_limit)
        reconcile(tracking_uri=resolve_services(settings).mlflow_tracking_uri, local_work_pool=settings.stack.work_pool)
        for name in flows:
            role = pool_role(settings, name)
            flow = Flow.from_source(source=flow_source(settings), entrypoint=_ENTRYPOINTS[name])
            base: dict[str, Any] = {"job_variables": job_variables[role]} if job_variables[role] else {}
            defaults = default_parameters(flow.fn)
            variants: list[tuple[str, dict[str, Any]]] = []
            if name == "vecaf-pipeline":
                scheduled: dict[str, Any] = {
                    "schedules": [Cron(cron, timezone=timezone)], "paused": paused,
                    "parameters": {**defaults, **dict(pipeline_parameters or {})},
                }  # fmt: skip
                variants.append((PIPELINE_DEPLOYMENT, scheduled))
                variants.append((EXPERIMENT_DEPLOYMENT, {"parameters": experiment_parameters(pipeline_parameters)}))
            else:
                variants.append((DEPLOYMENT_NAMES[name][0], {"parameters": defaults}))
            for deployment, options in variants:
                with contextlib.redirect_stdout(io.StringIO()):
                    dep_id = flow.deploy(
                        name=deployment,
                        work_pool_name=pools[role],
                        build=False,
                        push=False,
                        print_next_steps=False,
                        ignore_warnings=True,
                        tags=["vecaf"],
                        enforce_parameter_schema=True,
                        description=DEPLOYMENT_DESCRIPTIONS.get(f"{name}/{deployment}"),
                        **base,
                        **options,
                    )
                close_deployment_parameters(dep_id)
                out[f"{name}/{deployment}"] = str(dep_id)
            retire_deployments(name)
    return out


def retire_deployments(flow_name: str) -> list[str]:
    """Delete the deployments of ``flow_name`` registered under a :data:`RETIRED_DEPLOYMENTS` name (current API).

    Returns:
        The ``"<flow>/<name>"`` deleted.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deleted = []
    with get_client(sync_client=True) as client:
        for old in RETIRED_DEPLOYMENTS:
            try:
                found = client.read_deployment_by_name(f"{flow_name}/{old}")
            except ObjectNotFound:
                continue
            client.delete_deployment(found.id)
            deleted.append(f"{flow_name}/{old}")
    return deleted


def trigger(
    settings: Settings,
    deployment: str,
    parameters: Mapping[str, Any] | None = None,
    *,
    wait: bool = False,
    timeout: float | None = None,
    on_poll: Callable[[Any], None] | None = None,
    poll_s: float = 3.0,
) -> Any:
    """Create a flow run of ``deployment`` (``"<flow>/<deployment>"``) and optionally wait for it to end.

    Args:
        settings: the settings (stack URLs).
        deployment: e.g. ``"vecaf-pipeline/production"``.
        parameters: parameters overriding the deployment's defaults (top-level keys replace whole values).
        wait: poll until the run is in a final state.
        timeout: seconds to wait at most (None: no limit); on expiry ``TimeoutError``.
        on_poll: called with the flow run at each poll (progress display).
        poll_s: seconds between polls.

    Returns:
        The Prefect ``FlowRun`` (final when ``wait``).

    Raises:
        ValueError: the server refused the parameters (the message says which).
    """
    from prefect.deployments import run_deployment
    from prefect.exceptions import PrefectHTTPStatusError

    with prefect_api(settings):
        try:
            # _sync: a sync caller inside a running event loop (a notebook, Playwright) still gets the run
            run = run_deployment(name=deployment, parameters=dict(parameters or {}), timeout=0, _sync=True)
        except PrefectHTTPStatusError as exc:
            detail = exc.response.text if exc.response is not None else str(exc)
            raise ValueError(f"Prefect refused a run of {deployment}: {detail}") from exc
        if not wait:
            return run
    return wait_for_run(settings, run.id, timeout=timeout, on_poll=on_poll, poll_s=poll_s)


def wait_for_run(
    settings: Settings,
    flow_run_id: Any,
    *,
    timeout: float | None = None,
    on_poll: Callable[[Any], None] | None = None,
    poll_s: float = 3.0,
) -> Any:
    """Poll a flow run until it reaches a final state; returns the final ``FlowRun``.

    Raises:
        TimeoutError: still not final after ``timeout`` seconds (None: wait as long as it takes).
    """
    from prefect.client.orchestration import get_client

    start = time.monotonic()
    with prefect_api(settings), get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if on_poll is not None:
                on_poll(run)
            if run.state is not None and run.state.is_final():
                return run
            if timeout is not None and time.monotonic() - start > timeout:
                raise TimeoutError(f"flow run {flow_run_id} did not finish within {timeout:.0f} s")
            time.sleep(poll_s)


PREFECT_YAML_HEADER = """\
# Deployments of the VeCAF pipeline, written by `vecaf deploy --write-prefect-yaml` from the settings.
# `vecaf deploy --prefect-file <this file>` registers them (pools checked, job templates written first);
# Prefect's own `prefect deploy --all --prefect-file <this file>` reads it too (without those checks).
"""


def _pull_step(source: Any) -> dict[str, Any]:
    if isinstance(source, str):
        return {"prefect.deployments.steps.set_working_directory": {"directory": source}}
    step = source.to_pull_step()
    return step[0] if isinstance(step, list) else step


def prefect_yaml(
    settings: Settings,
    *,
    pipeline_parameters: Mapping[str, Any] | None = None,
    cron: str = DEFAULT_CRON,
    timezone: str = "UTC",
    paused: bool = False,
    flows: tuple[str, ...] = tuple(_ENTRYPOINTS),
) -> str:
    """The deployments ``deploy`` would register, as a ``prefect.yaml`` (same arguments as :func:`deploy`).

    Raises:
        ValueError: an unknown flow name or a bad source.
        WorkPoolError: job variables that the pools' templates refuse.
    """
    import yaml

    unknown = sorted(set(flows) - set(_ENTRYPOINTS))
    if unknown:
        raise ValueError(f"unknown flow(s) {unknown}; deployable: {sorted(_ENTRYPOINTS)}")
    pools = work_pools(settings)
    job_variables = check_job_variables(settings)
    deployments = []
    for name in flows:
        role = pool_role(settings, name)
        entry: dict[str, Any] = {
            "name": DEPLOYMENT_NAMES[name][0],
            "entrypoint": _ENTRYPOINTS[name],
            "tags": ["vecaf"],
            "enforce_parameter_schema": True,
            "work_pool": {"name": pools[role], "job_variables": json.loads(json.dumps(job_variables[role]))},
        }
        if name == "vecaf-pipeline":
            entry["schedules"] = [{"cron": cron, "timezone": timezone, "active": not paused}]
            if pipeline_parameters is not None:
                entry["parameters"] = json.loads(json.dumps(dict(pipeline_parameters)))
        deployments.append(entry)
    from prefect import __version__ as prefect_version

    document = {
        "name": "vecaf-pipeline",
        "prefect-version": prefect_version,
        "pull": [_pull_step(flow_source(settings))],
        "deployments": deployments,
    }
    return PREFECT_YAML_HEADER + yaml.safe_dump(document, sort_keys=False)


def read_prefect_yaml(settings: Settings, text: str) -> tuple[Settings, dict[str, Any]]:
    """Turn a ``prefect.yaml`` of this project back into settings and :func:`deploy` keywords.

    The ``deploy`` section of ``settings`` is replaced by what the file says (source and branch from its pull
    step, the CPU and GPU pools and their job variables from the deployments' ``work_pool``); the pipeline's
    schedule and parameters become ``cron``/``timezone``/``paused``/``pipeline_parameters``.

    Returns:
        ``(settings, keywords)`` for ``deploy(settings, **keywords)``.

    Raises:
        ValueError: not a mapping, an unknown entrypoint, a pull step other than a folder, git clone or
            remote storage, more than two pools, or two job-variable sets for one pool; each names the part.
    """
    import yaml

    document = yaml.safe_load(text) or {}
    if not isinstance(document, dict) or not isinstance(document.get("deployments"), list):
        raise ValueError("prefect.yaml must be a mapping with a 'deployments' list")
    flow_of = {entry: name for name, entry in _ENTRYPOINTS.items()}
    source: str | None = None
    branch: str | None = None
    for step in document.get("pull") or []:
        (kind, args), = step.items()
        if kind.endswith("set_working_directory"):
            source = None if Path(args["directory"]) == PROJECT_ROOT else str(args["directory"])
        elif kind.endswith("git_clone"):
            source, branch = args["repository"], args.get("branch")
        elif kind.endswith("pull_from_remote_storage"):
            source = args["url"]
        else:
            raise ValueError(f"prefect.yaml pull step {kind!r} is not one vecaf deploy knows (folder, git, remote)")
    flows: list[str] = []
    pool_of: dict[str, str] = {}
    variables_of: dict[str, dict[str, Any]] = {}
    keywords: dict[str, Any] = {}
    for i, entry in enumerate(document["deployments"]):
        name = flow_of.get(entry.get("entrypoint"))
        if name is None:
            raise ValueError(
                f"prefect.yaml deployments[{i}].entrypoint = {entry.get('entrypoint')!r} is not a flow of this "
                f"project ({sorted(flow_of)})"
            )
        flows.append(name)
        pool = (entry.get("work_pool") or {}).get("name") or settings.stack.work_pool
        pool_of[name] = pool
        variables = dict((entry.get("work_pool") or {}).get("job_variables") or {})
        if variables_of.setdefault(pool, variables) != variables:
            raise ValueError(f"prefect.yaml gives pool {pool!r} two different job_variables sets")
        if name == "vecaf-pipeline":
            schedule = (entry.get("schedules") or [{}])[0]
            keywords.update(
                cron=schedule.get("cron", DEFAULT_CRON), timezone=schedule.get("timezone", "UTC"),
                paused=not schedule.get("active", True), pipeline_parameters=entry.get("parameters"),
            )  # fmt: skip
    pools = sorted(set(pool_of.values()), key=list(pool_of.values()).index)
    if len(pools) > 2:
        raise ValueError(f"prefect.yaml uses {len(pools)} work pools {pools}; vecaf deploys on two (CPU and GPU)")
    if len(pools) == 1:
        cpu_pool = gpu_pool = pools[0]
        gpu_flows = settings.deploy.gpu_flows
    else:  # the GPU pool is where training runs
        trainer = next((n for n in ("finetune", "vecaf-pipeline") if n in pool_of), None)
        gpu_pool = pool_of[trainer] if trainer else pools[-1]
        cpu_pool = next(p for p in pools if p != gpu_pool)
        gpu_flows = tuple(n for n in flows if pool_of[n] == gpu_pool)
    deploy_settings = settings.deploy.model_copy(
        update={
            "source": source, "branch": branch, "cpu_pool": cpu_pool, "gpu_pool": gpu_pool, "gpu_flows": gpu_flows,
            "job_variables": {"cpu": variables_of.get(cpu_pool, {}), "gpu": variables_of.get(gpu_pool, {})},
        }
    )  # fmt: skip
    keywords["flows"] = tuple(flows)
    return settings.model_copy(update={"deploy": deploy_settings}), keywords
