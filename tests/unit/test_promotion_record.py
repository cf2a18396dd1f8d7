"""The promotion report says which models were re-evaluated, and the rule's edge cases."""

from __future__ import annotations

import pytest

from tasks.registry import decide, promotion_markdown

EVAL = {"top1": 0.8, "loss": 0.5, "n": 200}


def _decision(**changes):
    base = {
        "promoted": True, "outcome": "promoted", "reason": "challenger beats champion", "margin": 0.0,
        "challenger": {"version": "3"}, "challenger_eval": EVAL, "champion_before": {"version": "2"},
        "champion_eval": {**EVAL, "top1": 0.7}, "champion_after": "3",
    }  # fmt: skip
    return {**base, **changes}


def test_both_models_evaluated_says_so():
    text = promotion_markdown("m", _decision())
    assert "both models re-evaluated on the same 200 held-out images" in text
    assert "| champion (before) | 2 | 0.7000 |" in text


def test_only_the_challenger_evaluated_is_not_called_both():
    text = promotion_markdown("m", _decision(champion_eval=None, promoted=False, outcome="kept-champion",
                                             champion_after="2"))  # fmt: skip
    assert "both models" not in text and "only the challenger re-evaluated, on 200 held-out images" in text
    assert "| champion (before) | 2 | not evaluated | not evaluated |" in text


def test_refused_format_evaluates_nothing():
    text = promotion_markdown("m", _decision(challenger_eval=None, champion_eval=None, promoted=False,
                                             outcome="refused-format", champion_after="2"))  # fmt: skip
    assert "**not promoted** (refused-format)" in text and "no model evaluated" in text


@pytest.mark.parametrize(
    ("challenger", "champion", "margin", "promoted"),
    [(0.5, None, 0.0, True), (0.8, 0.7, 0.05, True), (0.75, 0.7, 0.05, False), (0.7, 0.8, 0.0, False)],
)
def test_decide(challenger, champion, margin, promoted):
    assert decide(challenger, champion, margin)[0] is promoted
