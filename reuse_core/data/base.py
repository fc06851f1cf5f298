"""What the providers share: deterministic stratified splits, class subsets, array-backed datasets."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def stratified_split(labels: np.ndarray, seed: int, fractions: Sequence[float]) -> list[np.ndarray]:
    """Indices of each part (sorted), taking ``fractions`` of every class: the same for the same
    labels and seed on any machine (numpy's PCG64 generator)."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    bounds = np.cumsum(fractions)[:-1]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for part, chunk in zip(parts, np.split(idx, np.round(bounds * len(idx)).astype(int))):
            part.append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


class ClassesError(ValueError):
    """A class subset that the dataset does not have (out of range, repeated, or empty)."""


def select_classes(labels: np.ndarray, names: Sequence[str], classes: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(kept indices, their remapped labels, the kept class names) for a class subset given as
    original labels; labels become 0..n-1 in the order ``classes`` lists them."""
    if classes is None:
        return np.arange(len(labels)), np.asarray(labels), list(names)
    classes = [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < len(names)]
    if bad:
        shown = ", ".join(map(str, bad[:8])) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise ClassesError(f"the dataset has classes 0-{len(names) - 1}; there is no class {shown}")
    if len(set(classes)) != len(classes) or not classes:
        raise ClassesError(f"classes must be distinct and at least one, got {classes}")
    remap = np.full(len(names), -1)
    remap[classes] = np.arange(len(classes))
    kept = np.flatnonzero(remap[labels] >= 0)
    return kept, remap[labels[kept]], [names[c] for c in classes]


class ArrayDataset(Dataset):
    """Images held in one array (N, C, H, W); ``x`` is ``images[i] / divisor`` as float32 (uint8
    storage keeps CIFAR at a quarter of the memory). ``indices``: each image's position in the
    provider's whole image set (the dataset contract's optional attribute), or None."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], divisor: float = 1.0,
                 indices: Sequence[int] | None = None):
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"images must be (N, C, H, W) with one label each, got {images.shape} and {len(labels)} labels")
        if indices is not None and len(indices) != len(labels):
            raise ValueError(f"indices must give one position per image, got {len(indices)} for {len(labels)} images")
        self._images = torch.from_numpy(np.ascontiguousarray(images))
        self._divisor = divisor
        self.indices = None if indices is None else [int(i) for i in indices]
        self.targets = [int(y) for y in labels]
        self.classes = classes
        self.in_channels = images.shape[1]
        self.input_size = (images.shape[2], images.shape[3])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self._images[i].to(torch.float32) / self._divisor, self.targets[i]


def array_dataset(images: np.ndarray, labels: np.ndarray, names: Sequence[str], *, part: np.ndarray,
                  classes: Sequence[int] | None, divisor: float, offset: int = 0) -> ArrayDataset:
    """The dataset of the indices ``part`` of (images, labels), restricted to ``classes``; its
    ``indices`` are those of ``part`` plus ``offset`` (where these images start in the whole set)."""
    kept, remapped, kept_names = select_classes(labels[part], names, classes)
    return ArrayDataset(images[part[kept]], remapped, kept_names, divisor, indices=part[kept] + offset)
