"""Random augmentation of image batches from ``torchvision.transforms.v2``, each example of a batch
with its own random parameters.

A v2 transform called on a batch tensor draws one set of parameters for the whole batch: every
example is shifted, rotated or cropped the same way, and two contrastive views of a batch would
differ by one draw only. :class:`PerExample` calls a v2 transform on each example of the batch.
:class:`BatchAffine` is ``v2.RandomAffine`` for batches: each example draws its own angle,
translation, scale and shear from ``RandomAffine``'s distributions, and the batch is warped in one
``grid_sample``, the same warp as ``v2.functional.affine`` (a test checks). It exists because calling
RandomAffine once per 8x8 image costs more than a small CNN's training step on it.

:func:`pipeline` gives the built-in pipelines by strength (``none``, ``light``, ``strong``), suited to
the images: for one-channel images (digits, characters: a flip changes what they show) small shifts,
rotations and scales, plus shear and noise when strong; for colour images random crops and
horizontal flips, plus scale-varying crops, colour jitter and greying when strong.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

STRENGTHS = ("none", "light", "strong")

Augment = Callable[[torch.Tensor], torch.Tensor]


class PerExample(torch.nn.Module):
    """``transform`` applied to each example of a batch (N, C, H, W) on its own, so each draws its
    own random parameters."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.transform = transform

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.transform(x) for x in batch])


class BatchAffine(v2.RandomAffine):
    """``v2.RandomAffine`` (same arguments, bilinear) with parameters drawn per example of a batch
    (N, C, H, W): the angle, scale and shears uniform in their ranges, the translation uniform in
    ``translate`` times the image size and rounded to whole pixels, as ``RandomAffine`` draws them.
    Pixels from outside the image are 0. The draws come from torch's CPU generator, so a seeded
    (and a resumed) run repeats them on any device."""

    def __init__(self, degrees, translate=None, scale=None, shear=None):
        super().__init__(degrees, translate=translate, scale=scale, shear=shear,
                         interpolation=v2.InterpolationMode.BILINEAR)

    def draw(self, n: int, height: int, width: int) -> dict[str, torch.Tensor]:
        """``n`` examples' parameters: angle and shear in degrees, translation in pixels."""
        def uniform(lo: float, hi: float) -> torch.Tensor:
            return torch.empty(n, dtype=torch.float64).uniform_(lo, hi)

        zeros = torch.zeros(n, dtype=torch.float64)
        angle = uniform(*self.degrees)
        if self.translate is not None:
            dx, dy = self.translate[0] * width, self.translate[1] * height
            tx, ty = uniform(-dx, dx).round(), uniform(-dy, dy).round()
        else:
            tx, ty = zeros, zeros
        scale = uniform(*self.scale) if self.scale is not None else zeros + 1
        shear_x = uniform(self.shear[0], self.shear[1]) if self.shear is not None else zeros
        shear_y = uniform(self.shear[2], self.shear[3]) if self.shear is not None and len(self.shear) == 4 else zeros
        return {"angle": angle, "tx": tx, "ty": ty, "scale": scale, "shear_x": shear_x, "shear_y": shear_y}

    @staticmethod
    def warp(batch: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """``batch`` warped by each example's parameters ``p`` (as :meth:`draw` gives them)."""
        n, _, h, w = batch.shape
        # v2.functional.affine's inverse matrix (about the image centre), in pixels, one per example
        rot, sx, sy = (torch.deg2rad(p[k]) for k in ("angle", "shear_x", "shear_y"))
        a = torch.cos(rot - sy) / torch.cos(sy)
        b = -(a * torch.tan(sx) + torch.sin(rot))
        c = torch.sin(rot - sy) / torch.cos(sy)
        d = torch.cos(rot) - c * torch.tan(sx)
        s = p["scale"]
        m = torch.stack([d / s, -b / s, -c / s, a / s], dim=1).view(n, 2, 2)
        shift = -(m @ torch.stack([p["tx"], p["ty"]], dim=1).unsqueeze(-1)).squeeze(-1)
        # grid_sample's coordinates run from -1 to 1 across the image: rescale the pixel matrix
        theta = torch.empty(n, 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 1] = m[:, 0, 0], m[:, 0, 1] * h / w
        theta[:, 1, 0], theta[:, 1, 1] = m[:, 1, 0] * w / h, m[:, 1, 1]
        theta[:, 0, 2], theta[:, 1, 2] = shift[:, 0] * 2 / w, shift[:, 1] * 2 / h
        dtype = batch.dtype if batch.is_floating_point() else torch.float32
        grid = F.affine_grid(theta.to(device=batch.device, dtype=dtype), [n, 1, h, w], align_corners=False)
        return F.grid_sample(batch.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dim() != 4:
            raise ValueError(f"BatchAffine takes a batch of images (N, C, H, W), got shape {tuple(batch.shape)}")
        return self.warp(batch, self.draw(len(batch), *batch.shape[-2:]))


def pipeline(strength: str, *, channels: int, size: tuple[int, int]) -> Augment | None:
    """The built-in augmentation of ``strength`` for batches of ``channels``-channel images of
    ``size`` (height, width) with values in [0, 1]; None for ``"none"``."""
    if strength not in STRENGTHS:
        raise ValueError(f"augmentation strength must be one of {', '.join(STRENGTHS)}, got {strength!r}")
    if strength == "none":
        return None
    if channels == 1:
        if strength == "light":
            return BatchAffine(degrees=10, translate=(0.125, 0.125), scale=(0.9, 1.1))
        return v2.Compose([BatchAffine(degrees=15, translate=(0.125, 0.125), scale=(0.85, 1.15), shear=10),
                           v2.GaussianNoise(sigma=0.1)])  # noise is drawn per pixel: per example already
    h, w = size
    if strength == "light":
        pad = max(1, math.ceil(min(h, w) / 8))
        return PerExample(v2.Compose([v2.RandomCrop((h, w), padding=pad, padding_mode="reflect"),
                                      v2.RandomHorizontalFlip()]))
    return PerExample(v2.Compose([
        v2.RandomResizedCrop((h, w), scale=(0.2, 1.0), antialias=True), v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2),
    ]))
