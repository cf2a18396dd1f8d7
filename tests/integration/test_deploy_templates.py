"""The shipped work-pool job templates (``infra/work_pools/``) and the worker image (``infra/docker/Dockerfile``).

Each template is checked with Prefect's own code: the server's ``WorkPoolCreate`` model (which refuses a
template whose placeholders have no variable), the JSON-schema validator the server applies to job variables,
and the worker's job configuration model of its pool type (``ProcessJobConfiguration``,
``KubernetesWorkerJobConfiguration``, ``DockerWorkerJobConfiguration``) built from the template and made ready
for a flow run, as a worker does. A caller's ``command`` (or image, or a code-loading environment variable) is
refused, and the GPU templates request ``nvidia.com/gpu``. The image builds where a container engine runs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from flows.deploy import POOL_ROLES, POOL_TYPES, WORK_POOL_TEMPLATES, base_job_template, template_file

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CASES = [(t, r) for t in POOL_TYPES for r in POOL_ROLES]
CALLER_ATTEMPTS = [
    {"command": "touch /tmp/owned"},
    {"image": "attacker/image:latest"},
    {"working_dir": "/tmp"},
    {"env": {"PYTHONPATH": "/tmp/evil"}},
    {"env": {"PREFECT_API_URL": "http://attacker.invalid/api"}},
    {"env": {"LD_PRELOAD": "/tmp/evil.so"}},
    {"volumes": ["/:/host"]},
    {"privileged": True},
    {"service_account_name": "cluster-admin"},
    {"container_create_kwargs": {"entrypoint": "sh"}},
]


def _config_class(pool_type: str) -> Any:
    if pool_type == "process":
        from prefect.workers.process import ProcessJobConfiguration

        return ProcessJobConfiguration
    if pool_type == "kubernetes":
        kubernetes_worker = pytest.importorskip(
            "prefect_kubernetes.worker", reason="prefect-kubernetes (extra 'kubernetes') is not installed"
        )
        return kubernetes_worker.KubernetesWorkerJobConfiguration
    docker_worker = pytest.importorskip(
        "prefect_docker.worker", reason="prefect-docker (extra 'docker') is not installed"
    )
    return docker_worker.DockerWorkerJobConfiguration


def _worker_class(pool_type: str) -> Any:
    if pool_type == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker
    if pool_type == "kubernetes":
        from prefect_kubernetes.worker import KubernetesWorker

        return KubernetesWorker
    from prefect_docker.worker import DockerWorker

    return DockerWorker


def _prepared_config(pool_type: str, template: dict[str, Any], values: dict[str, Any]) -> Any:
    """The worker's job configuration for a flow run, built as ``from_template_and_values`` and then
    ``prepare_for_flow_run`` build it in a worker."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.utilities.templating import apply_values

    cls = _config_class(pool_type)
    variables = cls._get_base_config_defaults(template["variables"].get("properties", {}))
    variables.update(values)
    config = cls(**apply_values(template=template["job_configuration"], values=variables))
    config.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), flow_id=uuid.uuid4(), name="shard-run"))
    return config


def test_every_pool_type_and_role_has_a_template_file() -> None:
    shipped = {p.name for p in WORK_POOL_TEMPLATES.glob("*.json")}
    assert {template_file(t, r).name for t, r in CASES} == shipped


@pytest.mark.parametrize(("pool_type", "role"), CASES)
def test_template_is_accepted_by_the_server_schema_for_its_pool_type(pool_type: str, role: str) -> None:
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.schema_tools import is_valid_schema

    template = base_job_template(pool_type, role)
    pool = WorkPoolCreate(name=f"vecaf-{pool_type}-{role}", type=pool_type, base_job_template=template)
    assert pool.base_job_template == template
    is_valid_schema(template["variables"], preprocess=False)
    # the worker of that type builds a complete job from it
    config = _prepared_config(pool_type, template, {})
    # every key of the template's job configuration is a field of the worker's configuration model
    assert set(template["job_configuration"]) <= set(type(config).model_fields)
    # the worker's own default template uses the same configuration keys (no key the worker would ignore)
    default = _worker_class(pool_type).get_default_base_job_template()
    assert set(template["job_configuration"]) <= set(default["job_configuration"])


@pytest.mark.parametrize(("pool_type", "role"), CASES)
def test_the_flow_run_command_comes_from_the_worker_and_the_image_from_the_template(pool_type: str, role: str) -> None:
    template = base_job_template(pool_type, role, image="registry.example/vecaf-worker:1.2")
    config = _prepared_config(pool_type, template, {})
    stock = _prepared_config(pool_type, _worker_class(pool_type).get_default_base_job_template(), {})
    assert config.command == stock.command and "prefect" in config.command  # the worker's own flow-run command
    if pool_type == "kubernetes":
        container = config.job_manifest["spec"]["template"]["spec"]["containers"][0]
        stock_container = stock.job_manifest["spec"]["template"]["spec"]["containers"][0]
        assert container["args"] == stock_container["args"]
        assert container["image"] == "registry.example/vecaf-worker:1.2"
    elif pool_type == "docker":
        assert config.image == "registry.example/vecaf-worker:1.2"


def _attempt_id(attempt: dict[str, Any]) -> str:
    key = next(iter(attempt))
    return f"{key}.{next(iter(attempt[key]))}" if key == "env" else key


@pytest.mark.parametrize(("pool_type", "role"), CASES)
@pytest.mark.parametrize("attempt", CALLER_ATTEMPTS, ids=_attempt_id)
def test_a_caller_cannot_set_command_image_or_code_loading_env(
    pool_type: str, role: str, attempt: dict[str, Any]
) -> None:
    from prefect.utilities.schema_tools import ValidationError, validate

    schema = base_job_template(pool_type, role)["variables"]
    with pytest.raises(ValidationError):
        validate(attempt, schema, raise_on_error=True, preprocess=True, ignore_required=True)


@pytest.mark.parametrize(("pool_type", "role"), CASES)
def test_tuning_variables_are_still_accepted_and_reach_the_job(pool_type: str, role: str) -> None:
    from prefect.utilities.schema_tools import validate

    values = {"env": {"OMP_NUM_THREADS": "3", "VECAF_MODELS__BATCH_SIZE": "128"}}
    validate(values, base_job_template(pool_type, role)["variables"], raise_on_error=True, ignore_required=True)
    config = _prepared_config(pool_type, base_job_template(pool_type, role), values)
    if pool_type == "kubernetes":
        container = config.job_manifest["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
    else:
        env = config.env
    assert env["OMP_NUM_THREADS"] == "3" and env["VECAF_MODELS__BATCH_SIZE"] == "128"


def test_the_gpu_templates_request_nvidia_gpus_and_the_cpu_templates_do_not() -> None:
    for role in POOL_ROLES:
        k8s = _prepared_config("kubernetes", base_job_template("kubernetes", role), {})
        pod = k8s.job_manifest["spec"]["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        docker = _prepared_config("docker", base_job_template("docker", role), {})
        requests = (docker.container_create_kwargs or {}).get("device_requests", [])
        if role == "gpu":
            assert int(limits["nvidia.com/gpu"]) == 1
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
            assert [r["capabilities"] for r in requests] == [[["gpu"]]] and requests[0]["driver"] == "nvidia"
        else:
            assert "nvidia.com/gpu" not in limits and requests == []
    two = _prepared_config("kubernetes", base_job_template("kubernetes", "gpu"), {"gpu_count": 2})
    container = two.job_manifest["spec"]["template"]["spec"]["containers"][0]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 2


def test_docker_gpu_device_request_is_one_docker_py_accepts() -> None:
    docker_types = pytest.importorskip("docker.types", reason="the docker package is not installed")
    template = base_job_template("docker", "gpu")
    for request in template["job_configuration"]["container_create_kwargs"]["device_requests"]:
        built = docker_types.DeviceRequest(**request)
        assert built["Driver"] == "nvidia" and built["Capabilities"] == [["gpu"]] and built["Count"] == -1


def test_template_files_are_plain_json_objects() -> None:
    for path in WORK_POOL_TEMPLATES.glob("*.json"):
        data = json.loads(path.read_text())
        assert set(data) == {"job_configuration", "variables"}, path.name
        assert data["variables"]["additionalProperties"] is False, path.name
        assert "command" not in data["variables"]["properties"], path.name


def _engine_runs() -> str | None:
    """None when a container engine answers, else the reason it does not."""
    docker = shutil.which("docker")
    if docker is None:
        return "no docker CLI on this machine"
    probe = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return f"`docker info` failed (no container engine runs here): {(probe.stderr or probe.stdout).strip()[-200:]}"
    return None


@pytest.mark.integration
@pytest.mark.slow
def test_the_worker_image_builds_and_imports_the_pipeline() -> None:
    reason = _engine_runs()
    if reason:
        pytest.skip(reason)
    tag = f"vecaf-worker-test:{uuid.uuid4().hex[:8]}"
    build = subprocess.run(
        ["docker", "build", "-f", "infra/docker/Dockerfile", "-t", tag, "."],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    try:
        assert build.returncode == 0, build.stderr[-3000:]
        run = subprocess.run(
            ["docker", "run", "--rm", tag, "python", "-c", "import flows.pipeline, prefect_kubernetes; print('ok')"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert run.stdout.strip() == "ok", run.stderr[-2000:]
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=300)


def test_prefect_yaml_round_trip_keeps_pools_roles_source_and_schedule() -> None:
    from flows.deploy import _ENTRYPOINTS, check_job_variables, pool_role, prefect_yaml, read_prefect_yaml, work_pools
    from vecaf.settings import Settings

    settings = Settings(
        deploy={
            "pool_type": "kubernetes", "cpu_pool": "vecaf-cpu", "gpu_pool": "vecaf-gpu",
            "source": "https://git.example/team/vecaf.git", "branch": "release-1",
            "job_variables": {"gpu": {"gpu_count": 2, "env": {"OMP_NUM_THREADS": "8"}}},
        }
    )  # fmt: skip
    text = prefect_yaml(settings, pipeline_parameters={"training": {"loops": 3}}, cron="0 5 * * 1", paused=True)
    back, keywords = read_prefect_yaml(Settings(deploy={"pool_type": "kubernetes"}), text)
    assert work_pools(back) == {"cpu": "vecaf-cpu", "gpu": "vecaf-gpu"}
    assert {n: pool_role(back, n) for n in _ENTRYPOINTS} == {n: pool_role(settings, n) for n in _ENTRYPOINTS}
    assert check_job_variables(back) == check_job_variables(settings)
    assert (back.deploy.source, back.deploy.branch) == ("https://git.example/team/vecaf.git", "release-1")
    assert keywords == {
        "cron": "0 5 * * 1", "timezone": "UTC", "paused": True, "pipeline_parameters": {"training": {"loops": 3}},
        "flows": tuple(_ENTRYPOINTS),
    }  # fmt: skip
    with pytest.raises(ValueError, match=r"deployments\[0\]\.entrypoint"):
        read_prefect_yaml(settings, text.replace("flows/pipeline.py:vecaf_pipeline", "evil.py:run"))
    with pytest.raises(ValueError, match="pull step"):
        shell = text.replace("prefect.deployments.steps.git_clone", "prefect.deployments.steps.run_shell_script")
        read_prefect_yaml(settings, shell)


@pytest.mark.parametrize(
    ("deploy", "message"),
    [
        ({"gpu_pol": "vecaf-gpu"}, "gpu_pol"),
        ({"pool_type": "ecs"}, "pool_type"),
        ({"fan_out_shards": "sometimes"}, "fan_out_shards"),
    ],
)
def test_bad_deploy_settings_name_the_setting(deploy: dict[str, Any], message: str) -> None:
    from pydantic import ValidationError

    from vecaf.settings import Settings

    with pytest.raises(ValidationError, match=message):
        Settings(deploy=deploy)


def test_bad_sources_and_job_variable_roles_are_refused_before_any_server_call() -> None:
    from flows.deploy import WorkPoolError, check_job_variables, flow_source
    from vecaf.settings import Settings

    with pytest.raises(ValueError, match="deploy.branch = 'main' needs a git URL"):
        flow_source(Settings(deploy={"branch": "main"}))
    with pytest.raises(WorkPoolError, match=r"keys must be pool roles \['cpu', 'gpu'\], got \['tpu'\]"):
        check_job_variables(Settings(deploy={"job_variables": {"tpu": {}}}))
    with pytest.raises(WorkPoolError, match="gpu_count"):
        check_job_variables(Settings(deploy={"pool_type": "kubernetes", "job_variables": {"gpu": {"gpu_count": 64}}}))
    assert str(flow_source(Settings())) == str(PROJECT_ROOT)
    git = flow_source(Settings(deploy={"source": "git@git.example:team/vecaf.git", "branch": "main"}))
    assert git.to_pull_step()["prefect.deployments.steps.git_clone"]["branch"] == "main"
