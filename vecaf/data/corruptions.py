"""A shifted domain for the simulation: the *snow* corruption of ImageNet-C (Hendrycks & Dietterich, 2019).

The same formula as PyPI ``imagecorruptions`` 1.1.2 (``corruptions.snow``), written with numpy and scipy only:
that package imports OpenCV at module level and uses APIs that current scipy and scikit-image removed, so it
is not a dependency here. With x in [0, 1] (H, W) grey or (H, W, 3) RGB and the severity's constants
c = (mu, s, z, t, r, sigma, w):

    n        ~ Normal(mu, s) of shape (H, W)                  (the snow flakes' seed noise)
    n'       = zoom(centre crop of n of side ceil(H/z), z)     (bigger flakes, bilinear; cropped to H x W)
    n'[n' < t] = 0;  n' = clip(n', 0, 1)
    S        = motion_blur(n', radius r, sigma, angle a),  a ~ U(-135, -45) degrees (falling snow)
    S        = round(255 S) / 255
    g        = x (grey) or 0.299 R + 0.587 G + 0.114 B (RGB)
    x'       = w x + (1 - w) max(x, 1.5 g + 0.5)              (the scene whitens)
    snow(x)  = clip(x' + S + rot180(S), 0, 1) * 255

motion_blur(y, r, sigma, a) = sum_{i < 2r+1} k_i shift(y, dx_i, dy_i), with k_i = exp(-i^2 / 2 sigma^2) / Z
(a half-Gaussian along the streak), (dy_i, dx_i) = -ceil(i (sin a, cos a) - 1/2) and ``shift`` filling with
the edge row/column (the loop stops once a shift leaves the image).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["SNOW_SEVERITIES", "blend_snow", "motion_blur", "motion_blur_kernel", "snow", "snow_layer"]

SNOW_SEVERITIES: tuple[tuple[float, float, float, float, float, float, float], ...] = (
    (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
    (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
    (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
    (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
    (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
)
"""(mu, s, z, t, r, sigma, w) per severity 1..5, as in ImageNet-C."""


def _constants(severity: int) -> tuple[float, ...]:
    if not isinstance(severity, int) or not 1 <= severity <= len(SNOW_SEVERITIES):
        raise ValueError(f"snow severity must be an integer in 1..{len(SNOW_SEVERITIES)}, got {severity!r}")
    return SNOW_SEVERITIES[severity - 1]


def motion_blur_kernel(width: int, sigma: float) -> np.ndarray:
    """k_i = exp(-i^2 / (2 sigma^2)) / Z for i = 0..width-1, summing to 1."""
    if width < 1 or sigma <= 0:
        raise ValueError(f"need width >= 1 and sigma > 0, got width={width}, sigma={sigma}")
    k = np.exp(-(np.arange(width, dtype=np.float64) ** 2) / (2.0 * sigma**2))
    return k / k.sum()


def _shift(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """``image`` moved by dx columns and dy rows, the vacated side filled with the nearest edge row/column."""
    out = image
    if dx:
        out = np.roll(out, dx, axis=1)
        if dx > 0:
            out[:, :dx] = out[:, dx : dx + 1]
        else:
            out[:, dx:] = out[:, dx - 1 : dx]
    if dy:
        out = np.roll(out, dy, axis=0)
        if dy > 0:
            out[:dy, :] = out[dy : dy + 1, :]
        else:
            out[dy:, :] = out[dy - 1 : dy, :]
    return out if (dx or dy) else image.copy()


def motion_blur(image: np.ndarray, *, radius: int, sigma: float, angle: float) -> np.ndarray:
    """The streak blur of the module docstring (an (H, W) float image in, the same shape out)."""
    width = 2 * radius + 1
    kernel = motion_blur_kernel(width, sigma)
    sin_a, cos_a = math.sin(math.radians(angle)), math.cos(math.radians(angle))
    image = np.asarray(image, dtype=np.float64)
    blurred = np.zeros_like(image)
    for i in range(width):
        dy = -math.ceil(i * sin_a - 0.5)
        dx = -math.ceil(i * cos_a - 0.5)
        if abs(dy) >= image.shape[0] or abs(dx) >= image.shape[1]:
            break
        blurred += kernel[i] * _shift(image, dx, dy)
    return blurred


def snow_layer(shape: tuple[int, int], severity: int, rng: np.random.Generator) -> np.ndarray:
    """S of the module docstring: the (H, W) snow layer in [0, 1], on the 1/255 grid."""
    from scipy.ndimage import zoom

    mu, s, z, t, r, sigma, _ = _constants(severity)
    h, w = shape
    noise = rng.normal(loc=mu, scale=s, size=(h, w))
    ch, cw = math.ceil(h / z), math.ceil(w / z)
    top, left = (h - ch) // 2, (w - cw) // 2
    layer = zoom(noise[top : top + ch, left : left + cw], z, order=1)[:h, :w]
    layer[layer < t] = 0
    layer = np.clip(layer, 0.0, 1.0)
    layer = motion_blur(layer, radius=int(r), sigma=sigma, angle=float(rng.uniform(-135, -45)))
    return np.round(layer * 255.0) / 255.0


def blend_snow(x: np.ndarray, layer: np.ndarray, severity: int) -> np.ndarray:
    """clip(w x + (1 - w) max(x, 1.5 g + 0.5) + S + rot180(S), 0, 1) for x in [0, 1] (grey or RGB)."""
    *_, w = _constants(severity)
    x = np.asarray(x, dtype=np.float64)
    layer = np.asarray(layer, dtype=np.float64)
    if x.ndim == 3:
        grey = (x @ np.array([0.299, 0.587, 0.114]))[..., None]
        layer = layer[..., None]
    else:
        grey = x
    whitened = w * x + (1.0 - w) * np.maximum(x, 1.5 * grey + 0.5)
    return np.clip(whitened + layer + np.rot90(layer, k=2), 0.0, 1.0)


def snow(image: np.ndarray, *, severity: int = 3, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Snow on a uint8 image ((H, W) grey or (H, W, 3) RGB); returns uint8 of the same shape.

    Args:
        image: the image.
        severity: 1..5 (ImageNet-C's levels).
        rng: a numpy Generator or a seed (the flakes and the fall angle are random).

    Raises:
        ValueError: not a uint8 (H, W) or (H, W, 3) array, or a severity outside 1..5.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"snow needs a uint8 (H, W) or (H, W, 3) image, got {image.dtype} {image.shape}")
    _constants(severity)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    layer = snow_layer(image.shape[:2], severity, rng)
    out = blend_snow(image.astype(np.float64) / 255.0, layer, severity)
    return np.round(out * 255.0).astype(np.uint8)
