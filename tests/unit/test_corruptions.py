"""vecaf.data.corruptions: the ImageNet-C snow formula, checked against hand-worked numbers and plain loops."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vecaf.data.corruptions import SNOW_SEVERITIES, blend_snow, motion_blur, motion_blur_kernel, snow, snow_layer


def test_motion_blur_kernel_is_a_normalised_half_gaussian():
    k = motion_blur_kernel(3, 1.0)
    raw = [1.0, math.exp(-0.5), math.exp(-2.0)]  # exp(-i^2 / 2) for i = 0, 1, 2
    assert k == pytest.approx([v / sum(raw) for v in raw])


def test_motion_blur_of_an_impulse_at_angle_zero_streaks_it_to_the_left():
    image = np.zeros((5, 9))
    image[2, 6] = 1.0
    out = motion_blur(image, radius=1, sigma=1.0, angle=0.0)
    k = motion_blur_kernel(3, 1.0)
    expected = np.zeros((5, 9))
    for i in range(3):  # angle 0: (dy, dx) = (0, -ceil(i - 1/2)) = (0, -i); the impulse lands i columns left
        expected[2, 6 - i] += k[i]
    assert out == pytest.approx(expected)


def test_motion_blur_at_minus_ninety_degrees_streaks_downwards():
    image = np.zeros((9, 5))
    image[3, 2] = 1.0
    out = motion_blur(image, radius=1, sigma=2.0, angle=-90.0)
    k = motion_blur_kernel(3, 2.0)
    # sin(-90) = -1, cos(-90) ~ 0: dy_i = -ceil(-i - 1/2) = i, dx_i = 0 (cos rounds to 0 within 1/2)
    assert [out[3 + i, 2] for i in range(3)] == pytest.approx(list(k))
    assert out.sum() == pytest.approx(1.0)


def test_blend_snow_whitens_by_hand_numbers_when_there_are_no_flakes():
    x = np.array([[0.2, 0.8]])
    w = SNOW_SEVERITIES[2][6]  # severity 3: w = 0.7
    out = blend_snow(x, np.zeros_like(x), 3)
    # 0.2: 0.7*0.2 + 0.3*max(0.2, 0.8) = 0.38;  0.8: 0.7*0.8 + 0.3*max(0.8, 1.7) = 1.07 -> clipped to 1
    assert w == 0.7
    assert out == pytest.approx(np.array([[0.38, 1.0]]))


def test_blend_snow_adds_the_layer_and_its_half_turn():
    x = np.zeros((2, 2))
    layer = np.array([[0.1, 0.0], [0.0, 0.0]])
    out = blend_snow(x, layer, 1)  # w = 0.8: whitened = 0.2 * 0.5 = 0.1 everywhere
    assert out == pytest.approx(np.array([[0.2, 0.1], [0.1, 0.2]]))


def test_snow_on_fashion_sized_images_is_seeded_brighter_and_keeps_shape():
    rng = np.random.default_rng(0)
    image = (rng.random((28, 28)) * 80).astype(np.uint8)
    a = snow(image, severity=3, rng=1)
    b = snow(image, severity=3, rng=1)
    c = snow(image, severity=3, rng=2)
    assert a.dtype == np.uint8 and a.shape == (28, 28)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.astype(float).mean() > image.astype(float).mean() + 20
    rgb = snow(np.stack([image] * 3, axis=-1), severity=5, rng=0)
    assert rgb.shape == (28, 28, 3)


def test_snow_layer_lies_on_the_255_grid_in_unit_range():
    layer = snow_layer((28, 28), 4, np.random.default_rng(3))
    assert layer.shape == (28, 28) and 0.0 <= layer.min() and layer.max() <= 1.0
    assert np.allclose(layer * 255, np.round(layer * 255))
    assert layer.max() > 0


@pytest.mark.parametrize("bad", [np.zeros((4, 4), dtype=np.float32), np.zeros((4, 4, 2), dtype=np.uint8)])
def test_snow_refuses_other_images(bad):
    with pytest.raises(ValueError, match="uint8"):
        snow(bad)


@pytest.mark.parametrize("severity", [0, 6, 2.0])
def test_snow_refuses_unknown_severities(severity):
    with pytest.raises(ValueError, match="severity"):
        snow(np.zeros((8, 8), dtype=np.uint8), severity=severity)
