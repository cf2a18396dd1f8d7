"""The finetuning engine (vecaf.train): loops, SGD + cosine schedule, CEA forward (Eq. 10), metrics, B2A,
both modes, the baselines and every bad-input case of the issue.

Data: scikit-learn's bundled digits (8x8 grey, 10 classes). Head mode trains on the 64 pixel values as
"features"; full mode trains a tiny timm-style convolutional network on the images.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vecaf import objectives
import vecaf.train.engine as engine
import vecaf.train.plan as plan
from vecaf.train import (
    EvalPoint,
    TrainingDivergedError,
    batches_to_accuracy,
    epoch_batches,
    finetune,
    loop_batches,
    per_class_accuracy,
    top1_accuracy,
)
from vecaf.train.head import Network


class TinyNet(nn.Module):
    """A timm-style classifier small enough for unit tests (conv -> [BN] -> ReLU -> mean pool -> [dropout] -> linear)."""

    def __init__(self, num_classes: int = 10, width: int = 8, drop_rate: float = 0.0, bn: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.norm = nn.BatchNorm2d(width) if bn else nn.Identity()
        self.num_features = width
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.classifier = nn.Linear(width, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def digits(n_train: int = 300, n_test: int = 120):
    """Digits split: (features (N, 64), labels), (images (N, 3, 8, 8), labels) for train and test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    tr, te = order[:n_train], order[n_train : n_train + n_test]
    feats = (d.data / 16.0).astype(np.float32)
    images = np.repeat((d.images / 8.0 - 1.0).astype(np.float32)[:, None], 3, axis=1)
    labels = d.target.astype(np.int64)
    return {
        "train_feats": (feats[tr], labels[tr]),
        "test_feats": (feats[te], labels[te]),
        "train_images": (torch.from_numpy(images[tr]), labels[tr]),
        "test_images": (torch.from_numpy(images[te]), labels[te]),
    }


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def data():
    return digits()


def _head(num_features: int = 64, num_classes: int = 10, seed: int = 0) -> TinyLinearModel:
    return TinyLinearModel(num_features, num_classes, seed)


class TinyLinearModel(nn.Module):
    """A timm-style 'model' whose backbone is the identity on feature vectors: its head fits the data."""

    def __init__(self, num_features: int, num_classes: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.num_features, self.num_classes = num_features, num_classes
        self.classifier = nn.Linear(num_features, num_classes)
        with torch.no_grad():
            self.classifier.weight.copy_(0.1 * torch.randn(num_classes, num_features, generator=gen))
            self.classifier.bias.copy_(0.1 * torch.randn(num_classes, generator=gen))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.classifier(x)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes)


# ----- the pieces, against hand computations ---------------------------------------------------------------


def test_loop_batches_split_by_hand():
    assert loop_batches(9, 3) == [3, 3, 3]
    assert loop_batches(10, 3) == [4, 3, 3]
    assert loop_batches(11, 3) == [4, 4, 3]
    assert loop_batches(3, 3) == [1, 1, 1]


def test_batch_budget_smaller_than_loops_is_refused(data):
    with pytest.raises(ValueError, match="smaller than the number of loops"):
        loop_batches(2, 3)
    with pytest.raises(ValueError, match="smaller than the number of loops"):
        finetune(None, data["train_feats"], data["test_feats"], method="random", batch_budget=2, loops=3)


def test_epoch_batches_walk_reshuffled_epochs():
    subset = np.array([3, 8, 11, 20, 42])
    batches = epoch_batches(subset, 4, 3, np.random.default_rng(0))
    assert batches.shape == (4, 3)
    stream = batches.reshape(-1)
    # 12 draws = epoch 1 (5) + epoch 2 (5) + 2 of epoch 3: every full epoch is a permutation of the subset
    assert sorted(stream[:5]) == sorted(subset)
    assert sorted(stream[5:10]) == sorted(subset)
    assert set(stream[10:]) <= set(subset)
    # batch larger than the subset: cycles, each epoch still a permutation
    big = epoch_batches(subset, 2, 8, np.random.default_rng(1)).reshape(-1)
    assert sorted(big[:5]) == sorted(subset) and sorted(big[5:10]) == sorted(subset)


def test_top1_and_per_class_accuracy_by_hand():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
    labels = np.array([0, 1, 1, 0, 1])
    # predictions 0, 1, 2, 0, 1 -> right, right, wrong, right, right
    assert top1_accuracy(logits, labels) == pytest.approx(4 / 5)
    acc = per_class_accuracy(logits, labels, num_classes=4)
    assert acc[0] == pytest.approx(1.0)
    assert acc[1] == pytest.approx(2 / 3)
    assert math.isnan(acc[2]) and math.isnan(acc[3])


def test_b2a_is_the_first_batch_count_reaching_the_target():
    curve = [(0, 0.1, 2.0), (10, 0.55, 1.0), (20, 0.5, 1.1), (30, 0.81, 0.5), (40, 0.9, 0.3)]
    assert batches_to_accuracy(curve, 0.5) == 10
    assert batches_to_accuracy(curve, 0.8) == 30
    assert batches_to_accuracy(curve, 0.9) == 40
    assert batches_to_accuracy(curve, 0.95) is None
    points = [EvalPoint(b, a, l) for b, a, l in curve]
    assert batches_to_accuracy(points, 0.8) == 30
    with pytest.raises(ValueError, match="fraction"):
        batches_to_accuracy(curve, 90)


def test_cea_forward_mixing_matches_eq_10_and_holds_alpha_and_t_constant():
    """z = W((1 - lam)(e - s (e - t)) + lam e) + b, and dz/de = (1 - (1 - lam) s) W (s = eta alpha, t constant)."""
    torch.manual_seed(0)
    head = nn.Linear(4, 3)
    lam = 0.9
    net = Network(None, head, mixer=engine._cea_mixer(lam))
    e = torch.randn(5, 4, requires_grad=True)
    t = torch.randn(5, 4, requires_grad=True)
    step = (0.7 * torch.softmax(torch.randn(5), 0)).requires_grad_(True)
    z = net(e, t, step)
    mixed = []
    for i in range(5):
        aug = [e[i, j].item() - step[i].item() * (e[i, j].item() - t[i, j].item()) for j in range(4)]
        mixed.append([(1 - lam) * aug[j] + lam * e[i, j].item() for j in range(4)])
    expected = torch.tensor(mixed) @ head.weight.detach().T + head.bias.detach()
    torch.testing.assert_close(z.detach(), expected, rtol=1e-5, atol=1e-6)
    z[:, 1].sum().backward()
    for i in range(5):
        scale = 1 - (1 - lam) * step[i].item()
        torch.testing.assert_close(e.grad[i], scale * head.weight.detach()[1], rtol=1e-5, atol=1e-6)
    assert t.grad is None or torch.count_nonzero(t.grad) == 0
    assert step.grad is None or torch.count_nonzero(step.grad) == 0


def test_cea_constants_by_hand():
    """alpha = softmax over the K rows of ||e/|e| - p||^2 (Eq. 8), t = |e| p, step = eta K alpha."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(4, 3)) * 5
    text = rng.normal(size=(4, 3))

    def projection(t):
        return t / np.linalg.norm(t, axis=1, keepdims=True)

    t, step = engine.cea_constants(image, text, projection, eta=0.5)
    d2 = []
    for i in range(4):
        norm_e = math.sqrt(sum(v * v for v in image[i]))
        norm_t = math.sqrt(sum(v * v for v in text[i]))
        d2.append(sum((image[i, j] / norm_e - text[i, j] / norm_t) ** 2 for j in range(3)))
        for j in range(3):
            assert t[i, j] == pytest.approx(norm_e * text[i, j] / norm_t, rel=1e-5)
    total = sum(math.exp(v) for v in d2)
    for i in range(4):
        assert step[i] == pytest.approx(0.5 * 4 * math.exp(d2[i]) / total, rel=1e-5)


# ----- the engine ----------------------------------------------------------------------------------------------


def _manual_full_batch_sgd(w, b, x, y, *, steps, lr, wd, momentum):
    """Plain loop: full-batch CE gradient, SGD with momentum and weight decay, lr_s = lr (1 + cos(pi s / S)) / 2."""
    w, b = w.clone(), b.clone()
    buf_w, buf_b = torch.zeros_like(w), torch.zeros_like(b)
    for s in range(steps):
        w.requires_grad_(True)
        b.requires_grad_(True)
        loss = F.cross_entropy(x @ w.T + b, y)
        gw, gb = torch.autograd.grad(loss, (w, b))
        with torch.no_grad():
            gw, gb = gw + wd * w, gb + wd * b
            buf_w = gw.clone() if s == 0 else momentum * buf_w + gw
            buf_b = gb.clone() if s == 0 else momentum * buf_b + gb
            rate = lr * 0.5 * (1 + math.cos(math.pi * s / steps))
            w, b = w - rate * buf_w, b - rate * buf_b
    return w.detach(), b.detach()


def test_full_data_training_equals_hand_written_sgd_with_cosine_decay(data):
    x, y = data["train_feats"]
    x, y = x[:64], y[:64]
    model = _head()
    result = finetune(
        model, (x, y), data["test_feats"], mode="head", method="full", loops=3, batch_budget=7,
        batch_size=64, lr=0.5, weight_decay=1e-3, momentum=0.9,
    )
    w0, b0 = model.classifier.weight.detach(), model.classifier.bias.detach()
    w, b = _manual_full_batch_sgd(
        w0, b0, torch.from_numpy(x), torch.from_numpy(y), steps=7, lr=0.5, wd=1e-3, momentum=0.9
    )
    trained = result.model.get_classifier()
    torch.testing.assert_close(trained.weight.detach(), w, rtol=0, atol=1e-5)
    torch.testing.assert_close(trained.bias.detach(), b, rtol=0, atol=1e-5)
    assert [r.batches for r in result.loops] == [3, 2, 2]
    assert all(r.picks is None for r in result.loops)
    # the caller's model is not changed
    assert torch.equal(model.classifier.weight, w0)


def test_loops_select_fresh_subsets_from_pool_losses_of_the_current_model(data, monkeypatch):
    calls = []
    real = engine._call_select

    def spy(emb, k, **kw):
        picks = real(emb, k, **kw)
        calls.append({"emb": emb.copy(), "k": k, "picks": picks, **kw})
        return picks

    monkeypatch.setattr(engine, "_call_select", spy)
    model = _head()
    x, y = data["train_feats"]
    result = finetune(
        model, data["train_feats"], data["test_feats"], mode="head", method="topk_loss", ratio=0.05,
        loops=3, batch_budget=12, batch_size=8, lr=0.05, seed=3,
    )
    assert len(calls) == 3 and all(c["k"] == 15 for c in calls)
    # loop 1: losses are the CE of the initial head, computed here independently
    w, b = model.classifier.weight.detach().numpy(), model.classifier.bias.detach().numpy()
    for i in (0, 17, 99):
        z = x[i] @ w.T + b
        ce = math.log(sum(math.exp(v - z.max()) for v in z)) + z.max() - z[y[i]]
        assert calls[0]["losses"][i] == pytest.approx(ce, rel=1e-4)
    np.testing.assert_array_equal(calls[0]["emb"], x)
    # topk_loss picks the K largest losses; the record keeps each pick's loss (why it was picked)
    top = np.argsort(-calls[0]["losses"])[:15]
    assert set(result.loops[0].picks) == set(top)
    np.testing.assert_allclose(result.loops[0].pick_losses, calls[0]["losses"][result.loops[0].picks], rtol=1e-6)
    # later loops see the updated head's losses and exclude earlier picks
    assert not np.allclose(calls[1]["losses"], calls[0]["losses"])
    assert calls[0]["exclude"] is None
    np.testing.assert_array_equal(np.sort(calls[1]["exclude"]), np.sort(result.loops[0].picks))
    assert len(set(np.concatenate(result.picks))) == 45
    assert calls[1]["seed"] != calls[0]["seed"]


def test_objectives_reach_selection_and_training(data, monkeypatch):
    """Balanced class weights come from the whole pool (w_c = N / (C n_c)), not from each batch."""
    seen = []
    real = engine._call_select
    monkeypatch.setattr(engine, "_call_select", lambda emb, k, **kw: seen.append(kw["losses"]) or real(emb, k, **kw))
    x, y = data["train_feats"]
    model = _head()
    finetune(model, (x, y), data["test_feats"], mode="head", method="topk_loss", budget=5, loops=1,
             batch_budget=1, batch_size=4, objective="weighted_ce")
    w, b = model.classifier.weight.detach().numpy().astype(np.float64), model.classifier.bias.detach().numpy()
    counts = {c: int(np.sum(y == c)) for c in range(10)}
    for i in (0, 5, 42):
        z = x[i] @ w.T + b
        ce = math.log(sum(math.exp(v - z.max()) for v in z)) + z.max() - z[y[i]]
        weight = len(y) / (10 * counts[int(y[i])])
        assert seen[0][i] == pytest.approx(weight * ce, rel=1e-4)
    with pytest.raises(ValueError, match="target_class"):
        finetune(None, (x, y), data["test_feats"], method="random", budget=5, batch_budget=3, objective="one_vs_all")
    with pytest.raises(ValueError, match="unknown objective"):
        finetune(None, (x, y), data["test_feats"], method="random", budget=5, batch_budget=3, objective="hinge")
    result = finetune(None, (x, y), data["test_feats"], method="random", budget=5, loops=1, batch_budget=2,
                      batch_size=4, objective="one_vs_all", target_class=3)
    assert result.config["objective"] == "one_vs_all" and math.isfinite(result.final.loss)


def test_exclude_previous_false_allows_earlier_picks(data, monkeypatch):
    excludes = []
    real = engine._call_select
    monkeypatch.setattr(engine, "_call_select", lambda emb, k, **kw: excludes.append(kw["exclude"]) or real(emb, k, **kw))
    finetune(
        None, data["train_feats"], data["test_feats"], mode="head", method="random", budget=10,
        loops=3, batch_budget=6, batch_size=4, exclude_previous=False,
    )
    assert excludes == [None, None, None]


def test_use_losses_false_gives_selection_constant_losses(data, monkeypatch):
    seen = []
    real = engine._call_select
    monkeypatch.setattr(engine, "_call_select", lambda emb, k, **kw: seen.append(kw["losses"]) or real(emb, k, **kw))
    finetune(
        None, data["train_feats"], data["test_feats"], mode="head", method="vecaf", budget=5,
        loops=1, batch_budget=2, batch_size=4, use_losses=False,
    )
    np.testing.assert_array_equal(seen[0], np.ones(len(data["train_feats"][1])))


def test_vecaf_selects_with_expected_losses_by_default_and_observed_ones_on_request(data, monkeypatch):
    """selection_loss="expected": the initial head's predictive entropies (worked here with a plain loop);
    "observed": the CE at the labels (Eq. 3); other methods always get the observed losses."""
    seen = []
    real = engine._call_select
    monkeypatch.setattr(engine, "_call_select", lambda emb, k, **kw: seen.append(kw) or real(emb, k, **kw))
    x, y = data["train_feats"]
    model = _head()
    w, b = model.classifier.weight.detach().numpy().astype(np.float64), model.classifier.bias.detach().numpy()
    common = dict(mode="head", budget=5, loops=1, batch_budget=1, batch_size=4)
    default = finetune(model, (x, y), data["test_feats"], method="vecaf", **common)
    finetune(model, (x, y), data["test_feats"], method="vecaf", selection_loss="observed", **common)
    finetune(model, (x, y), data["test_feats"], method="topk_loss", **common)
    assert default.config["selection_loss"] == "expected"
    for i in (0, 17, 99):
        z = x[i] @ w.T + b
        p = [math.exp(v - z.max()) for v in z]
        p = [v / sum(p) for v in p]
        entropy = -sum(v * math.log(v) for v in p)
        ce = -math.log(p[y[i]])
        assert seen[0]["losses"][i] == pytest.approx(entropy, rel=1e-4)
        assert seen[1]["losses"][i] == pytest.approx(ce, rel=1e-4)
        assert seen[2]["losses"][i] == pytest.approx(ce, rel=1e-4)
    # a callable objective: sum_c p_c l(z, c), here the class-weighted CE
    weights = np.linspace(0.5, 2.0, 10)
    objective = lambda z, t: objectives.weighted_cross_entropy(z, t, class_weights=weights)  # noqa: E731
    finetune(model, (x, y), data["test_feats"], method="vecaf", objective=objective, **common)
    z = x[:3].astype(np.float64) @ w.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(seen[3]["losses"][:3], -(weights * p * np.log(p)).sum(1), rtol=1e-4)
    with pytest.raises(ValueError, match="selection_loss must be one of"):
        finetune(model, (x, y), data["test_feats"], method="vecaf", selection_loss="calibrated", **common)


def test_result_metrics_curve_b2a_and_callbacks(data):
    evals, loop_ends = [], []
    result = finetune(
        None, data["train_feats"], data["test_feats"], mode="head", method="random", ratio=0.1,
        loops=3, batch_budget=30, batch_size=16, lr=0.2, eval_every=4, targets=(0.3, 0.99),
        callbacks={"on_eval": evals.append, "on_loop_end": loop_ends.append},
    )
    batches = [p.batches for p in result.curve]
    # batch 0, every 4 batches, and the three loop ends (10, 20, 30)
    assert batches == [0, 4, 8, 10, 12, 16, 20, 24, 28, 30]
    assert [p.batches for p in evals] == batches
    assert [r.loop for r in loop_ends] == [0, 1, 2]
    assert [r.end_batches for r in result.loops] == [10, 20, 30]
    assert result.loops[-1].top1 == result.top1
    # final metrics, recomputed from the returned head
    x, y = data["test_feats"]
    logits = result.model(torch.from_numpy(x)).detach().numpy()
    assert result.top1 == pytest.approx(np.mean(logits.argmax(1) == y))
    for c in range(10):
        members = y == c
        assert result.per_class_accuracy[c] == pytest.approx(np.mean(logits[members].argmax(1) == c))
    assert result.final.loss == pytest.approx(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)).item(), rel=1e-5)
    # B2A from the curve, None when never reached
    first = min(p.batches for p in result.curve if p.top1 >= 0.3)
    assert result.b2a[0.3] == first
    assert result.b2a[0.99] is None
    assert len(result.train_curve) == 30
    as_dict = result.to_dict()
    assert as_dict["final"]["top1"] == result.top1 and len(as_dict["loops"]) == 3


@pytest.mark.parametrize(
    "method", ["random", "topk_loss", "coreset", "activeft", "entropy", "margin", "vecaf", "full"]
)
def test_every_method_runs_in_the_same_engine(data, method):
    from vecaf.selection import list_methods

    assert method == "full" or method in list_methods()
    result = finetune(
        None, data["train_feats"], data["test_feats"], mode="head", method=method, ratio=0.05,
        loops=2, batch_budget=6, batch_size=8, lr=0.1,
    )
    assert result.method == method
    assert result.curve[-1].batches == 6
    if method != "full":
        assert [len(p) for p in result.picks] == [15, 15]


def test_every_registered_method_is_covered_by_the_engine_test():
    from vecaf.selection import list_methods

    tested = {"random", "topk_loss", "coreset", "activeft", "entropy", "margin", "vecaf"}
    assert set(list_methods()) <= tested, f"untested selection methods: {set(list_methods()) - tested}"


def _record_cea_constants(monkeypatch) -> list:
    """Spy on the Eq. 10 mixer: every (t, step) pair the forward pass receives, in call order."""
    seen = []
    real_mixer = engine._cea_mixer

    def recording_mixer(lam_bw):
        real = real_mixer(lam_bw)

        def mixer(e, t, step):
            seen.append((t.clone(), step.clone()))
            return real(e, t, step)

        return mixer

    monkeypatch.setattr(engine, "_cea_mixer", recording_mixer)
    return seen


def test_cea_in_the_engine_uses_projected_text_and_alpha_over_the_selected(data, monkeypatch):
    """t = |e| P(caption) with P the ridge projection of vecaf.cea fitted on the pool; the step is
    eta K softmax over the K picks of ||e/|e| - P(caption)||^2 (Eq. 8-9), both constant in the forward pass."""
    from vecaf import cea

    x, y = data["train_feats"]
    text = np.random.default_rng(0).normal(size=(len(y), 12)).astype(np.float32)
    seen = _record_cea_constants(monkeypatch)
    result = finetune(
        None, (x, y), data["test_feats"], mode="head", method="random", budget=8, loops=1,
        batch_budget=1, batch_size=8, text_embeddings=text, eta=0.5, lam_bw=0.9,
    )
    picks = result.loops[0].picks
    direction = np.asarray(cea.fit_projection(text, x)(text[picks]), dtype=np.float64)
    norms = [math.sqrt(sum(float(v) ** 2 for v in x[p])) for p in picks]
    d2 = [sum((float(x[p, j]) / norms[i] - direction[i, j]) ** 2 for j in range(x.shape[1])) for i, p in enumerate(picks)]
    expo = [math.exp(v) for v in d2]
    step_expected = {int(p): 0.5 * len(picks) * v / sum(expo) for p, v in zip(picks, expo)}
    t_expected = {int(p): norms[i] * direction[i] for i, p in enumerate(picks)}
    t_seen, step_seen = seen[0]
    order = engine.epoch_batches(picks, 1, 8, np.random.default_rng(engine._derive(0, 4, 0)))[0]
    for r, p in enumerate(order):
        np.testing.assert_allclose(t_seen[r].numpy(), t_expected[int(p)], rtol=1e-4, atol=1e-4)
        assert step_seen[r].item() == pytest.approx(step_expected[int(p)], rel=1e-4)


def test_lam_bw_one_turns_cea_off(data):
    x, y = data["train_feats"]
    text = np.random.default_rng(1).normal(size=(len(y), 12)).astype(np.float32)
    common = dict(mode="head", method="random", budget=20, loops=2, batch_budget=6, batch_size=8, lr=0.1, eta=5.0)
    off = finetune(None, (x, y), data["test_feats"], lam_bw=1.0, text_embeddings=text, **common)
    plain = finetune(None, (x, y), data["test_feats"], **common)
    on = finetune(None, (x, y), data["test_feats"], lam_bw=0.5, text_embeddings=text, **common)
    torch.testing.assert_close(off.model.weight, plain.model.weight, rtol=0, atol=0)
    assert not torch.allclose(on.model.weight, plain.model.weight)


def test_text_embeddings_must_have_one_row_per_pool_sample(data):
    with pytest.raises(ValueError, match="one row per pool sample"):
        finetune(None, data["train_feats"], data["test_feats"], method="vecaf", batch_budget=3,
                 text_embeddings=np.zeros((5, 4), dtype=np.float32))


def test_selection_budget_larger_than_the_pool_is_refused(data):
    n = len(data["train_feats"][1])
    with pytest.raises(ValueError, match="larger than the pool"):
        finetune(None, data["train_feats"], data["test_feats"], method="random", budget=n + 1, batch_budget=3)
    with pytest.raises(ValueError, match="fresh samples"):
        finetune(None, data["train_feats"], data["test_feats"], method="random", budget=n // 2, loops=3, batch_budget=3)


def test_unknown_method_and_mode_are_refused(data):
    with pytest.raises(ValueError, match="unknown method"):
        finetune(None, data["train_feats"], data["test_feats"], method="nope", batch_budget=3)
    with pytest.raises(ValueError, match="mode must be"):
        finetune(None, data["train_feats"], data["test_feats"], mode="partial", batch_budget=3)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(data, tmp_path):
    calls = {"n": 0}

    def poisoned_ce(logits, labels):
        loss = F.cross_entropy(logits, labels, reduction="none")
        if logits.requires_grad:
            calls["n"] += 1
            if calls["n"] == 6:
                return loss * float("nan")
        return loss

    with pytest.raises(TrainingDivergedError, match="NaN|nan") as info:
        finetune(
            None, data["train_feats"], data["test_feats"], mode="head", method="random", budget=10, loops=3,
            batch_budget=12, batch_size=4, objective=poisoned_ce, checkpoint_dir=tmp_path, lr=0.1,
        )
    err = info.value
    assert err.loop == 1 and err.batches == 6
    assert err.checkpoint == tmp_path / "loop-1.pt"
    assert "loop-1.pt" in str(err)
    assert sorted(p.name for p in tmp_path.glob("loop-*.pt")) == ["loop-1.pt"]
    state = torch.load(err.checkpoint, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert [r.loop for r in err.result.loops] == [0]


# ----- full mode -----------------------------------------------------------------------------------------------


def test_full_mode_trains_the_whole_network(data):
    torch.manual_seed(0)
    model = TinyNet(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = finetune(
        model, data["train_images"], data["test_images"], mode="full", method="random", ratio=0.1,
        loops=3, batch_budget=9, batch_size=16, lr=0.05, targets=(0.2,),
    )
    after = result.model.state_dict()
    assert not torch.equal(after["conv.weight"], before["conv.weight"])
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    x, y = data["test_images"]
    with torch.no_grad():
        logits = result.model.eval()(x).numpy()
    assert result.top1 == pytest.approx(np.mean(logits.argmax(1) == y))


def test_full_mode_trains_in_one_memory_layout_whatever_the_callers_model_has(data):
    # vecaf.models.embed leaves a model channels_last; a seed's run must not depend on whether it ran first
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        model = TinyNet(num_classes=10, width=16).to(memory_format=layout)
        results.append(finetune(
            model, data["train_images"], data["test_images"], mode="full", method="margin", ratio=0.1,
            loops=2, batch_budget=8, batch_size=16, lr=0.05, seed=3,
        ))
        weight = results[-1].model.conv.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
        assert model.conv.weight.is_contiguous(memory_format=layout)  # the caller's model is left as it was
    assert results[0].train_curve == results[1].train_curve and results[0].top1 == results[1].top1
    assert [list(r.picks) for r in results[0].loops] == [list(r.picks) for r in results[1].loops]
    for a, b in zip(results[0].model.state_dict().values(), results[1].model.state_dict().values()):
        assert torch.equal(a, b)
    # head mode's feature pass through the caller's model runs in the same layout
    heads = []
    for layout in (torch.contiguous_format, torch.channels_last):
        model = TinyNet(num_classes=10, width=16)
        model.load_state_dict(results[0].model.state_dict())
        heads.append(finetune(
            model.to(memory_format=layout), data["train_images"], data["test_images"], mode="head",
            method="margin", ratio=0.1, loops=2, batch_budget=8, batch_size=16, lr=0.05, seed=3,
        ))
    assert heads[0].train_curve == heads[1].train_curve and heads[0].top1 == heads[1].top1


def test_full_mode_loop_one_features_replace_the_first_pool_pass(data, monkeypatch):
    torch.manual_seed(0)
    model = TinyNet(num_classes=10)
    x, y = data["train_images"]
    with torch.no_grad():
        feats = model.eval().forward_head(model.forward_features(x), pre_logits=True).numpy()
    seen = []
    real = engine._call_select
    monkeypatch.setattr(engine, "_call_select", lambda emb, k, **kw: seen.append(kw["losses"]) or real(emb, k, **kw))
    common = dict(mode="full", method="topk_loss", budget=20, loops=2, batch_budget=4, batch_size=8, lr=0.05)
    a = finetune(model, (x, y), data["test_images"], **common)
    b = finetune(model, (x, y), data["test_images"], train_features=feats, **common)
    np.testing.assert_allclose(seen[0], seen[2], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.loops[0].picks, b.loops[0].picks)


@pytest.mark.parametrize("head_classes", [5, 0])
def test_a_model_without_a_head_for_the_classes_gets_a_new_one_and_says_so(data, head_classes):
    model = TinyNet(num_classes=head_classes)
    with pytest.warns(UserWarning, match="head was replaced"):
        result = finetune(
            model, data["train_images"], data["test_images"], mode="full", method="random", budget=10,
            loops=1, batch_budget=2, batch_size=8,
        )
    assert any("10-way" in n for n in result.notes)
    assert result.model.get_classifier().out_features == 10
    with pytest.warns(UserWarning, match="new 10-way linear head"):
        result = finetune(
            model, data["train_images"], data["test_images"], mode="head", method="random", budget=10,
            loops=1, batch_budget=2, batch_size=8,
        )
    assert result.model.get_classifier().out_features == 10


def test_a_model_whose_head_fits_is_kept_without_a_warning(data):
    model = TinyNet(num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = finetune(
            model, data["train_images"], data["test_images"], mode="head", method="full", loops=1,
            batch_budget=1, batch_size=8, lr=0.0, weight_decay=0.0,
        )
    assert result.notes == []
    torch.testing.assert_close(result.model.get_classifier().weight, model.classifier.weight, rtol=0, atol=0)


# ----- cumulative training (the growing labelled set) ----------------------------------------------------------


def _record_training_batches(monkeypatch):
    """Spy on the batches the training loop draws: one (subset, batches) entry per loop."""
    drawn = []
    real = plan.epoch_batches

    def spy(subset, n_batches, batch_size, rng):
        batches = real(subset, n_batches, batch_size, rng)
        drawn.append((np.array(subset, copy=True), batches.copy()))
        return batches

    monkeypatch.setattr(plan, "epoch_batches", spy)
    return drawn


@pytest.mark.parametrize("exclude_previous", [True, False])
def test_cumulative_trains_each_loop_on_all_picks_so_far(data, monkeypatch, exclude_previous):
    drawn = _record_training_batches(monkeypatch)
    # 3 batches of 8 per loop = 24 draws >= the 15 samples of the largest union: every sample is drawn
    common = dict(mode="head", method="random", budget=5, loops=3, batch_budget=9, batch_size=8, lr=0.1, seed=4,
                  exclude_previous=exclude_previous)
    result = finetune(None, data["train_feats"], data["test_feats"], cumulative=True, **common)
    assert len(drawn) == 3
    for loop, (_, batches) in enumerate(drawn):
        union = set(np.concatenate([result.loops[i].picks for i in range(loop + 1)]).tolist())
        assert set(batches.reshape(-1).tolist()) == union
    if exclude_previous:
        assert [len(set(b.reshape(-1).tolist())) for _, b in drawn] == [5, 10, 15]
    # the batch budget is unchanged, and the records still hold each loop's own K picks
    assert [r.batches for r in result.loops] == [3, 3, 3] and len(result.train_curve) == 9
    assert [len(p) for p in result.picks] == [5, 5, 5]
    assert result.config["cumulative"] is True

    drawn.clear()
    paper = finetune(None, data["train_feats"], data["test_feats"], cumulative=False, **common)
    assert len(drawn) == 3
    for loop, (_, batches) in enumerate(drawn):
        assert set(batches.reshape(-1).tolist()) == set(paper.loops[loop].picks.tolist())
    assert paper.config["cumulative"] is False
    # loop 1 trains on the same 5 picks either way: identical up to the end of loop 1
    np.testing.assert_array_equal(paper.loops[0].picks, result.loops[0].picks)
    assert paper.train_curve[:3] == result.train_curve[:3]


def test_cumulative_default_is_the_papers_protocol(data):
    common = dict(mode="head", method="random", budget=5, loops=2, batch_budget=4, batch_size=8, lr=0.1)
    default = finetune(None, data["train_feats"], data["test_feats"], **common)
    explicit = finetune(None, data["train_feats"], data["test_feats"], cumulative=False, **common)
    torch.testing.assert_close(default.model.weight, explicit.model.weight, rtol=0, atol=0)
    assert default.config["cumulative"] is False


def test_cumulative_is_ignored_by_full_data_finetuning(data):
    common = dict(mode="head", method="full", loops=2, batch_budget=4, batch_size=8, lr=0.1)
    plain = finetune(None, data["train_feats"], data["test_feats"], **common)
    asked = finetune(None, data["train_feats"], data["test_feats"], cumulative=True, **common)
    torch.testing.assert_close(plain.model.weight, asked.model.weight, rtol=0, atol=0)
    assert asked.config["cumulative"] is False
    assert any("ignores cumulative" in n for n in asked.notes)


def test_cumulative_must_be_a_bool(data):
    with pytest.raises(ValueError, match="cumulative must be True or False"):
        finetune(None, data["train_feats"], data["test_feats"], method="random", budget=5, batch_budget=3,
                 cumulative="yes")


def test_replay_mixes_earlier_picks_into_each_batch(data, monkeypatch):
    drawn = _record_training_batches(monkeypatch)
    common = dict(mode="head", method="random", budget=5, loops=3, batch_budget=9, batch_size=8, lr=0.1, seed=4)
    result = finetune(None, data["train_feats"], data["test_feats"], replay=0.5, **common)
    # loop 1 has nothing to replay: one draw of full batches from its picks; later loops: 4 new + 4 replayed
    assert [b.shape for _, b in drawn] == [(3, 8), (3, 4), (3, 4), (3, 4), (3, 4)]
    picks = result.picks
    assert set(drawn[0][1].reshape(-1).tolist()) <= set(picks[0].tolist())
    for loop, (new, old) in ((1, (1, 2)), (2, (3, 4))):
        assert set(drawn[new][1].reshape(-1).tolist()) <= set(picks[loop].tolist())
        earlier = set(np.concatenate(picks[:loop]).tolist())
        assert set(drawn[old][1].reshape(-1).tolist()) <= earlier
    assert result.config["replay"] == 0.5 and [r.batches for r in result.loops] == [3, 3, 3]


def test_replay_checks(data):
    common = dict(method="random", budget=5, batch_budget=3)
    with pytest.raises(ValueError, match=r"replay must lie in \[0, 1\)"):
        finetune(None, data["train_feats"], data["test_feats"], replay=1.0, **common)
    with pytest.raises(ValueError, match="replay is for the per-loop protocol"):
        finetune(None, data["train_feats"], data["test_feats"], replay=0.5, cumulative=True, **common)


class _StopAfterFirstLoop(Exception):
    pass


def _stop_after_first_loop(record):
    if record.loop == 0:
        raise _StopAfterFirstLoop


CUMULATIVE_RUN = dict(mode="head", method="random", budget=5, loops=3, batch_budget=6, batch_size=8, lr=0.1, seed=6)


def test_resume_refuses_a_checkpoint_with_a_different_cumulative(data, tmp_path):
    for made, now in ((False, True), (True, False)):
        directory = tmp_path / f"made-{made}"
        with pytest.raises(_StopAfterFirstLoop):
            finetune(None, data["train_feats"], data["test_feats"], checkpoint_dir=directory, cumulative=made,
                     callbacks={"on_loop_end": _stop_after_first_loop}, **CUMULATIVE_RUN)
        with pytest.raises(ValueError, match=f"different settings.*cumulative: checkpoint {made} vs now {now}"):
            finetune(None, data["train_feats"], data["test_feats"], checkpoint_dir=directory, resume=True,
                     cumulative=now, **CUMULATIVE_RUN)


def test_cumulative_resume_rebuilds_the_union_from_the_checkpoint(data, tmp_path):
    full = finetune(None, data["train_feats"], data["test_feats"], cumulative=True, **CUMULATIVE_RUN)
    with pytest.raises(_StopAfterFirstLoop):
        finetune(None, data["train_feats"], data["test_feats"], checkpoint_dir=tmp_path, cumulative=True,
                 callbacks={"on_loop_end": _stop_after_first_loop}, **CUMULATIVE_RUN)
    resumed = finetune(None, data["train_feats"], data["test_feats"], checkpoint_dir=tmp_path, resume=True,
                       cumulative=True, **CUMULATIVE_RUN)
    torch.testing.assert_close(resumed.model.weight, full.model.weight, rtol=0, atol=0)
    assert resumed.train_curve == full.train_curve
    for a, b in zip(resumed.picks, full.picks, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_checkpoint_from_before_cumulative_resumes_as_non_cumulative(data, tmp_path):
    from vecaf.train.checkpoint import load_checkpoint, save_checkpoint

    with pytest.raises(_StopAfterFirstLoop):
        finetune(None, data["train_feats"], data["test_feats"], checkpoint_dir=tmp_path,
                 callbacks={"on_loop_end": _stop_after_first_loop}, **CUMULATIVE_RUN)
    path = tmp_path / "loop-1.pt"
    state = load_checkpoint(path)
    del state["fingerprint"]["cumulative"]
    save_checkpoint(path, state)
    resumed = finetune(None, data["train_feats"], data["test_feats"], checkpoint_dir=tmp_path, resume=True,
                       **CUMULATIVE_RUN)
    assert [r.loop for r in resumed.loops] == [0, 1, 2]
    with pytest.raises(ValueError, match="cumulative: checkpoint False vs now True"):
        finetune(None, data["train_feats"], data["test_feats"], resume=path, cumulative=True, **CUMULATIVE_RUN)


def test_cumulative_with_cea_in_the_forward_pass_covers_the_whole_union(data, monkeypatch):
    """Head mode, vecaf with text: in loop l the CEA constants are Eq. 8-9 over the union U of the picks of
    loops 1..l (alpha = softmax over U, step = eta |U| alpha), one per trained row, none missing."""
    from vecaf import cea

    x, y = data["train_feats"]
    text = np.random.default_rng(3).normal(size=(len(y), 12)).astype(np.float32)
    drawn = _record_training_batches(monkeypatch)
    seen = _record_cea_constants(monkeypatch)
    result = finetune(
        None, (x, y), data["test_feats"], mode="head", method="vecaf", budget=4, loops=3, batch_budget=6,
        batch_size=8, lr=0.1, text_embeddings=text, eta=0.5, lam_bw=0.9, cumulative=True,
        selection_options={"max_iters": 20},
    )
    assert result.config["cumulative"] is True and result.config["cea"] is True
    assert math.isfinite(result.top1) and len(seen) == 6  # one mixed forward per training batch
    projection = cea.fit_projection(text, x)
    for loop in range(3):
        union = np.unique(np.concatenate([result.loops[i].picks for i in range(loop + 1)]))
        assert len(union) == 4 * (loop + 1)
        direction = np.asarray(projection(text[union]), dtype=np.float64)
        norms = [math.sqrt(sum(float(v) ** 2 for v in x[p])) for p in union]
        d2 = [sum((float(x[p, j]) / norms[i] - direction[i, j]) ** 2 for j in range(x.shape[1]))
              for i, p in enumerate(union)]
        expo = [math.exp(v) for v in d2]
        step_expected = {int(p): 0.5 * len(union) * v / sum(expo) for p, v in zip(union, expo)}
        t_expected = {int(p): norms[i] * direction[i] for i, p in enumerate(union)}
        _, batches = drawn[loop]
        for b, batch in enumerate(batches):
            t_seen, step_seen = seen[2 * loop + b]
            for r, p in enumerate(batch):
                np.testing.assert_allclose(t_seen[r].numpy(), t_expected[int(p)], rtol=1e-4, atol=1e-4)
                assert step_seen[r].item() == pytest.approx(step_expected[int(p)], rel=1e-4)
