"""A worker on another host runs the whole pipeline, knowing only the services' URLs and credentials.

"Another host" is a network namespace this test makes (``ip netns``, as root; skipped with the reason when
that is not allowed), joined to this one by a veth pair. A stack of its own (S3, MLflow, Prefect server; no
worker) listens on the host side of the pair; a Prefect worker starts inside the namespace, from an empty
folder, with an empty state folder of its own and an environment cleared down to ``PATH``, the service
variables (``VECAF_SERVICES__*``, ``PREFECT_API_*``, ``AWS_*``), its own ``HOME``/``PREFECT_HOME``/state folder,
the offline switches of the model hubs and ``PYTHONPATH`` (the code, not state). Its loopback is not this
host's: anything that relied on a local address or on the first machine's disk would fail there.

The flows are deployed on a pool only that worker polls, and ``caption``, ``featurize``, ``finetune`` and
``promote`` run through their deployments one after the other, the worker's cache deleted before each. All
complete on that pool; the model is registered and becomes champion; the run state is in the bucket.
The namespace and the veth pair are always removed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.params import DataParams, RegistryParams, TrainingParams

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
REMOTE_POOL = "vecaf-remote-process"
DATA = DataParams(dataset="digits", pool_size=200, test_size=100, image_size=32, shard_size=200)
TRAINING = TrainingParams(ratio=0.05, loops=2, batch_budget=8, batch_size=8, lr=0.05)
REGISTRY = RegistryParams(experiment="vecaf-test-remote", model_name="vecaf-test-remote")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def netns():
    """``(namespace, host address, namespace address)``: a namespace joined to this one by a veth pair."""
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    token = secrets.token_hex(3)
    ns, host_if, ns_if = f"vecaf-{token}", f"vh{token}", f"vn{token}"
    subnet = int(token, 16) % 64  # 10.213.<subnet*4>.0/30
    host_addr, ns_addr = f"10.213.{subnet * 4}.1", f"10.213.{subnet * 4}.2"
    made = _ip("netns", "add", ns, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace (needs root or CAP_NET_ADMIN): {made.stderr.strip()}")
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", ns)
        _ip("addr", "add", f"{host_addr}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", f"{ns_addr}/30", "dev", ns_if)
        _ip("netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, host_addr, ns_addr
    finally:
        _ip("netns", "del", ns, check=False)
        _ip("link", "del", host_if, check=False)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _worker_env(stack_env: dict[str, str], home: Path, state: Path, urls: dict[str, str], bucket: str) -> dict:
    """The remote worker's whole environment: PATH, service URLs and credentials, its own folders."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "PYTHONPATH": str(PROJECT_ROOT),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VECAF_STACK__STATE_DIR": str(state),
        "VECAF_SERVICES__PREFECT_API_URL": urls["prefect_api_url"],
        "VECAF_SERVICES__MLFLOW_TRACKING_URI": urls["mlflow_url"],
        "VECAF_SERVICES__S3_ENDPOINT_URL": urls["s3_endpoint_url"],
        "VECAF_SERVICES__BUCKET": bucket,
    }
    env.update({k: v for k, v in stack_env.items() if k.startswith(("PREFECT_API_", "AWS_"))})
    return env


def _worker_online(settings, name: str, timeout: float = 180.0) -> None:
    from prefect.client.orchestration import get_client

    from flows.deploy import prefect_api

    deadline = time.monotonic() + timeout
    with prefect_api(settings):
        while time.monotonic() < deadline:
            with get_client(sync_client=True) as client:
                workers = client.read_workers_for_work_pool(REMOTE_POOL)
            if any(w.name == name and str(w.status).upper().endswith("ONLINE") for w in workers):
                return
            time.sleep(2)
    raise TimeoutError(f"the worker {name} in the namespace did not come online within {timeout:.0f} s")


def test_a_worker_in_another_network_namespace_runs_every_flow(netns, stack_settings, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.deploy import base_job_template, deploy, prefect_api, trigger
    from infra.stack import running_stack, stack_env, stack_urls
    from tasks.tracking import mlflow_client
    from vecaf.settings import Settings

    ns, host_addr, _ns_addr = netns
    ss = stack_settings(tmp_path / "state", host=host_addr)
    settings = Settings(stack=ss, deploy={"cpu_pool": REMOTE_POOL, "gpu_pool": REMOTE_POOL})
    urls = stack_urls(ss)
    assert all(host_addr in urls[k] for k in ("prefect_api_url", "mlflow_url", "s3_endpoint_url"))
    remote = tmp_path / "remote"
    home, state, cwd = remote / "home", remote / "state", remote / "empty"
    for folder in (home, state, cwd):
        folder.mkdir(parents=True)
    with running_stack(ss, only=("s3", "mlflow", "prefect"), timeout=300.0):
        env = stack_env(ss)
        with prefect_api(settings), get_client(sync_client=True) as client:
            client.create_work_pool(
                WorkPoolCreate(name=REMOTE_POOL, type="process", base_job_template=base_job_template("process", "gpu"))
            )
        worker_name = "remote-worker"
        log = (tmp_path / "remote-worker.log").open("wb")
        worker = subprocess.Popen(
            ["ip", "netns", "exec", ns, "env", "-i", *(f"{k}={v}" for k, v in
             _worker_env(env, home, state, urls, ss.bucket).items()),
             sys.executable, "-m", "prefect", "worker", "start", "--pool", REMOTE_POOL, "--type", "process",
             "--name", worker_name, "--install-policy", "never"],
            cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            _worker_online(settings, worker_name)
            # `ip netns exec` and `env -i` exec in place: the worker's process is in the other namespace.
            assert os.readlink(f"/proc/{worker.pid}/ns/net") != os.readlink("/proc/self/ns/net")
            assert "PREFECT_API_URL" in (Path(f"/proc/{worker.pid}/environ").read_bytes().decode(errors="replace"))
            ids = deploy(settings, flows=("caption", "featurize", "finetune", "promote"))
            data = DATA.model_dump(mode="json")
            registry = REGISTRY.model_dump(mode="json")
            steps = [
                ("caption/standalone", {"data": data}),
                ("featurize/standalone", {"data": data}),
                ("finetune/standalone", {"data": data, "training": TRAINING.model_dump(mode="json"),
                                        "registry": registry}),
                ("promote/manual", {"data": DATA.held_out().model_dump(mode="json"),
                                    "registry": REGISTRY.promotion().model_dump(mode="json")}),
            ]  # fmt: skip
            runs = {}
            for deployment, params in steps:
                shutil.rmtree(state / "work", ignore_errors=True)  # the worker's cache is lost before each flow
                run = trigger(settings, deployment, params, wait=True, timeout=900, poll_s=2.0)
                assert run.state.is_completed(), f"{deployment}: {run.state.message}; worker log: {log.name}"
                assert run.work_pool_name == REMOTE_POOL and str(run.deployment_id) == ids[deployment]
                runs[deployment] = run
        finally:
            _stop(worker)
            log.close()
        client = mlflow_client(urls["mlflow_url"])
        experiment = client.get_experiment_by_name(REGISTRY.experiment)
        finetune_run = str(runs["finetune/standalone"].id)
        found = client.search_runs([experiment.experiment_id], f"tags.prefect_flow_run_id = '{finetune_run}'")
        assert len(found) == 1 and found[0].info.status == "FINISHED"
        run = found[0]
        version = client.get_model_version_by_alias(REGISTRY.model_name, "champion")
        assert version.run_id == run.info.run_id and version.version == run.data.tags["registered_version"]
        assert version.tags["promotion.decision"] == "promoted"
        from infra.stack import s3_client

        bucket, _, key = run.data.tags["run_state_uri"][len("s3://") :].partition("/")
        listed = s3_client(ss).list_objects_v2(Bucket=bucket, Prefix=key + "/").get("Contents", [])
        stored = {o["Key"][len(key) + 1 :] for o in listed}
        assert {"checkpoints/loop-2.pt", "loop-2.json", "picks-loop-2.parquet", "model/model.safetensors"} <= stored
        # The worker kept its Feast store and cache in its own state folder, none in this stack's.
        assert (state / "feast").is_dir() and (state / "work" / "cache").is_dir()
        assert not (Path(ss.state_dir) / "feast").exists()
