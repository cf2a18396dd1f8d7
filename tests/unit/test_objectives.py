"""Objectives as per-sample losses: cross-entropy, one-vs-all (Table 3), class-weighted CE."""

import math

import numpy as np
import pytest
import torch

import vecaf
from vecaf import objectives

LOGITS = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-3.0, 4.0, 0.0], [1.0, 1.0, 1.0], [0.0, -2.0, 5.0]])
LABELS = np.array([0, 2, 1, 1, 0])


def _log_softmax_row(row):
    z = sum(math.exp(v) for v in row)
    return [v - math.log(z) for v in row]


def test_cross_entropy_matches_hand_computation():
    expected = [-_log_softmax_row(row)[y] for row, y in zip(LOGITS.tolist(), LABELS.tolist())]
    got = objectives.cross_entropy(LOGITS, LABELS)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got.dtype == np.float64 and (got >= 0).all()
    assert got[3] == pytest.approx(math.log(3))


@pytest.mark.parametrize("target", [0, 1, 2])
def test_one_vs_all_is_binary_ce_on_the_target_probability(target):
    expected = []
    for row, y in zip(LOGITS.tolist(), LABELS.tolist()):
        p = math.exp(_log_softmax_row(row)[target])
        expected.append(-math.log(p) if y == target else -math.log(1 - p))
    np.testing.assert_allclose(objectives.one_vs_all(LOGITS, LABELS, target=target), expected, rtol=1e-10)


def test_one_vs_all_with_a_binary_head():
    scores = np.array([2.0, -1.0, 0.5])
    labels = np.array([3, 3, 1])
    expected = [math.log1p(math.exp(-2.0)), math.log1p(math.exp(1.0)), math.log1p(math.exp(0.5))]
    np.testing.assert_allclose(objectives.one_vs_all(scores, labels, target=3), expected, rtol=1e-12)
    np.testing.assert_allclose(objectives.one_vs_all(scores[:, None], labels, target=3), expected, rtol=1e-12)


def test_weighted_cross_entropy_balanced_and_given():
    ce = objectives.cross_entropy(LOGITS, LABELS)
    counts = {0: 2, 1: 2, 2: 1}
    balanced = [5 / (3 * counts[y]) for y in LABELS.tolist()]
    np.testing.assert_allclose(objectives.weighted_cross_entropy(LOGITS, LABELS), np.array(balanced) * ce, rtol=1e-12)
    weights = np.array([0.5, 2.0, 0.0])
    np.testing.assert_allclose(
        objectives.weighted_cross_entropy(LOGITS, LABELS, class_weights=weights), weights[LABELS] * ce, rtol=1e-12
    )
    np.testing.assert_allclose(objectives.class_weights_balanced([0, 0, 2], 4), [3 / 8, 0.0, 3 / 4, 0.0])


def test_per_sample_losses_dispatches_by_name():
    np.testing.assert_array_equal(
        objectives.per_sample_losses(LOGITS, LABELS), objectives.cross_entropy(LOGITS, LABELS)
    )
    np.testing.assert_array_equal(
        objectives.per_sample_losses(LOGITS, LABELS, objective="one_vs_all", target=2),
        objectives.one_vs_all(LOGITS, LABELS, target=2),
    )
    np.testing.assert_array_equal(
        objectives.per_sample_losses(LOGITS, LABELS, objective="weighted_cross_entropy"),
        objectives.weighted_cross_entropy(LOGITS, LABELS),
    )


def test_torch_input_gives_differentiable_torch_output():
    logits = torch.tensor(LOGITS, requires_grad=True)
    loss = objectives.one_vs_all(logits, torch.tensor(LABELS), target=1)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    loss.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(
        objectives.cross_entropy(logits, torch.tensor(LABELS)).detach().numpy(),
        objectives.cross_entropy(LOGITS, LABELS),
    )


def test_losses_feed_the_selection():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((60, 4)) * 3
    labels = rng.integers(0, 4, 60)
    for objective in objectives.OBJECTIVES:
        losses = objectives.per_sample_losses(logits, labels, objective=objective, target=1)
        assert losses.shape == (60,) and np.isfinite(losses).all() and (losses >= 0).all()
        idx = vecaf.select(rng.standard_normal((60, 5)), 4, method="topk_loss", losses=losses)
        np.testing.assert_array_equal(np.sort(idx), np.sort(np.argsort(-losses)[:4]))


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: objectives.cross_entropy(LOGITS, np.array([0, 3, 1, 1, 0])), r"labels must lie in \[0, 3\)"),
        (lambda: objectives.cross_entropy(LOGITS, LABELS[:4]), "labels has 4 entries but logits have 5 rows"),
        (lambda: objectives.cross_entropy(LOGITS[:, 0], LABELS), r"logits must be a non-empty \(N, C\)"),
        (lambda: objectives.cross_entropy(LOGITS[:, :1], LABELS * 0), "at least 2 classes"),
        (lambda: objectives.cross_entropy(np.zeros((0, 3)), np.zeros(0, dtype=int)), "non-empty"),
        (lambda: objectives.cross_entropy(np.where(LOGITS > 3, np.nan, LOGITS), LABELS), "NaN or inf"),
        (lambda: objectives.cross_entropy(LOGITS, LABELS.astype(float)), "integer class indices"),
        (lambda: objectives.cross_entropy(LOGITS, LABELS[:, None]), "labels must be a 1-D"),
        (lambda: objectives.one_vs_all(LOGITS, LABELS, target=3), r"target must lie in \[0, 3\)"),
        (lambda: objectives.one_vs_all(LOGITS, LABELS, target=1.0), "target must be an integer"),
        (lambda: objectives.weighted_cross_entropy(LOGITS, LABELS, class_weights=[1, 2]), r"shape \(3,\)"),
        (lambda: objectives.weighted_cross_entropy(LOGITS, LABELS, class_weights=[1, -2, 1]), "non-negative"),
        (lambda: objectives.weighted_cross_entropy(LOGITS, LABELS, class_weights="inverse"), "'balanced' or a"),
        (lambda: objectives.per_sample_losses(LOGITS, LABELS, objective="focal"), "unknown objective 'focal'"),
        (lambda: objectives.per_sample_losses(LOGITS, LABELS, objective="one_vs_all"), "needs target"),
        (lambda: objectives.expected_losses(LOGITS[:, 0]), r"logits must be a non-empty \(N, C\)"),
        (lambda: objectives.expected_losses(np.zeros((0, 3))), "non-empty"),
        (lambda: objectives.expected_losses(np.where(LOGITS > 3, np.inf, LOGITS)), "NaN or inf"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def _probs(row):
    return [math.exp(v) for v in _log_softmax_row(row)]


def test_expected_cross_entropy_is_the_predictive_entropy():
    """L_bar_i = sum_c p_ic (-log p_ic), worked with a plain loop; log 2 and log 3 at uniform predictions."""
    expected = [-sum(p * math.log(p) for p in _probs(row)) for row in LOGITS.tolist()]
    got = objectives.expected_losses(LOGITS)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got.dtype == np.float64
    assert got[3] == pytest.approx(math.log(3))
    assert objectives.expected_losses(np.array([[0.7, 0.7]]))[0] == pytest.approx(math.log(2))
    # label-free and bounded by log C, where the observed loss at a wrong label grows with the logits' scale
    sharp = np.array([[40.0, 0.0, 0.0]])
    assert objectives.expected_losses(sharp)[0] < 1e-15
    assert objectives.cross_entropy(sharp, np.array([1]))[0] == pytest.approx(40.0)
    assert (got <= math.log(3) + 1e-12).all() and (got >= 0).all()


def test_expected_loss_of_a_callable_objective_is_the_sum_over_classes():
    # cross-entropy as a callable gives the closed form
    np.testing.assert_allclose(objectives.expected_losses(LOGITS, objectives.cross_entropy),
                               objectives.expected_losses(LOGITS), rtol=1e-12)
    # class-weighted: sum_c p_c w_c (-log p_c)
    w = [0.5, 2.0, 1.0]
    weighted = lambda z, y: objectives.weighted_cross_entropy(z, y, class_weights=w)  # noqa: E731
    expected = [-sum(wc * p * math.log(p) for wc, p in zip(w, _probs(row))) for row in LOGITS.tolist()]
    np.testing.assert_allclose(objectives.expected_losses(LOGITS, weighted), expected, rtol=1e-12)
    # one-vs-all for target t: the binary entropy of q = p_t (positive with probability q)
    for t in range(3):
        ova = lambda z, y: objectives.one_vs_all(z, y, target=t)  # noqa: E731
        qs = [_probs(row)[t] for row in LOGITS.tolist()]
        expected = [-(q * math.log(q) + (1 - q) * math.log(1 - q)) for q in qs]
        np.testing.assert_allclose(objectives.expected_losses(LOGITS, ova), expected, rtol=1e-9)


def test_expected_losses_keep_torch_in_torch_out():
    z = torch.tensor(LOGITS, dtype=torch.float32)
    got = objectives.expected_losses(z)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), objectives.expected_losses(LOGITS), rtol=1e-5)
