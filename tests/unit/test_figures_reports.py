"""Figures (``tasks/figures.py``), the pipeline summary text and the experiment deployment's defaults."""

from __future__ import annotations

import io

import numpy as np
import pytest

from tasks import figures


def _png_size(fig) -> tuple[int, int]:
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    figures.plt.close(fig)
    return Image.open(io.BytesIO(buf.getvalue())).size


def test_accuracy_figure_draws_the_curve_and_one_line_per_loop():
    fig = figures.accuracy_figure([(0, 0.1), (10, 0.4), (20, 0.6)], [10, 20])
    ax = fig.axes[0]
    assert len(ax.lines) == 3  # the curve and two loop boundaries
    assert list(ax.lines[0].get_xdata()) == [0, 10, 20]
    assert _png_size(fig)[0] > 100


def test_accuracy_figure_refuses_an_empty_curve():
    with pytest.raises(ValueError, match="at least one"):
        figures.accuracy_figure([], [])


def test_class_histogram_counts_each_loops_picks():
    fig = figures.class_histogram_figure({1: ["a", "a", "b"], 2: ["c"]}, ["a", "b", "c"])
    heights = [[p.get_height() for p in c] for c in fig.axes[0].containers]
    figures.plt.close(fig)
    assert heights == [[2, 1, 0], [0, 0, 1]]


def test_selection_grid_has_a_title_per_image_and_checks_counts():
    images = [np.zeros((8, 8), np.uint8), np.ones((8, 8, 3), np.uint8)]
    fig = figures.selection_grid_figure(images, ["zero: a caption", "one"], columns=8)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    figures.plt.close(fig)
    assert titles == ["zero: a caption", "one"]
    with pytest.raises(ValueError, match="2 images but 1 titles"):
        figures.selection_grid_figure(images, ["x"])


def test_batches_to_accuracy_finds_the_first_batch_or_none():
    b2a = figures.batches_to_accuracy([(0, 0.1), (5, 0.5), (10, 0.7)], [0.5, 0.6, 0.9])
    assert b2a == {0.5: 5, 0.6: 10, 0.9: None}
    figures.plt.close(figures.batches_to_accuracy_figure(b2a))


def test_pipeline_summary_links_the_run_and_says_when_promotion_was_off():
    from tasks.reports import pipeline_summary_markdown

    report = {
        "final_top1": 0.5312, "run_url": "http://m/#/experiments/1/runs/r1?workflowType=machine_learning",
        "model_url": None, "model_id": None, "version_url": "http://m/#/models/x/versions/3",
        "loops": [{"loop": 1, "budget": 20, "batches": 10, "end_batches": 10, "top1": 0.4, "test_loss": 1.5}],
    }  # fmt: skip
    text = pipeline_summary_markdown(report, None, tracking_uri="http://m", run_id="r1", model_name="x", version="3")
    assert "**Final held-out top-1: 0.5312**" in text
    assert "[r1](http://m/#/experiments/1/runs/r1?workflowType=machine_learning)" in text
    assert "[x version 3](http://m/#/models/x/versions/3)" in text
    assert "| 1 | 20 | 10 | 0.4000 | 1.5000 |" in text
    assert "Promotion was off" in text
    decided = pipeline_summary_markdown(
        report, {"outcome": "promoted", "reason": "first champion", "champion_after": "3"}, tracking_uri="http://m",
        run_id="r1", model_name="x", version="3",
    )  # fmt: skip
    assert "**promoted**: first champion" in decided


def test_experiment_deployment_defaults_use_the_sandbox_with_promotion_off():
    from flows.deploy import SANDBOX_EXPERIMENT, SANDBOX_MODEL, experiment_parameters
    from flows.params import PipelineParams

    params = experiment_parameters({"training": {"loops": 2}, "registry": {"promotion_margin": 0.1}})
    assert params["training"] == {"loops": 2}
    assert params["registry"] == {
        "promotion_margin": 0.1, "model_name": SANDBOX_MODEL, "experiment": SANDBOX_EXPERIMENT, "promote": False
    }
    default = PipelineParams.model_validate(experiment_parameters())
    assert default.registry.model_name == SANDBOX_MODEL and default.registry.promote is False
