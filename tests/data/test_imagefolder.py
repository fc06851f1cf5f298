"""`imagefolder` through torchvision's ImageFolder: class folders, with or without split folders."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from reuse_core import data


def write_images(folder, classes=("cat", "dog", "owl"), per_class=5, size=(12, 10)):
    rng = np.random.default_rng(0)
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / c / f"{i}.png")


def test_class_folders_are_split_by_seed(tmp_path):
    write_images(tmp_path)
    parts = {s: data.load("imagefolder", split=s, seed=2, root=str(tmp_path)) for s in ("train", "val", "test")}
    assert [len(p) for p in parts.values()] == [9, 3, 3]
    for p in parts.values():
        assert p.classes == ["cat", "dog", "owl"] and sorted(set(p.targets)) == [0, 1, 2]
        assert p.in_channels == 3 and p.input_size == (10, 12)
    x, y = parts["val"][0]
    assert x.shape == (3, 10, 12) and 0 <= x.min() and x.max() <= 1 and y == parts["val"].targets[0]


def test_split_folders_resize_grayscale_and_subsets(tmp_path):
    write_images(tmp_path / "train")
    write_images(tmp_path / "test", per_class=2)
    test = data.load("imagefolder", split="test", root=str(tmp_path), image_size=8, grayscale=True, classes=[2, 0])
    assert len(test) == 4 and test.classes == ["owl", "cat"] and test.in_channels == 1 and test.input_size == (8, 8)
    assert test[0][0].shape == (1, 8, 8) and sorted(test.targets) == [0, 0, 1, 1]


def test_root_is_required(tmp_path):
    with pytest.raises(ValueError, match=r"imagefolder needs root=<folder> \(the run option data_root\)"):
        data.load("imagefolder")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        data.load("imagefolder", root=str(tmp_path / "nope"))
