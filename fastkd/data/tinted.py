"""The embedded digits in colour: a small dataset for cross-modal (luminance → chrominance) transfer.

The shipped digits (:mod:`fastkd.data.digits`) are grey: their CIELab chrominance (ab) is zero everywhere,
so an L / ab split of them is degenerate (the ab view carries nothing). :class:`TintedDigits` paints each
digit with colours drawn *per sample, independently of its class*, so that the class is only in the glyph's
shape, and both views see that shape with different strength:

    pixel = background + v · (stroke − background),   v = digit intensity / 16 ∈ [0, 1]

with, per sample, a dark background (HSV value 0.05–0.35) and a light stroke (value 0.65–1.0), each of a
uniformly random hue at saturation 0.25–0.75. The L view always shows the glyph at high contrast (the
stroke is lighter than the background); the ab view shows it only as far as the two chromaticities differ
(little when the hues are close or the saturations low), so a network that sees ab alone learns the digits
less well than one that sees L — the luminance → chrominance setting the CRD paper measures, in miniature.
The colours are a function of ``seed`` and the sample's index in the 1,797 digits, and the split is the
digits' own, so every run sees the same images. Pixels are repeated to ``size`` (a multiple of 8) and
stored as 8-bit RGB (0-255).
"""
from __future__ import annotations

import numpy as np

from fastkd.data.arrays import ArrayDataset, channel_stats
from fastkd.data.digits import NUM_CLASSES, _split_indices, raw_digits


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``[N]`` hue, saturation, value in [0, 1] → ``[N, 3]`` RGB in [0, 1] (the hexcone model)."""
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([np.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return table[i, np.arange(len(h))]


def tinted_images(size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits painted (see the module doc): uint8 ``[1797, size, size, 3]`` and int64 labels."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 8 or size % 8:
        raise ValueError(f"size must be a multiple of 8 (8, 16, 32, ...), got {size!r}")
    images, targets = raw_digits()
    n = len(targets)
    rng = np.random.RandomState(seed)
    hue_bg, hue_fg = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    sat_bg, sat_fg = rng.uniform(0.25, 0.75, n), rng.uniform(0.25, 0.75, n)
    val_bg, val_fg = rng.uniform(0.05, 0.35, n), rng.uniform(0.65, 1.0, n)
    background = _hsv_to_rgb(hue_bg, sat_bg, val_bg)[:, None, None, :]
    stroke = _hsv_to_rgb(hue_fg, sat_fg, val_fg)[:, None, None, :]
    v = (images.astype(np.float64) / 16.0)[..., None]
    painted = np.rint(255.0 * (background + v * (stroke - background))).clip(0, 255).astype(np.uint8)
    factor = size // 8
    return painted.repeat(factor, axis=1).repeat(factor, axis=2), targets


class TintedDigits(ArrayDataset):
    """The digits in colour (see the module doc), split as :class:`~fastkd.data.digits.Digits` splits them.

    Args:
        train: the training split (1,347 images), else the test split (450).
        size: image side, a multiple of 8 (pixels are repeated).
        seed: the colours' seed (the split is the digits' fixed one).
    """

    def __init__(self, train: bool = True, size: int = 32, seed: int = 0):
        images, targets = tinted_images(size, seed)
        train_idx, test_idx = _split_indices(targets, 0.25, 0)
        mean, std = channel_stats(images[train_idx])
        rows = train_idx if train else test_idx
        super().__init__(images[rows], targets[rows], mean, std, [str(c) for c in range(NUM_CLASSES)])
