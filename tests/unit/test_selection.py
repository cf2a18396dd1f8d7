"""vecaf.select: the contract of every strategy, bad input, baselines against plain loops, matching,
ensemble alignment and debiasing against the formula, loss awareness and diversity of ``vecaf``."""

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

import vecaf
from vecaf.selection import ensemble, matching, registry
from vecaf.selection.methods import initial_indices

METHODS = ["activeft", "coreset", "entropy", "margin", "random", "topk_loss", "vecaf"]
FAST = {"max_iters": 60}


def _clusters(n=600, d=12, c=6, seed=0, spread=3.0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((c, d)) * spread
    labels = rng.integers(0, c, n)
    return centres[labels] + rng.standard_normal((n, d)), labels


def _probs(n, c=4, seed=0):
    return np.random.default_rng(seed).dirichlet(np.ones(c), size=n)


def _options(method, fast=True, n=None):
    if method in ("entropy", "margin"):
        return {"probs": _probs(n)}
    if method in ("vecaf", "activeft"):
        return {**FAST, "device": "cpu"} if fast else {"device": "cpu"}
    return {"device": "cpu"} if method == "coreset" else {}


def _coverage(x, idx):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    return float((1.0 - (xn @ xn[idx].T).max(axis=1)).mean())


# --- registry and contract ---------------------------------------------------------------------------


def test_list_methods_sorted_and_complete():
    assert vecaf.list_methods() == METHODS


def test_unknown_method_lists_registered():
    x, _ = _clusters(50)
    with pytest.raises(ValueError, match="unknown selection method 'nope'.*activeft.*vecaf"):
        vecaf.select(x, 3, method="nope")


def test_register_method_adds_a_strategy():
    @registry.register_method("first_k_test")
    @dataclasses.dataclass
    class FirstK(registry.SelectionMethod):
        offset: int = 0

        def select(self, embeddings, budget, *, losses, text_embeddings, exclude, seed):
            keep = np.setdiff1d(np.arange(embeddings.shape[0]), exclude)
            return keep[self.offset : self.offset + budget]

    try:
        assert "first_k_test" in vecaf.list_methods()
        x, _ = _clusters(20)
        np.testing.assert_array_equal(vecaf.select(x, 3, method="first_k_test", exclude=[0], offset=1), [2, 3, 4])
        with pytest.raises(ValueError, match="unknown option.*'bogus'.*known options: offset"):
            vecaf.select(x, 3, method="first_k_test", bogus=1)
        with pytest.raises(ValueError, match="already registered"):
            registry.register_method("first_k_test")(type("Other", (registry.SelectionMethod,), {}))
    finally:
        registry._REGISTRY.pop("first_k_test", None)


def test_broken_strategy_is_caught():
    @registry.register_method("broken_test")
    @dataclasses.dataclass
    class Broken(registry.SelectionMethod):
        def select(self, embeddings, budget, *, losses, text_embeddings, exclude, seed):
            return np.zeros(budget, dtype=np.int64)

    try:
        with pytest.raises(RuntimeError, match="duplicate"):
            vecaf.select(np.ones((10, 2)), 3, method="broken_test")
    finally:
        registry._REGISTRY.pop("broken_test", None)


@pytest.mark.parametrize("method", METHODS)
def test_contract_exclude_unique_deterministic(method):
    x, _ = _clusters(300)
    losses = np.random.default_rng(1).random(300)
    exclude = np.arange(0, 300, 3)
    kwargs = dict(method=method, losses=losses, exclude=exclude, **_options(method, n=300))
    first = vecaf.select(x, 25, seed=4, **kwargs)
    again = vecaf.select(torch.as_tensor(x, dtype=torch.float32), 25, seed=4, **kwargs)
    assert first.dtype == np.int64 and first.shape == (25,)
    assert np.unique(first).size == 25
    assert first.min() >= 0 and first.max() < 300
    assert not np.isin(first, exclude).any()
    np.testing.assert_array_equal(first, again)


def test_random_depends_on_seed_and_budget_can_fill_the_pool():
    x = np.random.default_rng(0).standard_normal((30, 3))
    a = vecaf.select(x, 10, method="random", seed=0)
    b = vecaf.select(x, 10, method="random", seed=1)
    assert not np.array_equal(np.sort(a), np.sort(b))
    everything = vecaf.select(x, 27, method="random", exclude=[0, 1, 2])
    np.testing.assert_array_equal(np.sort(everything), np.arange(3, 30))


@pytest.mark.parametrize("method", ["vecaf", "activeft"])
def test_parametric_methods_fill_the_whole_remaining_pool(method):
    x, _ = _clusters(40, d=4)
    idx = vecaf.select(x, 35, method=method, losses=np.ones(40), exclude=[1, 5, 7, 9, 11], max_iters=5)
    np.testing.assert_array_equal(np.sort(idx), np.setdiff1d(np.arange(40), [1, 5, 7, 9, 11]))


# --- bad input ---------------------------------------------------------------------------------------

GOOD = np.random.default_rng(0).standard_normal((20, 4))
LOSS = np.ones(20)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(budget=0), "budget must be positive"),
        (dict(budget=-3), "budget must be positive"),
        (dict(budget=21), "larger than the pool"),
        (dict(budget=18, exclude=[0, 1, 2]), r"larger than the pool minus exclude.*= 17"),
        (dict(budget=2.5), "budget must be an integer"),
        (dict(embeddings=np.where(np.eye(20, 4) > 0, np.nan, GOOD)), "embeddings contains NaN"),
        (dict(embeddings=np.where(np.eye(20, 4) > 0, np.inf, GOOD)), "embeddings contains inf"),
        (dict(losses=np.r_[np.nan, np.ones(19)]), "losses contains NaN"),
        (dict(losses=np.r_[np.inf, np.ones(19)]), "losses contains inf"),
        (dict(losses=np.r_[-0.5, np.ones(19)]), "losses must be non-negative"),
        (dict(losses=np.ones(19)), "losses has 19 entries but embeddings have 20"),
        (dict(losses=np.ones((20, 1))), r"losses must be a 1-D"),
        (dict(losses=np.ones(0)), "losses is empty"),
        (dict(text_embeddings=np.ones((19, 3))), "text_embeddings has 19 rows but embeddings have 20"),
        (dict(text_embeddings=np.full((20, 3), np.nan)), "text_embeddings contains NaN"),
        (dict(text_embeddings=np.ones(20)), "text_embeddings must be a 2-D"),
        (dict(embeddings=np.ones(20)), r"embeddings must be a 2-D \(N, D\) array, got shape \(20,\)"),
        (dict(embeddings=np.ones((0, 4))), "embeddings is empty"),
        (dict(embeddings=np.ones((20, 0))), "embeddings is empty"),
        (dict(embeddings=[["a", "b"]]), "embeddings must be an array of numbers"),
        (dict(embeddings=np.where(np.arange(20)[:, None] == 7, 0.0, GOOD)), "embeddings row 7 is all zeros"),
        (dict(embeddings=np.where(np.arange(20)[:, None] == 7, 0.0, GOOD), method="activeft"), "row 7 is all zeros"),
        (dict(exclude=[3, 20]), r"exclude indices must lie in \[0, 20\), got 20"),
        (dict(exclude=[-1]), r"exclude indices must lie in \[0, 20\)"),
        (dict(exclude=[0.5]), "exclude must hold integer indices"),
        (dict(seed=-1), "seed must be a non-negative integer"),
        (dict(losses=None), "method 'vecaf' needs losses"),
        (dict(method="topk_loss", losses=None), "method 'topk_loss' needs losses"),
        (dict(lam=-1.0), "lam must be >= 0"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(ensemble=0), "ensemble must be an integer >= 1"),
        (dict(max_iters=0), "max_iters must be an integer >= 1"),
        (dict(eta=float("nan")), "eta must be a finite number"),
        (dict(shrinkage=2.0), "shrinkage must be 'auto' or a number"),
        (dict(align="fastest"), "align must be"),
        (dict(block_bytes=10), "block_bytes must be an integer >= 65536"),
        (
            dict(text_embeddings=np.ones((20, 3)), text_aligned=True),
            "text_aligned=True needs text_embeddings of the image dimension 4",
        ),
        (dict(projection="ridge"), "projection must be a vecaf.cea.TextProjection"),
    ],
)
def test_bad_input_raises_value_error(kwargs, message):
    call = dict(embeddings=GOOD, budget=5, method="vecaf", losses=LOSS, max_iters=5)
    call.update(kwargs)
    embeddings, budget = call.pop("embeddings"), call.pop("budget")
    with pytest.raises(ValueError, match=message):
        vecaf.select(embeddings, budget, **call)


# --- baselines against plain loops -------------------------------------------------------------------


def test_topk_loss_matches_sorting_and_breaks_ties_by_seed():
    losses = np.array([0.1, 5.0, 3.0, 5.0, 0.2, 4.0, 5.0, 0.0])
    x = np.random.default_rng(0).standard_normal((8, 2))
    idx = vecaf.select(x, 3, method="topk_loss", losses=losses, exclude=[1])
    assert sorted(idx.tolist()) == [3, 5, 6]
    tie_sets = {
        tuple(sorted(vecaf.select(x, 2, method="topk_loss", losses=losses, seed=s).tolist())) for s in range(12)
    }
    assert tie_sets <= {(1, 3), (1, 6), (3, 6)} and len(tie_sets) > 1


# Rows worked by hand (natural log). entropy: r1 ln 3 = 1.0986 > r6 1.0805 > r4 0.9489 > r3 0.8979 > r5 0.8018
# > r2 ln 2 = 0.6931 > r0 0 (r4 = -2 (0.45 ln 0.45) - 0.1 ln 0.1); margin p(1) - p(2): r1 = r2 = r4 = 0 < r6 0.05 < r3 0.3 < r5 0.5 < r0 1.
HAND_PROBS = np.array(
    [
        [1.0, 0.0, 0.0],
        [1 / 3, 1 / 3, 1 / 3],
        [0.5, 0.5, 0.0],
        [0.6, 0.3, 0.1],
        [0.45, 0.1, 0.45],
        [0.7, 0.2, 0.1],
        [0.4, 0.35, 0.25],
    ]
)


def test_entropy_and_margin_on_rows_worked_by_hand():
    from vecaf.selection.uncertainty import entropy_scores, margin_scores

    np.testing.assert_allclose(
        entropy_scores(torch.as_tensor(HAND_PROBS)),
        [0.0, 1.0986123, 0.6931472, 0.8979457, 0.9489154, 0.8018185, 1.0805276],
        atol=1e-6,
    )
    np.testing.assert_allclose(margin_scores(torch.as_tensor(HAND_PROBS)), [1, 0, 0, 0.3, 0, 0.5, 0.05], atol=1e-12)
    x = np.random.default_rng(0).standard_normal((7, 2))
    assert vecaf.select(x, 3, method="entropy", probs=HAND_PROBS).tolist() == [1, 6, 4]
    assert vecaf.select(x, 3, method="entropy", probs=HAND_PROBS, exclude=[1]).tolist() == [6, 4, 3]
    assert sorted(vecaf.select(x, 3, method="margin", probs=HAND_PROBS).tolist()) == [1, 2, 4]
    assert vecaf.select(x, 4, method="margin", probs=HAND_PROBS, exclude=[1, 2])[1:].tolist() == [6, 3, 5]
    # the three zero margins tie: which two of them come first depends on the seed, deterministically
    tie_sets = {tuple(sorted(vecaf.select(x, 2, method="margin", probs=HAND_PROBS, seed=s).tolist())) for s in range(12)}
    assert tie_sets <= {(1, 2), (1, 4), (2, 4)} and len(tie_sets) > 1
    again = vecaf.select(x, 2, method="margin", probs=HAND_PROBS, seed=5)
    np.testing.assert_array_equal(again, vecaf.select(x, 2, method="margin", probs=HAND_PROBS, seed=5))


@pytest.mark.parametrize("method", ["entropy", "margin"])
def test_uncertainty_sampling_matches_a_plain_loop(method):
    rng = np.random.default_rng(7)
    probs = rng.dirichlet(np.full(5, 0.5), size=60).astype(np.float32)
    probs /= probs.sum(axis=1, keepdims=True)
    exclude = [0, 3, 9, 10, 41]
    scored = []
    for i, row in enumerate(probs.tolist()):
        if i in exclude:
            continue
        if method == "entropy":
            uncertainty = -sum(p * math.log(p) for p in row if p > 0)
        else:
            first, second = sorted(row, reverse=True)[:2]
            uncertainty = -(first - second)
        scored.append((uncertainty, i))
    expected = [i for _, i in sorted(scored, reverse=True)[:12]]
    idx = vecaf.select(np.ones((60, 3)), 12, method=method, probs=probs, exclude=exclude, seed=3)
    assert idx.tolist() == expected


@pytest.mark.parametrize(
    "probs,message",
    [
        (None, "method '{m}' needs probs"),
        (np.full(7, 1 / 7), r"probs must be a 2-D \(N, C\) array"),
        (np.full((6, 3), 1 / 3), "probs has 6 rows but embeddings have 7"),
        (np.ones((7, 1)), "probs needs at least 2 classes"),
        (np.where(np.arange(7)[:, None] == 2, np.nan, HAND_PROBS), "probs contains NaN"),
        (HAND_PROBS * np.array([[1.0], [1.0], [1.0], [2.0], [1.0], [1.0], [1.0]]), "row 3 sums to 2"),
        (np.where(np.arange(7)[:, None] == 4, [[1.5, -0.5, 0.0]], HAND_PROBS), "must be non-negative.*row 4"),
    ],
)
@pytest.mark.parametrize("method", ["entropy", "margin"])
def test_uncertainty_sampling_refuses_bad_probs(method, probs, message):
    with pytest.raises(ValueError, match=message.format(m=method)):
        vecaf.select(np.ones((7, 2)), 2, method=method, probs=probs)


def test_probs_are_ignored_by_methods_that_do_not_read_them():
    x, _ = _clusters(40)
    np.testing.assert_array_equal(
        vecaf.select(x, 5, method="random", probs="not even an array", seed=2), vecaf.select(x, 5, method="random", seed=2)
    )


def test_coreset_matches_plain_k_center_greedy():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 3))
    exclude = [4, 17]
    idx = vecaf.select(x, 6, method="coreset", exclude=exclude, device="cpu")
    centres = list(exclude)
    expected = []
    for _ in range(6):
        best, best_d = None, -1.0
        for i in range(40):
            if i in centres:
                continue
            d = min(sum((x[i, j] - x[c, j]) ** 2 for j in range(3)) for c in centres)
            if d > best_d:
                best, best_d = i, d
        centres.append(best)
        expected.append(best)
    assert idx.tolist() == expected


def test_coreset_without_exclude_starts_from_seeded_sample():
    x = np.random.default_rng(0).standard_normal((50, 3))
    a = vecaf.select(x, 5, method="coreset", seed=0)
    b = vecaf.select(x, 5, method="coreset", seed=9)
    assert a[0] != b[0] or not np.array_equal(a, b)
    np.testing.assert_array_equal(a, vecaf.select(x, 5, method="coreset", seed=0))


# --- matching ----------------------------------------------------------------------------------------


def _plain_matching(x, theta, exclude):
    """The nearest-sample rule: the scored rule with a neighbourhood of one."""
    return _plain_scored_matching(x, theta, exclude, np.zeros(len(x)), 1)


@pytest.mark.parametrize("candidates", [1, 2, 8])
def test_matching_matches_plain_rule_even_with_collisions(candidates):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 3))
    theta = np.repeat(rng.standard_normal((3, 3)), 4, axis=0) + 0.01 * rng.standard_normal((12, 3))
    exclude = np.array([0, 5, 6])
    got = matching.match_centroids(torch.tensor(x), torch.tensor(theta), exclude=exclude, candidates=candidates)
    assert got.tolist() == _plain_matching(x, theta, exclude)


def _plain_scored_matching(x, theta, exclude, scores, m):
    """The rule by hand: best-cosine order; each centroid takes the highest score among its m nearest
    untaken samples (the nearer on ties)."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    tn = theta / np.linalg.norm(theta, axis=1, keepdims=True)
    sims = tn @ xn.T
    sims[:, exclude] = -np.inf
    order = sorted(range(len(theta)), key=lambda c: (-sims[c].max(), c))
    taken = set(exclude)
    out = [None] * len(theta)
    for c in order:
        hood = [i for i in sorted(range(len(x)), key=lambda i: -sims[c, i]) if i not in taken][:m]
        best = hood[0]
        for i in hood[1:]:
            if scores[i] > scores[best]:
                best = i
        out[c] = best
        taken.add(best)
    return out


@pytest.mark.parametrize("m, candidates", [(1, 8), (2, 1), (3, 1), (3, 8), (5, 2), (40, 8)])  # (2, 1): extra passes
def test_scored_matching_matches_plain_rule_even_with_collisions(m, candidates):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 3))
    theta = np.repeat(rng.standard_normal((3, 3)), 5, axis=0) + 0.01 * rng.standard_normal((15, 3))
    exclude = np.array([0, 5, 6])
    scores = rng.integers(0, 4, size=40).astype(float)  # many ties: the nearer must win them
    got = matching.match_centroids(
        torch.tensor(x), torch.tensor(theta), exclude=exclude, candidates=candidates, neighbours=m, scores=scores
    )
    assert got.tolist() == _plain_scored_matching(x, theta, exclude, scores, m)
    assert len(set(got.tolist())) == 15


def test_scored_matching_rejects_missing_or_bad_scores():
    x, theta = torch.randn(10, 3), torch.randn(2, 3)
    for scores in (None, np.ones(9), np.array([np.nan] + [1.0] * 9)):
        with pytest.raises(ValueError, match="needs scores"):
            matching.match_centroids(x, theta, neighbours=2, scores=scores)
    with pytest.raises(ValueError, match="neighbours must be"):
        matching.match_centroids(x, theta, neighbours=0)


def test_vecaf_match_neighbours_takes_higher_loss_samples_near_the_same_centroids():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((400, 8))
    losses = rng.random(400)
    nearest = vecaf.select(x, 20, method="vecaf", losses=losses, seed=0)
    hood = vecaf.select(x, 20, method="vecaf", losses=losses, seed=0, match_neighbours=10)
    assert len(set(hood.tolist())) == 20
    assert losses[hood].mean() > losses[nearest].mean()
    with pytest.raises(ValueError, match="match_neighbours"):
        vecaf.select(x, 20, method="vecaf", losses=losses, seed=0, match_neighbours=0)


def test_matching_small_blocks_equal_one_block():
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.standard_normal((500, 6)), dtype=torch.float32)
    theta = torch.tensor(rng.standard_normal((40, 6)), dtype=torch.float32)
    one = matching.match_centroids(x, theta, exclude=np.arange(10))
    blocks = matching.match_centroids(x, theta, exclude=np.arange(10), block_bytes=40 * 4 * 7)
    np.testing.assert_array_equal(one, blocks)


# --- ensemble alignment and debiasing ----------------------------------------------------------------


def test_hungarian_and_greedy_alignment_against_brute_force():
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((5, 4))
    other = ref[[3, 0, 4, 1, 2]] + 0.3 * rng.standard_normal((5, 4))
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    cos = unit(ref) @ unit(other).T
    best = max(itertools.permutations(range(5)), key=lambda p: sum(cos[k, p[k]] for k in range(5)))
    assert ensemble.hungarian_match(torch.tensor(ref), torch.tensor(other)).tolist() == list(best)
    pairs = sorted(((cos[r, c], r, c) for r in range(5) for c in range(5)), reverse=True)
    greedy, used_r, used_c = {}, set(), set()
    for _, r, c in pairs:
        if r not in used_r and c not in used_c:
            greedy[r] = c
            used_r.add(r)
            used_c.add(c)
    got = ensemble.greedy_match(torch.tensor(ref), torch.tensor(other), block_bytes=4 * 5 * 2)
    assert got.tolist() == [greedy[r] for r in range(5)]


def test_ledoit_wolf_intensity_matches_sklearn():
    from sklearn.covariance import ledoit_wolf_shrinkage

    x = np.random.default_rng(0).standard_normal((30, 6)) * np.array([1, 2, 3, 0.5, 1, 4])
    assert ensemble.ledoit_wolf_shrinkage(torch.tensor(x)) == pytest.approx(
        ledoit_wolf_shrinkage(x, assume_centered=True), rel=1e-8
    )


def _formula_debias(members, reference, rho):
    """Align every member to the reference by brute force, then theta_1 - Sigma^{-1}(theta_1 - mu), by hand."""
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    members = unit(members)
    e_count, k, d = members.shape
    ref = members[reference]
    aligned = []
    for e in range(e_count):
        cos = ref @ members[e].T
        perm = max(itertools.permutations(range(k)), key=lambda p: sum(cos[i, p[i]] for i in range(k)))
        aligned.append(members[e][list(perm)])
    aligned = np.array(aligned)
    mu = np.array([[sum(aligned[e, c, j] for e in range(e_count)) / e_count for j in range(d)] for c in range(k)])
    cov = np.zeros((d, d))
    for e in range(e_count):
        for c in range(k):
            dev = aligned[e, c] - mu[c]
            cov += np.outer(dev, dev)
    cov /= k * (e_count - 1)
    m = np.trace(cov) / d
    sigma = (1 - rho) * cov / m + rho * np.eye(d)
    star = ref - (np.linalg.inv(sigma) @ (ref - mu).T).T
    return unit(star)


@pytest.mark.parametrize("rho,reference", [(0.3, 0), (0.7, 2), (1.0, 1)])
def test_debias_matches_formula_with_alignment(rho, reference):
    rng = np.random.default_rng(4)
    base = rng.standard_normal((4, 3))
    members = np.stack([base[rng.permutation(4)] + 0.25 * rng.standard_normal((4, 3)) for _ in range(3)])
    star, info = ensemble.debias(torch.tensor(members), reference=reference, shrinkage=rho)
    expected = _formula_debias(members, reference, rho)
    np.testing.assert_allclose(star.numpy(), expected, atol=1e-5)
    assert info["shrinkage"] == rho


def test_debias_with_identity_covariance_gives_the_aligned_mean():
    rng = np.random.default_rng(5)
    base = rng.standard_normal((3, 4))
    members = np.stack([base[rng.permutation(3)] + 0.2 * rng.standard_normal((3, 4)) for _ in range(4)])
    star, _ = ensemble.debias(torch.tensor(members), shrinkage=1.0)
    aligned = ensemble.align_members(ensemble.normalize_rows(torch.tensor(members)))
    mean = aligned.mean(dim=0)
    torch.testing.assert_close(star.double(), mean / mean.norm(dim=1, keepdim=True), rtol=0, atol=1e-6)


def test_auto_shrinkage_keeps_theta_star_no_farther_from_mu_than_theta_1():
    rng = np.random.default_rng(6)
    members = torch.tensor(rng.standard_normal((5, 20, 8)))
    star, info = ensemble.debias(members, shrinkage="auto")
    assert info["shrinkage"] >= 0.5
    aligned = ensemble.align_members(ensemble.normalize_rows(members))
    mu = aligned.mean(dim=0)
    unnormalised = aligned[0] - torch.linalg.solve(
        (1 - info["shrinkage"]) * _pooled(aligned) / info["mean_variance"] + info["shrinkage"] * torch.eye(8),
        (aligned[0] - mu).T,
    ).T
    assert bool(((unnormalised - mu).norm(dim=1) <= (aligned[0] - mu).norm(dim=1) + 1e-9).all())
    torch.testing.assert_close(star.double(), unnormalised / unnormalised.norm(dim=1, keepdim=True), atol=1e-6, rtol=0)


def _pooled(aligned):
    dev = (aligned - aligned.mean(dim=0)).reshape(-1, aligned.shape[-1])
    return dev.T @ dev / (aligned.shape[1] * (aligned.shape[0] - 1))


def test_single_member_is_not_debiased():
    theta = torch.randn(1, 4, 3)
    star, info = ensemble.debias(theta)
    torch.testing.assert_close(star, (theta[0] / theta[0].norm(dim=1, keepdim=True)).float())
    assert info["shrinkage"] is None


# --- initialisation ----------------------------------------------------------------------------------


def test_initial_indices_are_distinct_allowed_and_loss_weighted():
    weights = np.r_[np.full(50, 10.0), np.full(950, 0.1)]
    allowed = np.ones(1000, dtype=bool)
    allowed[:5] = False
    init = initial_indices(weights, allowed, 20, 4, seed=0)
    assert init.shape == (4, 20)
    for row in init:
        assert np.unique(row).size == 20 and row.min() >= 5
    share = (init < 50).mean()
    assert share > 0.6
    np.testing.assert_array_equal(init, initial_indices(weights, allowed, 20, 4, seed=0))
    zero = initial_indices(np.r_[np.ones(3), np.zeros(7)], np.ones(10, dtype=bool), 5, 1, seed=1)
    assert set(range(3)) <= set(zero[0].tolist())


# --- behaviour ---------------------------------------------------------------------------------------


def test_loss_awareness_against_activeft_and_random():
    x, labels = _clusters(900, d=16, c=6, seed=2)
    losses = np.where(labels == 0, 4.0, 0.4) * np.random.default_rng(0).uniform(0.8, 1.2, 900)
    counts = {}
    mean_loss = {}
    for method in ("vecaf", "activeft", "random"):
        picked = vecaf.select(x, 30, method=method, losses=losses, seed=1, **_options(method, fast=False))
        counts[method] = (labels[picked] == 0).sum()
        mean_loss[method] = losses[picked].mean()
    assert counts["vecaf"] > counts["activeft"] and counts["vecaf"] > counts["random"]
    assert mean_loss["vecaf"] > mean_loss["activeft"] and mean_loss["vecaf"] > mean_loss["random"]


def test_diversity_with_equal_losses():
    x, _ = _clusters(900, d=16, c=12, seed=3, spread=2.0)
    losses = np.ones(900)
    cov = {}
    for m in ("vecaf", "activeft", "random"):
        picks = [vecaf.select(x, 30, method=m, losses=losses, seed=s, **_options(m, fast=False)) for s in range(2)]
        cov[m] = np.mean([_coverage(x, p) for p in picks])
    assert cov["vecaf"] < cov["random"]
    assert cov["vecaf"] <= 1.1 * cov["activeft"]


def test_constant_losses_and_one_member_is_activeft():
    x, _ = _clusters(300, d=6, seed=4)
    for seed in (0, 3):
        one = vecaf.select(x, 15, losses=np.full(300, 0.7), ensemble=1, seed=seed, **FAST)
        np.testing.assert_array_equal(one, vecaf.select(x, 15, method="activeft", seed=seed, **FAST))


def test_lam_zero_concentrates_on_high_losses():
    x, labels = _clusters(600, d=8, c=4, seed=7)
    losses = np.where(labels == 2, 5.0, 0.5)
    picked = vecaf.select(x, 20, losses=losses, lam=0.0, loss_power=1.0, **FAST)  # Eq. 3 as written
    assert (labels[picked] == 2).mean() > 0.7


def test_every_method_runs_on_cpu_with_float64_and_torch_inputs():
    x, _ = _clusters(120, d=5)
    losses = torch.rand(120, dtype=torch.float64)
    for method in METHODS:
        idx = vecaf.select(
            torch.as_tensor(x, dtype=torch.float64), 7, method=method, losses=losses, **_options(method, n=120)
        )
        assert idx.shape == (7,) and np.unique(idx).size == 7


def test_vecaf_with_text_embeddings_projected_and_aligned():
    x, labels = _clusters(300, d=6)
    rng = np.random.default_rng(0)
    text = np.eye(6)[labels % 6] @ rng.standard_normal((6, 5)) + 0.1 * rng.standard_normal((300, 5))
    a = vecaf.select(x, 12, losses=np.ones(300), text_embeddings=text, **FAST)
    b = vecaf.select(x, 12, losses=np.ones(300), text_embeddings=text, **FAST)
    np.testing.assert_array_equal(a, b)
    aligned = vecaf.select(x, 12, losses=np.ones(300), text_embeddings=x + 0.1, text_aligned=True, **FAST)
    assert np.unique(aligned).size == 12
    unchanged = vecaf.select(x, 12, losses=np.ones(300), text_embeddings=text, eta=0.0, **FAST)
    np.testing.assert_array_equal(unchanged, vecaf.select(x, 12, losses=np.ones(300), **FAST))


def test_selection_reads_raw_rows_as_their_unit_vectors():
    """Rescaling every row leaves every cosine, so every pick, unchanged (the pool is never copied to unit rows)."""
    x, labels = _clusters(300, d=6, seed=5)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    scaled = unit * np.random.default_rng(1).uniform(0.2, 30.0, size=(300, 1))
    losses = np.random.default_rng(2).gamma(2.0, 1.0, size=300)
    text = np.eye(6)[labels % 6] + 0.1 * np.random.default_rng(3).standard_normal((300, 6))
    cases = [("vecaf", {"losses": losses}), ("activeft", {}), ("vecaf", {"losses": losses, "text_embeddings": text})]
    for method, options in cases:
        a = vecaf.select(unit, 12, method=method, **options, **FAST)
        b = vecaf.select(scaled, 12, method=method, **options, **FAST)
        np.testing.assert_array_equal(a, b)


def test_vecaf_options_reach_the_optimiser():
    x, _ = _clusters(200, d=6)
    base = vecaf.select(x, 10, losses=np.ones(200), **FAST)
    assert not np.array_equal(base, vecaf.select(x, 10, losses=np.ones(200), seed=1, **FAST))
    exact = vecaf.select(x, 10, losses=np.ones(200), refresh=1, ensemble=2, align="greedy", **FAST)
    assert exact.shape == (10,)
    assert math.isfinite(float(vecaf.selection.ods_objective(x, x[base])))


# --- tempered loss weights (loss_power) --------------------------------------------------------------


def _eq3_weights(losses, n, device, power=1.0):
    """The loss weights as they were before ``loss_power`` existed: w = L / mean(L) (Eq. 3), power ignored."""
    if losses is None:
        return torch.ones(n, dtype=torch.float32, device=device)
    losses = torch.as_tensor(losses, dtype=torch.float64)
    total = float(losses.sum())
    if total <= 0.0 or not math.isfinite(total):
        return torch.ones(n, dtype=torch.float32, device=device)
    return (losses * (n / total)).to(device=device, dtype=torch.float32)


def test_loss_weights_tempered_by_hand():
    """w_i = L_i^beta / mean(L^beta): L = (1, 4, 9, 0) gives L^0.5 = (1, 2, 3, 0), mean 1.5."""
    from vecaf.selection import ods

    losses = torch.tensor([1.0, 4.0, 9.0, 0.0], dtype=torch.float64)
    expected = {
        0.5: [1 / 1.5, 2 / 1.5, 3 / 1.5, 0.0],  # (1, 2, 3, 0) / 1.5
        1.0: [1 / 3.5, 4 / 3.5, 9 / 3.5, 0.0],  # Eq. 3: (1, 4, 9, 0) / 3.5
        2.0: [1 / 24.5, 16 / 24.5, 81 / 24.5, 0.0],  # (1, 16, 81, 0) / 24.5
    }
    for power, w in expected.items():
        got = ods.loss_weights(losses, 4, "cpu", power=power)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), w, rtol=1e-6)
        # p_i = w_i / N is a distribution
        assert float(got.double().sum()) / 4 == pytest.approx(1.0, rel=1e-6)
    # constant and all-zero losses stay uniform for any power; None is uniform
    for power in (0.25, 0.5, 3.0):
        constant = ods.loss_weights(torch.full((4,), 2.5), 4, "cpu", power=power)
        np.testing.assert_allclose(constant.numpy(), 1.0, rtol=1e-6)
        torch.testing.assert_close(ods.loss_weights(torch.zeros(4), 4, "cpu", power=power), torch.ones(4))
        torch.testing.assert_close(ods.loss_weights(None, 3, "cpu", power=power), torch.ones(3))
    # L^beta overflowing float64 is computed as (L / max L)^beta: (1, 2)^2 / mean = (2/5, 8/5)
    big = ods.loss_weights(torch.tensor([1e200, 2e200], dtype=torch.float64), 2, "cpu", power=2.0)
    np.testing.assert_allclose(big.numpy(), [2 / 5, 8 / 5], rtol=1e-6)


def test_vecaf_uses_the_tempered_weights_for_initialisation_and_attraction(monkeypatch):
    """The weights the strategy hands to the Gumbel initialisation and to the optimiser, observed by spies.

    The optimiser reads the raw rows, so its weights also carry 1 / ||x_i|| (each row enters as its unit vector).
    """
    from vecaf.selection import methods, ods

    seen = {}
    real_init, real_opt = methods.initial_indices, ods.optimize_ods

    def init_spy(weights, allowed, k, members, seed):
        seen["init"] = np.array(weights, copy=True)
        return real_init(weights, allowed, k, members, seed)

    def opt_spy(x, w, init, **kw):
        seen["ods"] = w.detach().cpu().numpy().copy()
        return real_opt(x, w, init, **kw)

    monkeypatch.setattr(methods, "initial_indices", init_spy)
    monkeypatch.setattr(ods, "optimize_ods", opt_spy)
    x = np.random.default_rng(0).standard_normal((4, 3))
    losses = np.array([1.0, 4.0, 9.0, 0.0])
    cases = [({}, [1 / 1.5, 2 / 1.5, 3 / 1.5, 0.0]), ({"loss_power": 1.0}, [1 / 3.5, 4 / 3.5, 9 / 3.5, 0.0])]
    for options, expected in cases:
        seen.clear()
        vecaf.select(x, 2, method="vecaf", losses=losses, device="cpu", max_iters=5, **options)
        np.testing.assert_allclose(seen["init"], expected, rtol=1e-6)
        np.testing.assert_allclose(seen["ods"], np.array(expected) / np.linalg.norm(x, axis=1), rtol=1e-6)


def test_loss_power_one_gives_exactly_the_eq3_picks(monkeypatch):
    """loss_power=1.0 reproduces the picks of the code before loss_power (weights L / mean L) bit for bit."""
    from vecaf.selection import ods

    x, labels = _clusters(400, d=8, c=5, seed=11)
    losses = np.where(labels == 1, 3.0, 0.3) * np.random.default_rng(2).uniform(0.5, 1.5, 400)
    exclude = np.arange(0, 400, 7)
    now = {s: vecaf.select(x, 20, losses=losses, exclude=exclude, seed=s, loss_power=1.0, **FAST) for s in (0, 5)}
    with monkeypatch.context() as patch:
        patch.setattr(ods, "loss_weights", _eq3_weights)
        before = {s: vecaf.select(x, 20, losses=losses, exclude=exclude, seed=s, **FAST) for s in (0, 5)}
    for s in now:
        np.testing.assert_array_equal(now[s], before[s])
    # the default is beta = 0.5, and it does change the picks here
    default = vecaf.select(x, 20, losses=losses, exclude=exclude, seed=0, **FAST)
    half = vecaf.select(x, 20, losses=losses, exclude=exclude, seed=0, loss_power=0.5, **FAST)
    np.testing.assert_array_equal(default, half)
    assert not np.array_equal(default, now[0])


@pytest.mark.parametrize("seed", [0, 3])
def test_loss_power_equals_passing_powered_losses(seed):
    """select(L, loss_power=0.5) == select(sqrt(L), loss_power=1.0), same seed, with and without text."""
    x, labels = _clusters(300, d=6, c=4, seed=12)
    losses = np.random.default_rng(seed).gamma(1.5, 1.0, 300) * np.where(labels == 0, 3.0, 1.0)
    text = np.random.default_rng(1).standard_normal((300, 5))
    for extra in ({}, {"text_embeddings": text}):
        tempered = vecaf.select(x, 15, losses=losses, loss_power=0.5, seed=seed, **extra, **FAST)
        powered = vecaf.select(x, 15, losses=np.sqrt(losses), loss_power=1.0, seed=seed, **extra, **FAST)
        np.testing.assert_array_equal(tempered, powered)


def test_constant_losses_ignore_loss_power():
    x, _ = _clusters(200, d=6, seed=13)
    for power in (0.25, 1.0, 2.0):
        picks = vecaf.select(x, 10, losses=np.full(200, 0.7), ensemble=1, loss_power=power, seed=2, **FAST)
        np.testing.assert_array_equal(picks, vecaf.select(x, 10, method="activeft", seed=2, **FAST))


@pytest.mark.parametrize(
    "power,message",
    [
        (0.0, "loss_power must be > 0"),
        (-0.5, "loss_power must be > 0"),
        (float("nan"), "loss_power must be a finite number, got nan"),
        (float("inf"), "loss_power must be a finite number, got inf"),
        (True, "loss_power must be a finite number, got True"),
        ("0.5", "loss_power must be a finite number"),
    ],
)
def test_bad_loss_power_raises_value_error(power, message):
    from vecaf.selection import ods

    with pytest.raises(ValueError, match=message):
        vecaf.select(GOOD, 5, method="vecaf", losses=LOSS, loss_power=power, max_iters=5)
    with pytest.raises(ValueError, match="loss_power must be a finite number > 0"):
        ods.loss_weights(torch.ones(3), 3, "cpu", power=power)


@pytest.mark.parametrize("method", ["entropy", "margin"])
def test_engine_gives_uncertainty_sampling_the_current_models_probabilities(monkeypatch, method):
    """finetune passes softmax(logits) of the head at each loop start: the same logits as the pool losses."""
    from vecaf.train import engine, finetune

    x, y = _clusters(200, d=8, c=4, seed=5)
    seen = []
    real = engine._call_select

    def spy(emb, k, **kwargs):
        seen.append(kwargs["probs"])
        picks = real(emb, k, **kwargs)
        expected = vecaf.select(emb, k, method=method, probs=kwargs["probs"], exclude=kwargs["exclude"],
                                seed=kwargs["seed"])
        np.testing.assert_array_equal(picks, expected)
        return picks

    monkeypatch.setattr(engine, "_call_select", spy)
    result = finetune(None, (x, y), (x[:50], y[:50]), mode="head", method=method, ratio=0.05, loops=2,
                      batch_budget=8, batch_size=8, lr=0.1)
    assert len(seen) == 2
    for probs, loop in zip(seen, result.loops):
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
        # the pool pass's cross-entropy losses are -log p_y of these probabilities
        np.testing.assert_allclose(-np.log(probs[loop.picks, y[loop.picks]]), loop.pick_losses, rtol=1e-4, atol=1e-5)
    assert not np.allclose(seen[0], seen[1])  # the head trained in between


@pytest.mark.parametrize("method", ["vecaf", "activeft"])
def test_precision_option_runs_both_paths_and_refuses_unknown_values(method):
    x, _ = _clusters(n=400, d=16, c=5)
    losses = np.random.default_rng(2).gamma(2.0, 1.0, size=x.shape[0])
    picks = {p: vecaf.select(x, 10, method=method, losses=losses, seed=3, precision=p) for p in ("float32", "bfloat16")}
    for p, idx in picks.items():
        assert idx.shape == (10,) and len(set(idx.tolist())) == 10, p
    with pytest.raises(ValueError, match="precision must be one of"):
        vecaf.select(x, 10, method=method, losses=losses, precision="fp16")


def test_vecaf_labelled_centroids_leave_the_labelled_cluster_to_the_labelled_set():
    # cluster 0 is large and already labelled (exclude); with the labelled set as fixed centroids the three
    # new picks go to the three other clusters, without it one stays in cluster 0 (the heaviest)
    rng = np.random.default_rng(0)
    centres = np.eye(6)[:4] * 6.0
    labels = np.repeat([0, 1, 2, 3], [400, 60, 60, 60])
    x = centres[labels] + rng.standard_normal((580, 6))
    exclude = np.arange(0, 400, 40)  # 10 labelled samples spread over cluster 0
    losses = np.ones(580)
    options = {"device": "cpu", "max_iters": 300, "lr": 2e-2, "ensemble": 3}  # centroids travel far in 6-d
    plain = vecaf.select(x, 3, method="vecaf", losses=losses, exclude=exclude, seed=0, **options)
    fixed = vecaf.select(
        x, 3, method="vecaf", losses=losses, exclude=exclude, seed=0, labelled_centroids=True, **options
    )
    assert not set(fixed.tolist()) & set(exclude.tolist())
    assert (labels[plain] == 0).sum() >= 1
    assert sorted(labels[fixed].tolist()) == [1, 2, 3]
    # without an exclude set the option changes nothing
    same = vecaf.select(x, 3, method="vecaf", losses=losses, seed=0, labelled_centroids=True, **options)
    assert np.array_equal(same, vecaf.select(x, 3, method="vecaf", losses=losses, seed=0, **options))
    with pytest.raises(ValueError, match="labelled_centroids"):
        vecaf.select(x, 3, method="vecaf", losses=losses, seed=0, labelled_centroids="yes")


def test_vecaf_labelled_repulsion_pushes_the_new_centroids_from_the_labelled_cluster():
    # the data of the test above. A centroid moved from cluster 0 to an empty cluster loses about
    # (400 - 60) / 580 / tau = 0.59 / tau of attraction and, pushed from cluster 0's ten labelled samples,
    # saves (lam / K) / tau of diversity: with lam = 3 (1 / tau) the three picks go to clusters 1-3
    # (with the default lam = 1, 0.33 / tau, one stays in cluster 0)
    rng = np.random.default_rng(0)
    centres = np.eye(6)[:4] * 6.0
    labels = np.repeat([0, 1, 2, 3], [400, 60, 60, 60])
    x = centres[labels] + rng.standard_normal((580, 6))
    exclude = np.arange(0, 400, 40)
    losses = np.ones(580)
    options = {"device": "cpu", "max_iters": 300, "lr": 2e-2, "ensemble": 3, "lam": 3.0}
    plain = vecaf.select(x, 3, method="vecaf", losses=losses, exclude=exclude, seed=0, **options)
    pushed = vecaf.select(
        x, 3, method="vecaf", losses=losses, exclude=exclude, seed=0, labelled_repulsion=True, **options
    )
    assert (labels[plain] == 0).sum() >= 1
    assert sorted(labels[pushed].tolist()) == [1, 2, 3]
    same = vecaf.select(x, 3, method="vecaf", losses=losses, seed=0, labelled_repulsion=True, **options)
    assert np.array_equal(same, vecaf.select(x, 3, method="vecaf", losses=losses, seed=0, **options))
    with pytest.raises(ValueError, match="labelled_repulsion"):
        vecaf.select(x, 3, method="vecaf", losses=losses, seed=0, labelled_repulsion=1)
