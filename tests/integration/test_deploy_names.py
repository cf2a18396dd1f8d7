"""Deployment names and the promote form on the real stack (``flows/deploy.py``).

A deployment under a retired name (``promote/on-demand``, as earlier versions registered it) is deleted by the
next ``deploy``; ``promote/manual`` stores the flow's defaults and the form schema, so the run ``vecaf promote``
sends (the registered model and margin only) is accepted and completes, while a run that passes the
pipeline's whole ``data`` group (fields promotion does not use) is refused before it exists.
"""

from __future__ import annotations

import pytest

from flows.params import DataParams, PromotionParams

pytestmark = [pytest.mark.integration]


@pytest.fixture
def settings(stack):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from vecaf.settings import load_settings

    patch = pytest.MonkeyPatch()
    for key, value in stack.env.items():
        patch.setenv(key, value)
    try:
        with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api_url}):
            yield load_settings()
    finally:
        patch.undo()


def test_deploy_retires_old_names_and_the_promote_form_takes_what_promotion_uses(settings):
    from prefect import Flow
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from flows.deploy import PROJECT_ROOT, default_parameters, deploy, trigger
    from flows.promote import promote

    old = Flow.from_source(source=str(PROJECT_ROOT), entrypoint="flows/promote.py:promote")
    old.deploy(name="on-demand", work_pool_name=settings.stack.work_pool, build=False, push=False,
               print_next_steps=False, ignore_warnings=True)  # fmt: skip
    ids = deploy(settings, flows=("promote",))
    assert list(ids) == ["promote/manual"]
    with get_client(sync_client=True) as client:
        with pytest.raises(ObjectNotFound):
            client.read_deployment_by_name("promote/on-demand")
        dep = client.read_deployment(ids["promote/manual"])
    assert dep.enforce_parameter_schema
    assert dep.parameters == default_parameters(promote.fn)
    assert set(dep.parameter_openapi_schema["required"]) == {"data", "registry", "device", "rollback"}
    assert "by hand" in dep.description

    only_registry = {"registry": PromotionParams(model_name="vecaf-test-no-such-model").model_dump(mode="json")}
    run = trigger(settings, "promote/manual", only_registry, wait=True, timeout=600, poll_s=2.0)
    assert run.state.is_completed(), run.state.message
    whole_data = {"data": DataParams(dataset="digits").model_dump(mode="json")}
    with pytest.raises(ValueError, match="Prefect refused a run of promote/manual.*'image_size'.*unexpected"):
        trigger(settings, "promote/manual", whole_data)
