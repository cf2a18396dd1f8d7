"""Shared test set-up: offline hubs, GPU tests skipped without CUDA, deterministic torch."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _restore_environ():
    """Give each test the environment it started with: code under test writes to it (``mlflow.set_tracking_uri``
    sets ``MLFLOW_TRACKING_URI``), and a client variable left pointing at a test's own, stopped server would be
    taken for an external service by the next test (``vecaf.services``: client variables win over the stack)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    import torch

    torch.manual_seed(0)
    yield


# The real local stack (Prefect, MLflow, S3, worker) on free ports, shared by tests/integration and tests/flows.
from stack_fixtures import free_port, stack, stack_clients, stack_environ, stack_settings  # noqa: E402,F401
