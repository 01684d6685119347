"""Paired views of one batch: each network of a cross-modal run sees its own channels of the same crop.

The CRD paper's cross-modal transfer (Tian, Krishnan, Isola, ICLR 2020; README "Cross-modal transfer") trains a
teacher on one modality and distils a student that sees another modality of the same samples: luminance
(CIELab L) for the teacher, chrominance (ab) for the student. fastkd makes the views *after* the batch's
augmentation: the loader crops and flips the stored uint8 images once (:func:`~fastkd.data.device.crop_flip`)
and :class:`ViewSplit` turns that one augmented batch into the views, stacked along the channels — so the
views of a sample share the crop and the flip by construction, pixel for pixel.

Views (``order`` names them, the stacked batch holds them in that order):

| view | channels | from the augmented batch ``x`` (pixel values / ``pixel_max``, in [0, 1]) |
| --- | --- | --- |
| ``rgb`` | 3 | ``x`` itself (greyscale data repeated to 3) |
| ``L`` | 1 | CIELab L of ``x`` (:func:`~fastkd.data.colour.rgb_to_lab`) |
| ``ab`` | 2 | CIELab a, b of ``x`` |
| ``Lab`` | 3 | all of CIELab |
| any name in ``custom`` | len(list) | the stored channels ``custom[name]`` (e.g. ``{"colour": [0, 1, 2], "depth": [3]}`` for RGB + depth stored as 4 channels) |

The built-in views read the stored image's first ``colour`` channels (1 or 3; all of them by default): with a
partner tree stacked after the images (``data.pair_root``, :mod:`fastkd.data.folder`) ``rgb`` / ``L`` / ``ab``
are those of the ``data.root`` images and a user view names the partners' channels (``{"depth": [3]}``).

Each view's channels are normalised by their own mean and standard deviation over the training images
(un-augmented), :meth:`ViewSplit.fit`: ``(v − mean_v) / std_v`` per channel, as every fastkd dataset is
normalised by its training split's statistics.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from fastkd.data.colour import rgb_to_lab

COLOUR_VIEWS: dict[str, int] = {"rgb": 3, "L": 1, "ab": 2, "Lab": 3}
"""The built-in views and their channel counts."""


class ViewSplit:
    """uint8 augmented images ``[B, H, W, C]`` → float32 ``[B, Σ channels, H, W]``: the views of ``order``
    stacked, each normalised by its own statistics (see the module doc).

    Args:
        order: the views, by name (:data:`COLOUR_VIEWS` or a key of ``custom``), in the order they are stacked.
        pixel_max: the stored images' white (255 for 8-bit images, 16 for the digits).
        custom: user views, ``{name: [stored channel indices]}`` (the hook for paired modalities stored as
            extra channels of one image).
        colour: how many leading stored channels (1 or 3) the built-in views read; ``None``: all of them.
    """

    def __init__(self, order: Sequence[str], pixel_max: float = 255.0,
                 custom: Mapping[str, Sequence[int]] | None = None, colour: int | None = None):
        custom = {str(k): [int(c) for c in v] for k, v in (custom or {}).items()}
        clash = sorted(set(custom) & set(COLOUR_VIEWS))
        if clash:
            raise ValueError(f"data.views names {clash} are built-in views ({', '.join(COLOUR_VIEWS)}; with "
                             "data.pair_root they read the data.root images): rename them, or leave them out and use "
                             "the built-in")
        for name, channels in custom.items():
            if not channels or min(channels) < 0:
                raise ValueError(f"data.views.{name} must list stored channel indices (>= 0), got {channels}")
        known = {**COLOUR_VIEWS, **{k: len(v) for k, v in custom.items()}}
        if not order:
            raise ValueError("order must name at least one view")
        for name in order:
            if name not in known:
                raise ValueError(f"unknown view {name!r}: valid views are {', '.join(known)} (data.views adds others)")
        if len(set(order)) != len(order):
            raise ValueError(f"order names a view twice: {list(order)}")
        if not pixel_max > 0:
            raise ValueError(f"pixel_max must be > 0, got {pixel_max!r}")
        if colour not in (None, 1, 3):
            raise ValueError(f"colour must be 1, 3 or None, got {colour!r}")
        self.order, self.pixel_max, self.custom, self.colour = tuple(order), float(pixel_max), custom, colour
        self.slices: dict[str, slice] = {}
        start = 0
        for name in self.order:
            self.slices[name] = slice(start, start + known[name])
            start += known[name]
        self.channels = start
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    def raw(self, images: torch.Tensor) -> torch.Tensor:
        """The stacked views of uint8 ``[B, H, W, C]`` images, not normalised (L in 0-100, a/b in about ±100)."""
        if images.dim() != 4:
            raise ValueError(f"images must be [B, H, W, C], got shape {tuple(images.shape)}")
        stored = images.shape[-1]
        x = images.permute(0, 3, 1, 2).float() / self.pixel_max
        lab = None
        parts = []
        for name in self.order:
            if name in self.custom:
                if max(self.custom[name]) >= stored:
                    raise ValueError(f"data.views.{name} reads channels {self.custom[name]} but the images have "
                                     f"{stored} (data.pair_root stacks a partner tree's channels after them)")
                parts.append(x[:, self.custom[name]])
                continue
            colour = self.colour or stored
            if colour not in (1, 3) or colour > stored:
                raise ValueError(f"view {name!r} reads RGB (or grey) images, these have {stored} channels: "
                                 "name their channels with data.views")
            rgb = x[:, :3] if colour == 3 else x[:, :1].expand(-1, 3, -1, -1)
            if name == "rgb":
                parts.append(rgb)
                continue
            if lab is None:
                lab = rgb_to_lab(rgb)
            parts.append({"L": lab[:, :1], "ab": lab[:, 1:], "Lab": lab}[name])
        return torch.cat(parts, dim=1)

    def fit(self, images, chunk: int = 4096) -> "ViewSplit":
        """Each channel's mean and (population) standard deviation over uint8 ``[N, H, W, C]`` ``images``
        (the training split), accumulated in float64; ``ValueError`` for a constant channel (std under 0.01
        in the view's units: the ab of greyscale images, zero up to float rounding, carries nothing)."""
        images = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
        total = torch.zeros(self.channels, dtype=torch.float64)
        squares = torch.zeros(self.channels, dtype=torch.float64)
        count = 0
        for start in range(0, images.shape[0], chunk):
            v = self.raw(images[start:start + chunk].cpu()).double()
            total += v.sum((0, 2, 3))
            squares += (v * v).sum((0, 2, 3))
            count += v.shape[0] * v.shape[2] * v.shape[3]
        mean = total / max(count, 1)
        std = (squares / max(count, 1) - mean * mean).clamp_min(0).sqrt()
        flat = [name for name in self.order if bool((std[self.slices[name]] < 1e-2).any())]
        if flat:
            raise ValueError(f"view {flat[0]!r} is constant over these images (greyscale data has no chrominance): "
                             "use colour images (data.name=tinted_digits, cifar10, an image tree) for it")
        self.mean, self.std = mean.float(), std.float()
        return self

    def to(self, device: str | torch.device) -> "ViewSplit":
        if self.mean is not None:
            self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The normalised stacked views (``fit`` first)."""
        if self.mean is None:
            raise RuntimeError("ViewSplit.fit(training images) sets the normalisation before views are made")
        v = self.raw(images)
        return v.sub_(self.mean.to(v.device)[:, None, None]).div_(self.std.to(v.device)[:, None, None])
