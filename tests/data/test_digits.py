"""The embedded `digits` dataset: deterministic stratified splits by seed, class subsets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from reuse_core import data, plugins


def all_splits(**kw):
    return {s: data.load("digits", split=s, **kw) for s in ("train", "val", "test")}


def pixels(ds) -> set[bytes]:
    return {ds[i][0].numpy().tobytes() + bytes([ds.targets[i]]) for i in range(len(ds))}


def test_splits_are_stratified_disjoint_and_complete():
    splits = all_splits(seed=0)
    assert [len(d) for d in splits.values()] == [1078, 360, 359]
    for ds in splits.values():
        assert ds.classes == [str(i) for i in range(10)] and ds.in_channels == 1 and ds.input_size == (8, 8)
        counts = np.bincount(ds.targets, minlength=10) / len(ds)
        assert np.all(np.abs(counts - 0.1) < 0.02)  # every class in its share
    x, y = splits["train"][0]
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8) and isinstance(y, int)
    stacked = torch.stack([splits["train"][i][0] for i in range(len(splits["train"]))])
    assert stacked.min() == 0 and stacked.max() == 1
    seen = [pixels(d) for d in splits.values()]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_splits_are_deterministic_by_seed():
    assert all_splits(seed=3)["val"].targets == all_splits(seed=3)["val"].targets
    a, b = data.load("digits", split="val", seed=3), data.load("digits", split="val", seed=4)
    assert pixels(a) != pixels(b)


def test_class_subsets_remap_labels_in_the_order_given():
    full = data.load("digits", split="test", seed=1)
    sub = data.load("digits", split="test", seed=1, classes=[7, 2])
    assert sub.classes == ["7", "2"] and set(sub.targets) == {0, 1}
    assert len(sub) == sum(1 for t in full.targets if t in (7, 2))
    # split first, then subset: a class's images are the same in every subset
    by_label = {7: 0, 2: 1}
    assert {p[:-1] + bytes([by_label[p[-1]]]) for p in pixels(full) if p[-1] in (7, 2)} == pixels(sub)


@pytest.mark.parametrize("kw, message", [
    ({"split": "validation"}, "split must be one of train, val, test, got 'validation'"),
    ({"classes": [3, 3]}, r"classes must be distinct and at least one, got \[3, 3\]"),
    ({"classes": [10]}, r"the dataset has classes 0-9; there is no class 10$"),
])
def test_bad_arguments(kw, message):
    with pytest.raises(ValueError, match=message):
        data.load("digits", **kw)


def test_registered_with_its_shape():
    entry = plugins.datasets().entry("digits")
    assert entry.plugin == "reuse_core.builtin.datasets"
    assert entry.meta["in_channels"] == 1 and entry.meta["input_size"] == [8, 8] and entry.meta["num_classes"] == 10
