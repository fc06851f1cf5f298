"""``imagefolder``: images in class folders, read through torchvision's ImageFolder.

``root/train/<class>/*.png``, ``root/val/...``, ``root/test/...`` when the split folders exist;
otherwise ``root/<class>/*`` is divided 60/20/20 within every class by ``seed``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from reuse_core.data.base import SPLITS, check_split, select_classes, stratified_split


class FolderDataset(Dataset):
    """A view of an ImageFolder: some of its indices, labels remapped to a class subset.
    ``indices`` (the dataset contract's): the images' positions in the folder when the splits are
    drawn from one folder; None with split folders, whose images no other split can hold."""

    def __init__(self, base, indices: np.ndarray, targets: np.ndarray, classes: list[str], in_channels: int,
                 input_size: tuple[int, int], *, drawn: bool = True):
        self._base, self._indices = base, [int(i) for i in indices]
        self.indices = list(self._indices) if drawn else None
        self.targets = [int(t) for t in targets]
        self.classes, self.in_channels, self.input_size = classes, in_channels, input_size

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self._base[self._indices[i]][0], self.targets[i]


def imagefolder(*, split: str = "train", seed: int = 0, classes: Sequence[int] | None = None, root: str | None = None,
                image_size: int | None = None, grayscale: bool = False) -> FolderDataset:
    """Images as float32 in [0, 1]; ``image_size`` resizes to a square (needed when the images'
    sizes differ), ``grayscale`` gives one channel. Class labels follow the sorted folder names."""
    from torchvision import datasets, transforms

    check_split(split)
    if root is None:
        raise ValueError("imagefolder needs root=<folder> (the run option data_root): <folder>/<class>/<image> or "
                         "<folder>/{train,val,test}/<class>/<image>")
    base_dir = Path(root)
    if not base_dir.is_dir():
        raise FileNotFoundError(f"imagefolder: {base_dir} is not a folder")
    steps = [transforms.Grayscale(1)] if grayscale else []
    if image_size:
        steps.append(transforms.Resize((image_size, image_size)))
    transform = transforms.Compose([*steps, transforms.ToTensor()])
    has_splits = (base_dir / "train").is_dir()
    base = datasets.ImageFolder(str(base_dir / split if has_splits else base_dir), transform=transform)
    labels = np.asarray(base.targets)
    part = np.arange(len(labels)) if has_splits else stratified_split(labels, seed, (0.6, 0.2, 0.2))[SPLITS.index(split)]
    kept, remapped, names = select_classes(labels[part], base.classes, classes)
    first = base[0][0]
    return FolderDataset(base, part[kept], remapped, names, first.shape[0], (first.shape[1], first.shape[2]),
                         drawn=not has_splits)
