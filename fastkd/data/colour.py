"""sRGB ↔ CIELab (D65, 2° observer) as pure torch functions: the colour split of cross-modal transfer.

Forward, per pixel, for sRGB values c ∈ [0, 1] (IEC 61966-2-1 and CIE 15):

1. linearise: ``c_lin = c / 12.92`` if ``c ≤ 0.04045`` else ``((c + 0.055) / 1.055) ** 2.4``;
2. to XYZ: ``[X, Y, Z] = M · [r_lin, g_lin, b_lin]`` with the sRGB/D65 matrix :data:`RGB_TO_XYZ`;
3. relative to the white: ``t = (X / Xn, Y / Yn, Z / Zn)``, ``(Xn, Yn, Zn) = (0.95047, 1, 1.08883)``;
4. ``f(t) = t ** (1/3)`` if ``t > δ³`` else ``t / (3δ²) + 4/29``, ``δ = 6/29``;
5. ``L = 116 f(Y) − 16``, ``a = 500 (f(X) − f(Y))``, ``b = 200 (f(Y) − f(Z))``.

L ∈ [0, 100] is the luminance; a (green → red) and b (blue → yellow) the chrominance, within about
[−86.2, 98.2] and [−107.9, 94.5] for sRGB colours. :func:`lab_to_rgb` inverts each step
(``f⁻¹(u) = u³`` if ``u > δ`` else ``3δ²(u − 4/29)``; ``c = 12.92 c_lin`` if ``c_lin ≤ 0.0031308`` else
``1.055 c_lin ** (1/2.4) − 0.055``), so ``lab_to_rgb(rgb_to_lab(x)) == x`` up to rounding. These are the
formulas of scikit-image's ``rgb2lab`` (which CMC and the CRD paper's cross-modal experiment used), computed
in float32 or float64 as the input comes; the channel dimension is ``dim`` (−3: ``[..., 3, H, W]``).
"""
from __future__ import annotations

import torch

RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375),
              (0.2126729, 0.7151522, 0.0721750),
              (0.0193339, 0.1191920, 0.9503041))
"""Linear sRGB → CIE XYZ for the D65 white (Lindbloom's sRGB matrix)."""

WHITE_D65 = (0.95047, 1.0, 1.08883)
"""The D65 reference white in XYZ (Y = 1)."""

_DELTA = 6.0 / 29.0


def _check(x: torch.Tensor, dim: int, name: str) -> int:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or not -x.dim() <= dim < x.dim() or x.shape[dim] != 3:
        raise ValueError(f"{name} must have 3 channels along dim={dim}, got shape {tuple(x.shape)}")
    return dim % x.dim()


def _mix(x: torch.Tensor, matrix: torch.Tensor, dim: int) -> torch.Tensor:
    """Σ_j matrix[i, j] · x[..., j, ...] along ``dim``."""
    moved = x.movedim(dim, -1)
    return (moved @ matrix.to(x.dtype).T).movedim(-1, dim)


def _shape(values, x: torch.Tensor, dim: int) -> torch.Tensor:
    view = [1] * x.dim()
    view[dim] = 3
    return torch.tensor(values, dtype=x.dtype, device=x.device).view(view)


def rgb_to_lab(rgb: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """CIELab (D65) of sRGB values in [0, 1] (clamped there first); see the module doc for the formulas."""
    dim = _check(rgb, dim, "rgb")
    c = rgb.clamp(0.0, 1.0)
    linear = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    t = _mix(linear, torch.tensor(RGB_TO_XYZ, dtype=torch.float64, device=rgb.device), dim) / _shape(WHITE_D65, rgb, dim)
    cube = _DELTA ** 3
    f = torch.where(t > cube, t.clamp_min(cube) ** (1.0 / 3.0), t / (3 * _DELTA ** 2) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(dim)
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim)


def lab_to_rgb(lab: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """sRGB values of CIELab (D65) colours: the inverse of :func:`rgb_to_lab` (not clamped: colours outside
    the sRGB gamut come back outside [0, 1])."""
    dim = _check(lab, dim, "lab")
    big_l, a, b = lab.unbind(dim)
    fy = (big_l + 16.0) / 116.0
    f = torch.stack((fy + a / 500.0, fy, fy - b / 200.0), dim)
    t = torch.where(f > _DELTA, f ** 3, 3 * _DELTA ** 2 * (f - 4.0 / 29.0))
    xyz = t * _shape(WHITE_D65, lab, dim)
    inverse = torch.linalg.inv(torch.tensor(RGB_TO_XYZ, dtype=torch.float64, device=lab.device))
    linear = _mix(xyz, inverse, dim)
    return torch.where(linear <= 0.0031308, 12.92 * linear,
                       1.055 * linear.clamp_min(0.0031308) ** (1.0 / 2.4) - 0.055)
