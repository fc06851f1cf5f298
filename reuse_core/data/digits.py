"""``digits``: the embedded default, scikit-learn's handwritten digits (1,797 real 8x8 images)."""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from reuse_core.data.base import SPLITS, ArrayDataset, array_dataset, check_split, stratified_split

FRACTIONS = (0.6, 0.2, 0.2)  # train / val / test, within every class


@functools.cache
def _arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32)[:, None], d.target.astype(np.int64)


def digits(*, split: str = "train", seed: int = 0, classes: Sequence[int] | None = None, root: str | None = None) -> ArrayDataset:
    """1x8x8 images with values in [0, 1], labels 0-9; a stratified 60/20/20 split by ``seed``
    (split first, then the class subset, so a class's test images are the same in every subset).
    ``root`` is ignored: the data ships inside scikit-learn."""
    check_split(split)
    images, labels = _arrays()
    part = stratified_split(labels, seed, FRACTIONS)[SPLITS.index(split)]
    return array_dataset(images, labels, [str(i) for i in range(10)], part=part, classes=classes, divisor=16)
