"""CEA (Eq. 8-10), the text -> image projection, the pool path and OOD caption steering (Sec. 3.3)."""

import math

import numpy as np
import pytest
import torch

import vecaf
from vecaf import cea


def _pair(k=6, d=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((k, d)), rng.standard_normal((k, d))


def _loop_augment(e, t, eta):
    dist = [sum((e[i][j] - t[i][j]) ** 2 for j in range(len(e[i]))) for i in range(len(e))]
    z = sum(math.exp(v) for v in dist)
    alpha = [math.exp(v) / z for v in dist]
    aug = [[e[i][j] - eta * alpha[i] * (e[i][j] - t[i][j]) for j in range(len(e[i]))] for i in range(len(e))]
    return np.array(aug), np.array(alpha)


@pytest.mark.parametrize("eta", [0.3, 1.0, 2.5])
def test_augment_matches_plain_loop(eta):
    e, t = _pair()
    aug, alpha = cea.augment(e, t, eta=eta)
    ref_aug, ref_alpha = _loop_augment(e.tolist(), t.tolist(), eta)
    np.testing.assert_allclose(alpha, ref_alpha, rtol=1e-12)
    np.testing.assert_allclose(aug, ref_aug, rtol=1e-12)
    assert alpha.sum() == pytest.approx(1.0)
    assert isinstance(aug, np.ndarray) and aug.shape == e.shape


def test_attention_sums_to_one_and_grows_with_distance():
    e, t = _pair(k=5)
    alpha = cea.attention(e, t)
    assert alpha.sum() == pytest.approx(1.0)
    dist = ((e - t) ** 2).sum(axis=1)
    assert np.argmax(alpha) == np.argmax(dist) and np.argmin(alpha) == np.argmin(dist)


def test_eta_zero_leaves_embeddings_unchanged():
    e, t = _pair()
    aug, _ = cea.augment(e, t, eta=0.0)
    np.testing.assert_array_equal(aug, e)


def test_mix_is_eq10_and_lam_bw_one_disables_cea():
    e, t = _pair()
    aug, _ = cea.augment(e, t, eta=0.8)
    np.testing.assert_allclose(cea.mix(e, aug, 0.25), 0.75 * aug + 0.25 * e)
    np.testing.assert_array_equal(cea.mix(e, aug, 1.0), e)
    np.testing.assert_array_equal(cea.mix(e, aug, 0.0), aug)


def test_no_gradient_through_alpha_or_text():
    e_np, t_np = _pair(k=4, d=3, seed=1)
    e = torch.tensor(e_np, requires_grad=True)
    t = torch.tensor(t_np, requires_grad=True)
    eta, lam_bw = 0.7, 0.3
    aug, alpha = cea.augment(e, t, eta=eta)
    out = cea.mix(e, aug, lam_bw)
    out.sum().backward()
    assert t.grad is None
    assert not alpha.requires_grad
    expected = ((1 - lam_bw) * (1 - eta * alpha) + lam_bw)[:, None].expand(4, 3)
    torch.testing.assert_close(e.grad, expected.detach())
    weights = torch.randn(4, 3, dtype=torch.float64)
    e.grad = None
    (cea.mix(e, cea.augment(e, t, eta=eta)[0], lam_bw) * weights).sum().backward()
    torch.testing.assert_close(e.grad, expected.detach() * weights)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: cea.augment(np.ones((3, 2)), np.ones((3, 4)), eta=1.0), "must have the same shape.*fit_projection"),
        (lambda: cea.augment(np.ones(3), np.ones(3), eta=1.0), "must be a non-empty 2-D"),
        (lambda: cea.augment(np.ones((0, 2)), np.ones((0, 2)), eta=1.0), "must be a non-empty 2-D"),
        (lambda: cea.augment(np.full((2, 2), np.nan), np.ones((2, 2)), eta=1.0), "image_embeddings contains NaN"),
        (lambda: cea.augment(np.ones((2, 2)), np.full((2, 2), np.inf), eta=1.0), "text_embeddings contains NaN or inf"),
        (lambda: cea.augment(np.ones((2, 2)), np.ones((2, 2)), eta=float("inf")), "eta must be a finite number"),
        (lambda: cea.mix(np.ones((2, 2)), np.ones((2, 2)), 1.5), r"lam_bw must be a number in \[0, 1\]"),
        (lambda: cea.mix(np.ones((2, 2)), np.ones((3, 2)), 0.5), "differ in shape"),
        (lambda: cea.fit_projection(np.ones((4, 2)), np.ones((5, 3))), "4 rows but image_embeddings has 5"),
        (lambda: cea.fit_projection(np.ones((4, 2)), np.ones((4, 3)), ridge=0), "ridge must be a positive number"),
        (lambda: cea.steer_captions("a cat", "snow"), "captions must be a sequence of strings"),
        (lambda: cea.steer_captions(["a cat"], 3), "prompt must be a string"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_fit_projection_is_the_closed_form_ridge():
    rng = np.random.default_rng(0)
    t = rng.standard_normal((50, 3))
    e = rng.standard_normal((50, 4))
    proj = cea.fit_projection(t, e, ridge=0.1)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    en = e / np.linalg.norm(e, axis=1, keepdims=True)
    tc, ec = tn - tn.mean(0), en - en.mean(0)
    gram = tc.T @ tc
    w = np.linalg.solve(gram + 0.1 * np.trace(gram) / 3 * np.eye(3), tc.T @ ec)
    np.testing.assert_allclose(proj.weight.numpy(), w, rtol=1e-8)
    mapped = proj(t)
    expected = (tn - tn.mean(0)) @ w + en.mean(0)
    np.testing.assert_allclose(mapped, expected / np.linalg.norm(expected, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    small_blocks = cea.fit_projection(t, e, ridge=0.1, block_bytes=8 * 7 * 3)
    np.testing.assert_allclose(small_blocks.weight.numpy(), w, rtol=1e-8)


def test_projection_recovers_a_linear_map():
    rng = np.random.default_rng(1)
    latent = rng.standard_normal((400, 3))
    e = latent @ rng.standard_normal((3, 6)) + 5.0
    t = latent @ rng.standard_normal((3, 4)) + 2.0
    proj = cea.fit_projection(t, e, ridge=1e-6)
    en = e / np.linalg.norm(e, axis=1, keepdims=True)
    assert float(np.mean(np.sum(proj(t) * en, axis=1))) > 0.99


def test_pool_augment_is_eq8_9_with_step_eta_times_n():
    rng = np.random.default_rng(2)
    e = rng.standard_normal((30, 5))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    t = rng.standard_normal((30, 3))
    proj = cea.fit_projection(t, e)
    e32 = torch.tensor(e, dtype=torch.float32)
    got = cea.pool_augment(e32, torch.tensor(t), eta=0.4, transform=proj, block_bytes=4 * 8 * 7)
    ref, _ = cea.augment(e, proj(t).astype(np.float64), eta=0.4 * 30)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-6)
    same_space = cea.pool_augment(torch.tensor(e, dtype=torch.float32), torch.tensor(e + 1.0), eta=0.4)
    tn = (e + 1.0) / np.linalg.norm(e + 1.0, axis=1, keepdims=True)
    np.testing.assert_allclose(same_space.numpy(), cea.augment(e, tn, eta=0.4 * 30)[0], rtol=1e-5, atol=1e-6)


def test_steer_captions_appends_the_prompt():
    captions = ["a photo of a sneaker", "a dog on grass.", "", "what?"]
    steered = cea.steer_captions(captions, "It's a snowy day!")
    assert steered == [
        "a photo of a sneaker. It's a snowy day!",
        "a dog on grass. It's a snowy day!",
        "It's a snowy day!",
        "what? It's a snowy day!",
    ]
    assert cea.steer_captions(captions, None) == captions
    assert cea.steer_captions(captions, "  ") == captions


def test_ood_steering_moves_picks_towards_the_domain():
    """Images carry a 'snow' direction u; their captions a text direction v when snowy. Appending the
    prompt adds v to every caption; with the projection fitted on the un-steered captions, the picks
    move towards snowy images."""
    rng = np.random.default_rng(0)
    n, d, dt, c = 900, 24, 16, 8
    centres = rng.standard_normal((c, d)) * 2
    labels = rng.integers(0, c, n)
    snowy = rng.random(n) < 0.25
    u = rng.standard_normal(d)
    u *= 3.0 / np.linalg.norm(u)
    images = centres[labels] + snowy[:, None] * u + 0.8 * rng.standard_normal((n, d))
    text_map = rng.standard_normal((c + 1, dt))
    captions = np.eye(c)[labels] @ text_map[:c] + snowy[:, None] * text_map[c] + 0.3 * rng.standard_normal((n, dt))
    steered = captions + 1.5 * text_map[c]
    projection = vecaf.cea.fit_projection(captions, images)
    share = {}
    for name, text in (("plain", captions), ("steered", steered)):
        picks = [
            # float32: the thresholds below were set on the exact path; this test is about CEA, not precision
            vecaf.select(images, 30, losses=np.ones(n), text_embeddings=text, projection=projection, eta=1.0, seed=s,
                         precision="float32")
            for s in range(2)
        ]
        share[name] = np.mean([snowy[p].mean() for p in picks])
    assert share["steered"] > share["plain"] + 0.15
    assert share["steered"] > snowy.mean() + 0.15
