"""ODS (Eq. 3-7): objective against a plain loop, hand gradient against autograd and finite differences,
the optimiser against a plain autograd ActiveFT loop, block sizes and assignment refreshes."""

import math

import numpy as np
import pytest
import torch

from vecaf.selection import ods


def _pool(n=60, d=5, k=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    losses = torch.rand(n, generator=g, dtype=dtype) * 3
    centroids = torch.randn(k, d, generator=g, dtype=dtype)
    return x, losses, centroids


def _loop_objective(x, losses, centroids, lam, tau):
    """Eq. 7 with p_i = L_i / sum L (Eq. 3), cosines over tau, diversity averaged over K, by plain loops."""
    x = x.tolist()
    cents = centroids.tolist()
    losses = losses.tolist()

    def cos(a, b):
        dot = sum(p * q for p, q in zip(a, b))
        return dot / math.sqrt(sum(p * p for p in a)) / math.sqrt(sum(q * q for q in b))

    z = sum(losses)
    attraction = 0.0
    for xi, li in zip(x, losses):
        attraction += li / z * max(cos(xi, c) for c in cents)
    diversity = 0.0
    for a, ca in enumerate(cents):
        diversity += math.log(sum(math.exp(cos(ca, cb) / tau) for b, cb in enumerate(cents) if b != a))
    return -attraction / tau + lam / len(cents) * diversity


def _autograd_objective(x, w, params, lam, tau):
    """The same objective written with autograd (torch), as the reference for the hand gradient."""
    theta = params / params.norm(dim=-1, keepdim=True)
    xu = x / x.norm(dim=1, keepdim=True)
    k = theta.shape[-2]
    sims = torch.einsum("nd,ekd->nek", xu, theta)
    attraction = (w[:, None] * sims.max(dim=2).values).sum(dim=0) / x.shape[0]
    logits = torch.einsum("ekd,ejd->ekj", theta, theta) / tau
    logits = logits.masked_fill(torch.eye(k, dtype=torch.bool), -math.inf)
    return -attraction / tau + lam / k * torch.logsumexp(logits, dim=2).sum(dim=1)


@pytest.mark.parametrize("lam,tau", [(1.0, 0.07), (0.3, 1.0), (0.0, 0.5)])
def test_objective_matches_plain_loop(lam, tau):
    x, losses, centroids = _pool()
    value = ods.ods_objective(x, centroids, losses=losses, lam=lam, temperature=tau)
    assert value == pytest.approx(_loop_objective(x, losses, centroids, lam, tau), rel=1e-5, abs=1e-5)


def test_uniform_losses_equal_no_losses():
    x, _, centroids = _pool()
    ones = torch.full((x.shape[0],), 2.5, dtype=torch.float64)
    assert ods.ods_objective(x, centroids, losses=ones) == pytest.approx(ods.ods_objective(x, centroids))
    assert ods.ods_objective(x, centroids) == pytest.approx(
        _loop_objective(x, torch.ones(x.shape[0], dtype=torch.float64), centroids, 1.0, 0.07), rel=1e-5
    )


def test_ensemble_objective_is_per_member():
    x, losses, _ = _pool()
    g = torch.Generator().manual_seed(3)
    members = torch.randn(3, 4, x.shape[1], generator=g, dtype=torch.float64)
    values = ods.ods_objective(x, members, losses=losses, lam=0.5, temperature=0.2)
    for e in range(3):
        assert values[e] == pytest.approx(_loop_objective(x, losses, members[e], 0.5, 0.2), rel=1e-5)


def test_hand_gradient_matches_autograd():
    x, losses, _ = _pool(n=80, d=6, k=5)
    g = torch.Generator().manual_seed(1)
    params = torch.randn(2, 5, 6, generator=g, dtype=torch.float64) * 1.7
    xu = ods.normalize_rows(x)
    w = losses / losses.mean()
    value, grad = ods.ods_value_and_grad(xu, w, params, lam=0.7, temperature=0.1)
    p = params.clone().requires_grad_(True)
    ref = _autograd_objective(x, w, p, 0.7, 0.1)
    ref.sum().backward()
    torch.testing.assert_close(value, ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, p.grad, rtol=1e-8, atol=1e-10)


def test_hand_gradient_matches_finite_differences():
    x, losses, _ = _pool(n=40, d=4, k=3, seed=5)
    g = torch.Generator().manual_seed(2)
    params = torch.randn(1, 3, 4, generator=g, dtype=torch.float64)
    xu = ods.normalize_rows(x)
    w = losses / losses.mean()
    _, grad = ods.ods_value_and_grad(xu, w, params, lam=1.3, temperature=0.5)
    numeric = _central_differences(lambda p: ods.ods_value_and_grad(xu, w, p, lam=1.3, temperature=0.5)[0], params)
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-7)


def _central_differences(objective, params, h=1e-6):
    """d sum(objective(P)) / dP by central differences, one entry of P at a time (members are independent,
    so the sum over members differentiates each member's own value)."""
    numeric = torch.zeros_like(params)
    for idx in np.ndindex(*params.shape):
        plus, minus = params.clone(), params.clone()
        plus[idx] += h
        minus[idx] -= h
        numeric[idx] = (objective(plus) - objective(minus)).sum() / (2 * h)
    return numeric


def test_diversity_blocks_equal_one_block():
    g = torch.Generator().manual_seed(0)
    theta = ods.normalize_rows(torch.randn(3, 50, 8, generator=g))
    value, grad = ods._diversity(theta, 0.07, ods.DEFAULT_BLOCK_BYTES)
    small = 3 * 50 * 4 * 2 * 7
    value_b, grad_b = ods._diversity(theta, 0.07, small)
    torch.testing.assert_close(value, value_b)
    torch.testing.assert_close(grad, grad_b, rtol=1e-5, atol=1e-5)


def test_refresh_in_blocks_and_incremental_sums_equal_full():
    g = torch.Generator().manual_seed(0)
    x = ods.normalize_rows(torch.randn(300, 6, generator=g))
    w = torch.rand(300, generator=g) * 2
    theta_a = ods.normalize_rows(torch.randn(2, 7, 6, generator=g))
    theta_b = ods.normalize_rows(theta_a + 0.3 * torch.randn(2, 7, 6, generator=g))
    assign_a, sums_a, _, _ = ods._refresh(x, w, theta_a, rows=300)
    assign_b, sums_b, att_b, moved = ods._refresh(x, w, theta_b, rows=17, previous=(assign_a, sums_a.clone()))
    full_assign, full_sums, full_att, _ = ods._refresh(x, w, theta_b, rows=300)
    assert torch.equal(assign_b, full_assign)
    assert moved == int((assign_a != full_assign).sum()) > 0
    torch.testing.assert_close(sums_b, full_sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(att_b, full_att)
    expected = torch.zeros(2, 7, 6)
    for e in range(2):
        for i in range(300):
            expected[e, full_assign[i, e]] += w[i] * x[i]
    torch.testing.assert_close(full_sums, expected, rtol=1e-5, atol=1e-5)


def _plain_activeft(x, init, iters, lam=1.0, tau=0.07, lr=1e-3):
    """ActiveFT as usually written: autograd through the full N x K similarity, torch.optim.Adam."""
    p = init.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=lr)
    k = init.shape[0]
    for _ in range(iters):
        theta = torch.nn.functional.normalize(p, dim=1)
        sims = x @ theta.T / tau
        logits = (theta @ theta.T / tau).masked_fill(torch.eye(k, dtype=torch.bool), -math.inf)
        loss = -sims.max(dim=1).values.mean() + lam * torch.logsumexp(logits, dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.nn.functional.normalize(p.detach(), dim=1)


def test_exact_optimizer_reproduces_autograd_activeft():
    g = torch.Generator().manual_seed(0)
    x = ods.normalize_rows(torch.randn(400, 16, generator=g))
    init = x[torch.randperm(400, generator=g)[:12]]
    expected = _plain_activeft(x, init, iters=40)
    result = ods.optimize_ods(x, torch.ones(400), init[None], refresh=1, max_iters=40, tol=0.0)
    torch.testing.assert_close(result.centroids[0], expected, rtol=0, atol=2e-4)
    assert result.iterations == 40 and result.refreshes == 41


def test_adaptive_refresh_stays_close_to_exact_run():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(15, 24, generator=g) * 2
    x = ods.normalize_rows(centres[torch.randint(0, 15, (1000,), generator=g)] + torch.randn(1000, 24, generator=g))
    w = torch.rand(1000, generator=g) + 0.5
    w = w / w.mean()
    init = torch.stack([x[torch.randperm(1000, generator=g)[:30]] for _ in range(3)])
    exact = ods.optimize_ods(x, w, init, refresh=1, tol=0.0, max_iters=100)
    fast = ods.optimize_ods(x, w, init, tol=1e-4, max_iters=100)
    assert fast.refreshes < exact.refreshes / 3
    np.testing.assert_allclose(fast.objective, exact.objective, rtol=0.01)
    assert ods.ods_objective(x, fast.centroids[0], losses=w) == pytest.approx(fast.objective[0], rel=1e-5)


def test_optimizer_lowers_the_objective_and_stops_on_tol():
    g = torch.Generator().manual_seed(2)
    x = ods.normalize_rows(torch.randn(500, 8, generator=g))
    init = x[:10][None]
    start = ods.ods_objective(x, init[0])
    result = ods.optimize_ods(x, torch.ones(500), init, max_iters=2000, tol=1e-3)
    assert result.objective[0] < start
    assert result.converged and result.iterations < 2000
    assert [h[0] for h in result.history] == sorted(h[0] for h in result.history)


def test_loss_weights_follow_eq3():
    losses = torch.tensor([1.0, 3.0, 0.0, 4.0], dtype=torch.float64)
    w = ods.loss_weights(losses, 4, "cpu")
    torch.testing.assert_close(w / 4, torch.tensor([1 / 8, 3 / 8, 0.0, 4 / 8]))
    torch.testing.assert_close(ods.loss_weights(torch.zeros(4), 4, "cpu"), torch.ones(4))
    torch.testing.assert_close(ods.loss_weights(None, 3, "cpu"), torch.ones(3))


def test_rows_per_block_respects_budget():
    assert ods.rows_per_block(1000, 4000 * 10) == 10
    assert ods.rows_per_block(10**9, 16) == 1


def test_pool_rows_reads_the_callers_float32_matrix_in_place():
    """No normalised copy: a float32 pool on the device is used as it is; 1 / ||x_i|| by a plain loop."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 5, generator=g) * torch.rand(37, 1, generator=g).add(0.1) * 10
    rows, inverse = ods.pool_rows(x, "cpu", block_bytes=4 * 5 * 8)
    assert rows.data_ptr() == x.data_ptr()
    expected = [1.0 / math.sqrt(sum(v * v for v in row)) for row in x.tolist()]
    np.testing.assert_allclose(inverse.numpy(), expected, rtol=1e-6)
    rows64, _ = ods.pool_rows(x.double(), "cpu")
    assert rows64.dtype == torch.float32 and rows64.data_ptr() != x.data_ptr()
    x[30] = 0.0
    with pytest.raises(ValueError, match="row 30 is all zeros"):
        ods.pool_rows(x, "cpu", block_bytes=4 * 5 * 8)


def test_raw_rows_with_weights_over_their_norms_optimise_the_normalised_problem():
    """Eq. 7 on raw rows x_i with w_i / ||x_i|| is Eq. 7 on x_i / ||x_i|| with w_i: same path, same objective."""
    g = torch.Generator().manual_seed(4)
    unit = ods.normalize_rows(torch.randn(300, 12, generator=g))
    raw = unit * torch.rand(300, 1, generator=g).mul(20).add(0.5)
    w = torch.rand(300, generator=g) + 0.5
    w = w / w.mean()
    picks = torch.randperm(300, generator=g)[:16].view(2, 8)
    reference = ods.optimize_ods(unit, w, unit[picks], max_iters=60, tol=0.0)
    _, inverse = ods.pool_rows(raw, "cpu")
    result = ods.optimize_ods(raw, w * inverse, raw[picks], max_iters=60, tol=0.0)
    torch.testing.assert_close(result.centroids, reference.centroids, rtol=0, atol=1e-5)
    np.testing.assert_allclose(result.objective, reference.objective, rtol=1e-5)
    assert ods.ods_objective(raw, result.centroids[1], losses=w) == pytest.approx(result.objective[1], rel=1e-5)


def _clustered(n=3000, d=64, clusters=40, seed=3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g) * 1.5
    return (centres[torch.randint(0, clusters, (n,), generator=g)] + torch.randn(n, d, generator=g)) * 30.0


def test_bfloat16_assignment_is_within_its_stated_error_and_moves_only_on_float32_evidence():
    x = _clustered()
    g = torch.Generator().manual_seed(4)
    flat = ods.normalize_rows(x[torch.randperm(x.shape[0], generator=g)[: 3 * 50]])
    sims = (x @ flat.T).view(-1, 3, 50)
    plain_best, plain_arg = sims.max(dim=2)
    screen = flat.to(torch.bfloat16)
    norms = x.norm(dim=1, keepdim=True)
    # stated tolerance: the assigned centroid's float32 similarity is within 2 % of ||x_i|| of the maximum
    # (twice bfloat16's relative error 2^-8 on each of the two compared similarities, with margin)
    best, arg = ods.nearest_centroids(x, flat, 3, 50, screen=screen)
    assert bool((plain_best - sims.gather(2, arg[..., None]).squeeze(2) <= 0.02 * norms).all())
    assert (arg == plain_arg).float().mean() >= 0.9
    # already at the float32 argmax: bfloat16 rounding alone never moves a sample
    best, arg = ods.nearest_centroids(x, flat, 3, 50, screen=screen, old=plain_arg)
    torch.testing.assert_close(arg, plain_arg)
    torch.testing.assert_close(best, plain_best, rtol=2.0**-7, atol=1e-4)  # unmoved: the bfloat16 value
    # from a random assignment: a sample moves only to a centroid that is nearer in float32, and the
    # similarities returned for moved samples are the float32 ones
    old = torch.randint(0, 50, plain_arg.shape, generator=g)
    best, arg = ods.nearest_centroids(x, flat, 3, 50, screen=screen, old=old, block_bytes=1 << 16)
    moved = arg != old
    new_sim = sims.gather(2, arg[..., None]).squeeze(2)
    old_sim = sims.gather(2, old[..., None]).squeeze(2)
    assert bool((new_sim[moved] > old_sim[moved] - 1e-4).all())
    torch.testing.assert_close(best[moved], new_sim[moved], rtol=1e-5, atol=1e-4)
    assert bool((plain_best - new_sim <= 0.02 * norms).all())
    # the float32 path is the plain product
    best, arg = ods.nearest_centroids(x, flat, 3, 50)
    torch.testing.assert_close(arg, plain_arg)


def test_bfloat16_refresh_stays_close_to_the_float32_run():
    x = _clustered(n=2000, d=48, clusters=30)
    g = torch.Generator().manual_seed(5)
    weights = torch.rand(x.shape[0], generator=g) + 0.5
    w = weights / weights.mean() / x.norm(dim=1)  # raw rows: the weights carry 1 / ||x_i|| (``pool_rows``)
    init = torch.stack([x[torch.randperm(x.shape[0], generator=g)[:40]] for _ in range(2)])
    exact = ods.optimize_ods(x, w, init, tol=1e-4, max_iters=150, precision="float32")
    fast = ods.optimize_ods(x, w, init, tol=1e-4, max_iters=150, precision="bfloat16")
    assert exact.precision == "float32" and fast.precision == "bfloat16"
    # stated tolerance: final Eq. 7 objective within 0.5 % of the float32 run from the same start
    np.testing.assert_allclose(fast.objective, exact.objective, rtol=5e-3)
    # the reported objective is the exact (float32) Eq. 7 at the final centroids
    exact_at_fast = ods.ods_objective(x, fast.centroids, losses=weights)
    np.testing.assert_allclose(fast.objective, exact_at_fast, rtol=1e-4)


def test_precision_auto_and_bad_values():
    assert ods.resolve_precision("float32", "cpu") == "float32"
    assert ods.resolve_precision("bfloat16", "cpu") == "bfloat16"
    assert ods.resolve_precision("auto", "cpu") == ("bfloat16" if ods.fast_bfloat16("cpu") else "float32")
    with pytest.raises(ValueError, match="precision must be one of"):
        ods.resolve_precision("fp8", "cpu")


def test_bfloat16_incremental_sums_are_the_sums_of_its_own_assignment():
    x = _clustered(n=800, d=32, clusters=12)
    g = torch.Generator().manual_seed(6)
    w = torch.rand(800, generator=g) * 2
    theta_a = ods.normalize_rows(x[torch.randperm(800, generator=g)[:18]]).view(2, 9, 32)
    theta_b = ods.normalize_rows(theta_a + 0.05 * torch.randn(2, 9, 32, generator=g))
    assign_a, sums_a, _, _ = ods._refresh(x, w, theta_a, rows=800, screened=True)
    assign_b, sums_b, _, moved = ods._refresh(x, w, theta_b, rows=37, previous=(assign_a, sums_a.clone()), screened=True)
    assert moved == int((assign_a != assign_b).sum()) > 0
    expected = torch.zeros(2, 9, 32, dtype=torch.float64)
    for e in range(2):
        for i in range(800):
            expected[e, assign_b[i, e]] += float(w[i]) * x[i].double()
    torch.testing.assert_close(sums_b.double(), expected, rtol=1e-4, atol=1e-2)


# Fixed centroids (the labelled set held in Eq. 7's assignment, ``covered``).


def _loop_objective_with_fixed(x, losses, centroids, fixed, lam, tau, *, cover=True, repel=False):
    """Eq. 7 where each sample's attraction is its cosine to the nearest of the free and (``cover``) the
    fixed centroids, and each free centroid's diversity sum runs over the other free ones and (``repel``)
    the fixed ones, by plain loops."""
    x, cents, fixed, losses = x.tolist(), centroids.tolist(), fixed.tolist(), losses.tolist()

    def cos(a, b):
        dot = sum(p * q for p, q in zip(a, b))
        return dot / math.sqrt(sum(p * p for p in a)) / math.sqrt(sum(q * q for q in b))

    z = sum(losses)
    attraction = sum(li / z * max(cos(xi, c) for c in cents + (fixed if cover else [])) for xi, li in zip(x, losses))
    diversity = 0.0
    for a, ca in enumerate(cents):
        total = sum(math.exp(cos(ca, cb) / tau) for b, cb in enumerate(cents) if b != a)
        if repel:
            total += sum(math.exp(cos(ca, f) / tau) for f in fixed)
        diversity += math.log(total)
    return -attraction / tau + lam / len(cents) * diversity


def test_covered_similarities_match_a_plain_loop_on_the_rows_scale():
    x, _, _ = _pool(n=30, d=5)
    fixed = x[[3, 7]] * torch.tensor([[2.0], [0.5]], dtype=x.dtype)
    got = ods.covered_similarities(x, fixed, block_bytes=4 * 5 * 7)  # blocks of 1 row
    for i in range(30):
        want = max(float(x[i] @ f) / float(f.norm()) for f in fixed)  # ||x_i|| cos(x_i, f)
        assert float(got[i]) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert float(got[3]) == pytest.approx(float(x[3].norm()), rel=1e-5)
    for bad in (x[:0], x[:, :3]):
        with pytest.raises(ValueError, match="fixed centroids"):
            ods.covered_similarities(x, bad)
    with pytest.raises(ValueError, match="all zeros"):
        ods.covered_similarities(x, torch.zeros(1, 5, dtype=x.dtype))


def test_objective_with_fixed_centroids_matches_plain_loop():
    x, losses, centroids = _pool(n=80, d=5, k=4, seed=3)
    fixed = x[[0, 10, 20]] + 0.1
    value = ods.ods_objective(x, centroids, losses=losses, lam=0.6, temperature=0.3, fixed=fixed)
    want = _loop_objective_with_fixed(x, losses, centroids, fixed, 0.6, 0.3)
    assert value == pytest.approx(want, rel=1e-5, abs=1e-5)
    # the fixed centroids take part: the value differs from the free centroids' alone
    assert abs(want - _loop_objective(x, losses, centroids, 0.6, 0.3)) > 1e-3


def test_hand_gradient_with_fixed_centroids_matches_finite_differences():
    x, losses, _ = _pool(n=50, d=4, k=3, seed=6)
    xu = ods.normalize_rows(x)
    covered = ods.covered_similarities(xu, x[[1, 2, 5, 8]])
    g = torch.Generator().manual_seed(4)
    params = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    w = losses / losses.mean()
    value, grad = ods.ods_value_and_grad(xu, w, params, lam=0.9, temperature=0.4, covered=covered)
    for e in range(2):
        want = _loop_objective_with_fixed(x, losses, params[e], x[[1, 2, 5, 8]], 0.9, 0.4)
        assert float(value[e]) == pytest.approx(want, rel=1e-8)
    numeric = _central_differences(
        lambda p: ods.ods_value_and_grad(xu, w, p, lam=0.9, temperature=0.4, covered=covered)[0], params
    )
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("screened", [False, True])
def test_incremental_refresh_with_fixed_centroids_equals_full(screened):
    g = torch.Generator().manual_seed(2)
    x = ods.normalize_rows(torch.randn(400, 6, generator=g))
    w = torch.rand(400, generator=g) * 2
    covered = ods.covered_similarities(x, x[:25])
    theta_a = ods.normalize_rows(torch.randn(2, 7, 6, generator=g))
    theta_b = ods.normalize_rows(theta_a + 0.3 * torch.randn(2, 7, 6, generator=g))
    assign_a, sums_a, _, _ = ods._refresh(x, w, theta_a, rows=400, screened=screened, covered=covered)
    assign_b, sums_b, _, moved = ods._refresh(
        x, w, theta_b, rows=23, previous=(assign_a, sums_a.clone()), screened=screened, covered=covered
    )
    # the reference: plain float32 loops over samples and members, sink row K for the covered samples
    sims = torch.einsum("nd,ekd->nek", x, theta_b)
    expected = torch.zeros(2, 8, 6)
    for e in range(2):
        for i in range(400):
            best = int(sims[i, e].argmax())
            slot = 7 if float(sims[i, e, best]) <= float(covered[i]) else best
            expected[e, slot] += w[i] * x[i]
            assert int(assign_b[i, e]) % 7 == best or screened
            assert (int(assign_b[i, e]) >= 7) == (slot == 7) or screened
    assert sums_b.shape == (2, 8, 6)
    assert 0 < int((assign_b >= 7).sum()) < 800  # some samples covered, some not
    if not screened:
        torch.testing.assert_close(sums_b, expected, rtol=1e-5, atol=1e-5)
        assert moved == int((assign_a.clamp(max=7) != assign_b.clamp(max=7)).sum()) > 0
    full_assign, full_sums, _, _ = ods._refresh(x, w, theta_b, rows=400, screened=screened, covered=covered)
    torch.testing.assert_close(sums_b, full_sums, rtol=1e-5, atol=1e-5)


def test_optimiser_with_fixed_centroids_reports_the_exact_objective_and_leaves_the_covered_cluster():
    # two tight clusters; one sample of cluster A is fixed, so a single free centroid should model B
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([1.0, 0.0, 0.0]) + 0.05 * torch.randn(150, 3, generator=g)
    b = torch.tensor([0.0, 1.0, 0.0]) + 0.05 * torch.randn(50, 3, generator=g)
    x = ods.normalize_rows(torch.cat([a, b]))
    covered = ods.covered_similarities(x, x[:1])
    init = ods.normalize_rows(x[[5, 160]])[:, None]  # two members of K = 1: one starts in A, one in B
    free = ods.optimize_ods(x, torch.ones(200), init, refresh=1, tol=0.0, max_iters=200, lr=1e-2)
    fixed = ods.optimize_ods(x, torch.ones(200), init, refresh=1, tol=0.0, max_iters=200, lr=1e-2, covered=covered)
    for e in range(2):
        assert ods.ods_objective(x, fixed.centroids[e], fixed=x[:1]) == pytest.approx(fixed.objective[e], rel=1e-5)
    # without fixed centroids the heavier cluster A wins (lower objective); with A covered, B does
    assert float(free.centroids[int(np.argmin(free.objective)), 0] @ torch.tensor([1.0, 0, 0])) > 0.9
    assert float(fixed.centroids[int(np.argmin(fixed.objective)), 0] @ torch.tensor([0, 1.0, 0])) > 0.9


# Fixed centroids in the diversity term (``repel``): the free centroids are pushed from the labelled set.


@pytest.mark.parametrize("cover", [False, True])
def test_objective_and_hand_gradient_with_repelling_fixed_centroids_match_plain_loop_and_differences(cover):
    x, losses, _ = _pool(n=50, d=4, k=3, seed=7)
    fixed = x[[2, 9, 30]] * 1.5
    xu = ods.normalize_rows(x)
    repel = ods.normalize_rows(fixed)  # unit rows in float64 (``unit_fixed_centroids`` gives float32)
    covered = ods.covered_similarities(xu, fixed).double() if cover else None
    g = torch.Generator().manual_seed(5)
    params = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    w = losses / losses.mean()
    value, grad = ods.ods_value_and_grad(xu, w, params, lam=0.8, temperature=0.3, covered=covered, repel=repel)
    for e in range(2):
        want = _loop_objective_with_fixed(x, losses, params[e], fixed, 0.8, 0.3, cover=cover, repel=True)
        assert float(value[e]) == pytest.approx(want, rel=1e-6)  # covered_similarities is float32
        assert abs(want - _loop_objective_with_fixed(x, losses, params[e], fixed, 0.8, 0.3, cover=cover)) > 1e-3
    numeric = _central_differences(
        lambda p: ods.ods_value_and_grad(xu, w, p, lam=0.8, temperature=0.3, covered=covered, repel=repel)[0], params
    )
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-7)
    if cover:
        got = ods.ods_objective(x, params, losses=losses, lam=0.8, temperature=0.3, fixed=fixed, repel=True)
        np.testing.assert_allclose(got, value.numpy(), rtol=1e-5)


def test_repelling_diversity_in_blocks_equals_one_block_and_covers_a_single_centroid():
    g = torch.Generator().manual_seed(1)
    theta = ods.normalize_rows(torch.randn(3, 40, 8, generator=g))
    repel = ods.normalize_rows(torch.randn(25, 8, generator=g))
    value, grad = ods._diversity(theta, 0.07, ods.DEFAULT_BLOCK_BYTES, repel)
    value_b, grad_b = ods._diversity(theta, 0.07, 3 * 65 * 4 * 2 * 6, repel)  # blocks of 6 rows
    torch.testing.assert_close(value, value_b)
    torch.testing.assert_close(grad, grad_b, rtol=1e-5, atol=1e-5)
    # K = 1: the diversity term is the fixed centroids' alone, log sum_l exp(<theta, f_l> / tau)
    one, one_grad = ods._diversity(theta[:, :1], 0.5, ods.DEFAULT_BLOCK_BYTES, repel)
    logits = theta[:, 0] @ repel.T / 0.5
    torch.testing.assert_close(one, torch.logsumexp(logits, dim=1).double())
    torch.testing.assert_close(one_grad[:, 0], torch.softmax(logits, dim=1) @ repel / 0.5)


def test_repel_without_fixed_centroids_is_an_error():
    x, losses, centroids = _pool()
    with pytest.raises(ValueError, match="fixed centroids"):
        ods.ods_objective(x, centroids, losses=losses, repel=True)


def test_optimiser_with_repelling_fixed_centroids_leaves_the_labelled_cluster():
    # cluster A (direction a) holds 3/4 of the weight and three labelled samples. With K = 1 every sample is
    # the centroid's, so by hand F ~ -(0.75 <theta, a> + 0.25 <theta, b>) / tau without the push and
    # F ~ (0.25 <theta, a> - 0.25 <theta, b>) / tau with it (log sum_l exp(<theta, f_l>/tau) ~ <theta, a>/tau):
    # the optimum moves from near a to (b - a) / sqrt(2)
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([1.0, 0.0, 0.0]) + 0.05 * torch.randn(150, 3, generator=g)
    b = torch.tensor([0.0, 1.0, 0.0]) + 0.05 * torch.randn(50, 3, generator=g)
    x = ods.normalize_rows(torch.cat([a, b]))
    repel = ods.unit_fixed_centroids(x[:3], 3, "cpu")
    init = ods.normalize_rows(x[[5, 160]])[:, None]
    options = dict(refresh=1, tol=0.0, max_iters=200, lr=1e-2)
    free = ods.optimize_ods(x, torch.ones(200), init, **options)
    pushed = ods.optimize_ods(x, torch.ones(200), init, repel=repel, **options)
    for e in range(2):
        want = ods.ods_objective(x, pushed.centroids[e], fixed=x[:3], repel=True) - ods.ods_objective(
            x, pushed.centroids[e], fixed=x[:3]
        ) + ods.ods_objective(x, pushed.centroids[e])
        assert float(pushed.objective[e]) == pytest.approx(want, rel=1e-5)
    assert float(free.centroids[int(np.argmin(free.objective)), 0] @ torch.tensor([1.0, 0, 0])) > 0.9
    away = torch.tensor([-1.0, 1.0, 0.0]) / math.sqrt(2)
    assert float(pushed.centroids[int(np.argmin(pushed.objective)), 0] @ away) > 0.99
