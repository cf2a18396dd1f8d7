"""What a user reads in the MLflow and Prefect UIs after a pipeline run, checked in a real browser.

The pipeline runs once through its ``vecaf-pipeline/experiment`` deployment on the session stack (digits, a
500-image pool, 2 loops, as ``tests/flows/test_pipeline.py``); then Debian's Chromium, driven by Playwright,
opens the pages the pipeline prints and links to:

- MLflow (the printed run URL, which opens in the model-training view): the model registry in the sidebar;
  the logged model's page shows the run's final top-1 (not the untrained model's); the run's artifacts hold
  the figures;
- Prefect (after logging in with the stack's auth string, as a user would): the top-level run's summary
  artifact and its progress artifacts (every step at 100 %); the experiment deployment's custom-run form
  with titled fields, no "(Optional)" on fields that have defaults, ranges and defaults in the descriptions,
  ``<placeholders>`` shown; a run whose parameters break a rule between fields (batch budget < loops)
  fails with that rule, on one line, as its state message on the run's page.

Screenshots go to ``.vecaf/screenshots/`` (not committed). Without ``/usr/bin/chromium`` (``make browser``
installs it as root) the tests skip and say so.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from flows.params import DataParams, PipelineParams, RegistryParams, TrainingParams

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SCREENSHOTS = Path(__file__).resolve().parents[2] / ".vecaf" / "screenshots"
MODEL = "vecaf-test-browser"
EXPERIMENT = "vecaf-test-browser"
TIMEOUT_MS = 60_000

if not Path(CHROMIUM).is_file():
    pytest.skip(
        f"{CHROMIUM} is missing: the browser tests need Debian's chromium (`make browser` as root, or "
        "`sudo apt-get install chromium`)",
        allow_module_level=True,
    )
playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


def pipeline_params() -> PipelineParams:
    return PipelineParams(
        data=DataParams(dataset="digits", pool_size=500, test_size=200, image_size=32, shard_size=250),
        training=TrainingParams(ratio=0.04, loops=2, batch_budget=20, batch_size=16, lr=0.05),
        registry=RegistryParams(experiment=EXPERIMENT, model_name=MODEL, promote=False),
    )


@pytest.fixture(scope="module")
def run(stack) -> SimpleNamespace:
    """Deploy, run the pipeline through ``vecaf-pipeline/experiment``, and collect the URLs it links to."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import EXPERIMENT_DEPLOYMENT, deploy, trigger
    from flows.runtime import flow_run_url
    from infra.stack import stack_urls
    from tasks.tracking import mlflow_client, mlflow_logged_model_url, mlflow_run_url
    from vecaf.settings import load_settings

    patch = pytest.MonkeyPatch()
    for key, value in stack.env.items():
        patch.setenv(key, value)
    try:
        with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api_url}):
            settings = load_settings()
            ids = deploy(settings)
            flow_run = trigger(
                settings, f"vecaf-pipeline/{EXPERIMENT_DEPLOYMENT}", pipeline_params().flow_parameters(), wait=True,
                timeout=900, poll_s=2.0,
            )  # fmt: skip
            assert flow_run.state.is_completed(), flow_run.state.message
            client = mlflow_client(stack.mlflow_url)
            exp = client.get_experiment_by_name(EXPERIMENT)
            found = client.search_runs([exp.experiment_id], f"tags.prefect_pipeline_run_id = '{flow_run.id}'")
            mlrun = found[0]
            models = client.search_logged_models([exp.experiment_id], f"source_run_id='{mlrun.info.run_id}'")
            urls = stack_urls(settings)
            yield SimpleNamespace(
                stack=stack, settings=settings, ids=ids, flow_run=flow_run, client=client, mlflow_run=mlrun,
                experiment=exp,
                model_id=models[0].model_id, final_top1=mlrun.data.metrics["final_test_top1"],
                run_url=mlflow_run_url(stack.mlflow_url, exp.experiment_id, mlrun.info.run_id),
                model_url=mlflow_logged_model_url(stack.mlflow_url, exp.experiment_id, models[0].model_id),
                flow_run_url=flow_run_url(urls["prefect_ui_url"], str(flow_run.id)),
                prefect_ui=urls["prefect_ui_url"].rstrip("/"),
            )  # fmt: skip
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=30)
            EventsWorker.drain_all(timeout=30)
    finally:
        patch.undo()


@pytest.fixture(scope="module")
def browser() -> Any:
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser) -> Any:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    yield tab
    context.close()


def shot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=False)


def see(page: Any, locator: Any, name: str) -> Any:
    """Wait until ``locator`` is visible; on a timeout keep a screenshot and fail with what the page shows."""
    try:
        locator.first.wait_for()
    except playwright_api.TimeoutError:
        shot(page, f"failed-{name}")
        text = page.locator("body").inner_text()[:1500]
        pytest.fail(f"{name}: not visible at {page.url} within {TIMEOUT_MS / 1000:.0f} s; the page shows: {text!r}")
    return locator.first


def prefect_login(page: Any, run: SimpleNamespace, url: str) -> None:
    """Log in on Prefect's login page by typing the auth string like a user (a retry if the app was still
    redirecting), then open ``url``."""
    for _ in range(3):
        page.goto(f"{run.prefect_ui}/login")
        password = page.locator("input[type=password]")
        try:
            password.wait_for(state="visible", timeout=15_000)
        except playwright_api.TimeoutError:
            break  # no login page: a stack without auth
        page.wait_for_load_state("networkidle")
        password.fill(run.stack.prefect_auth_string)
        page.get_by_role("button", name="Login").click()
        try:
            page.wait_for_url(lambda u: "/login" not in u, timeout=15_000)
            break
        except playwright_api.TimeoutError:
            continue
    else:
        shot(page, "failed-prefect-login")
        pytest.fail(f"could not log in to the Prefect UI at {run.prefect_ui}")
    page.wait_for_load_state("networkidle")
    page.goto(url)


def test_mlflow_opens_in_the_model_training_view_with_the_registry(run, page):
    assert "workflowType=machine_learning" in run.run_url
    assert run.experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    page.goto(run.run_url)
    page.get_by_text(run.mlflow_run.info.run_name).first.wait_for()
    registry = page.locator("a[href*='#/models']").first
    registry.wait_for()
    shot(page, "mlflow-run")
    assert registry.is_visible()


def test_logged_model_page_shows_the_final_top1(run, page):
    value = run.final_top1
    page.goto(run.model_url)
    see(page, page.get_by_text("test_top1"), "mlflow-logged-model")
    shot(page, "mlflow-logged-model")
    text = page.locator("body").inner_text()
    shown = [f"{value:.4f}".rstrip("0"), f"{value:.3f}", str(round(value, 4)), str(value)]
    assert any(s in text for s in shown), f"final top-1 {value} not on the logged-model page: {text[:2000]}"


def test_run_artifacts_hold_the_figures(run, page):
    page.goto(run.run_url.replace("?", "/artifacts?"))
    page.get_by_text("figures", exact=True).first.click()
    page.get_by_text("accuracy.png").first.wait_for()
    page.get_by_text("accuracy.png").first.click()
    try:
        page.wait_for_function("() => [...document.images].some(i => i.complete && i.naturalWidth >= 300)")
    except playwright_api.TimeoutError:
        shot(page, "failed-mlflow-figures")
        pytest.fail(f"no figure rendered at {page.url}")
    shot(page, "mlflow-figures")
    paths = {a.path for a in run.client.list_artifacts(run.mlflow_run.info.run_id, "figures")}
    assert "figures/accuracy.png" in paths and "figures/class-histogram.png" in paths


def test_pipeline_run_carries_the_summary_artifact(run, page):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.flow_run.id]))
        )
    keys = {a.key for a in arts}
    assert {"vecaf-pipeline-summary", "mlflow-run", "pipeline-progress"} <= keys, keys
    prefect_login(page, run, run.flow_run_url)
    see(page, page.get_by_text("Artifacts", exact=True), "prefect-artifacts-tab").click()
    # the run's own artifacts (progress) come first; the task runs' ones (the summary) load when scrolled to
    see(page, page.get_by_text("Task runs", exact=True), "prefect-run-artifacts").scroll_into_view_if_needed()
    see(page, page.get_by_text("vecaf-pipeline-summary"), "prefect-run-artifacts").scroll_into_view_if_needed()
    shot(page, "prefect-run-artifacts")
    summary = next(a for a in arts if a.key == "vecaf-pipeline-summary")
    page.goto(f"{run.prefect_ui}/artifacts/artifact/{summary.id}")
    see(page, page.get_by_text("Final held-out top-1"), "prefect-summary")
    shot(page, "prefect-summary")
    text = page.locator("body").inner_text()
    assert f"{run.final_top1:.4f}" in text
    assert run.mlflow_run.info.run_id in text


def test_custom_run_form_has_titled_fields(run, page):
    dep_id = run.ids["vecaf-pipeline/experiment"]
    prefect_login(page, run, f"{run.prefect_ui}/deployments/deployment/{dep_id}/run")
    see(page, page.get_by_text("Learning rate"), "prefect-custom-run")
    shot(page, "prefect-custom-run")
    text = page.locator("body").inner_text()
    for title in ("Learning rate", "Loops (L)", "Registered model name", "Promote after finetuning", "Training"):
        assert title in text, title
    assert "Lam Bw" not in text and "Lr\n" not in text
    # fields with a default are required in the schema: the form marks none of them "(Optional)"
    for title in ("Learning rate", "Loops (L)", "Registered model name", "Training", "Data"):
        assert f"{title} (Optional)" not in text, title
    assert "PVM checkpoint file (Optional)" in text  # no default: optional, and the form says so
    # ranges, defaults and placeholders in the descriptions
    assert "Range: 1 ≤ x ≤ 100. Default: 3." in text
    assert "Range: 0 < x ≤ 10. Example: 0.05. Default: 0.0005." in text
    assert "'hf:<folder>' or 'open_clip:<spec>'" in text


def test_pipeline_run_shows_the_progress_of_each_step(run, page):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run.flow_run.id]), type=ArtifactFilterType(any_=["progress"])
            )
        )
    values = {a.key: float(a.data) for a in arts}
    steps = ("pipeline", "caption", "embed", "select", "train")
    assert values == {f"{s}-progress": 100.0 for s in steps}, values
    prefect_login(page, run, run.flow_run_url)
    see(page, page.get_by_text("Artifacts", exact=True), "prefect-artifacts-tab").click()
    see(page, page.get_by_text("train-progress"), "prefect-progress-artifacts")
    shot(page, "prefect-progress")
    text = page.locator("body").inner_text()
    for step in steps:
        assert f"{step}-progress" in text, step
    assert "train: 20/20 batches" in text


def test_a_misfit_between_fields_fails_the_run_with_one_line(run, page):
    from flows.deploy import EXPERIMENT_DEPLOYMENT, trigger
    from flows.runtime import flow_run_url

    bad = pipeline_params().flow_parameters()
    bad["training"].update(loops=5, batch_budget=2)  # each in range: the server's schema cannot see the misfit
    failed = trigger(
        run.settings, f"vecaf-pipeline/{EXPERIMENT_DEPLOYMENT}", bad, wait=True, timeout=600, poll_s=2.0
    )
    message = failed.state.message or ""
    assert failed.state.is_failed(), failed.state
    assert "batch_budget (2) must be at least loops (5): every loop trains a batch" in message, message
    assert "\n" not in message.strip(), message
    prefect_login(page, run, flow_run_url(run.prefect_ui, str(failed.id)))
    see(page, page.get_by_text("batch_budget (2) must be at least loops (5)"), "prefect-misfit-run")
    shot(page, "prefect-misfit-run")

