"""Dataset providers and the dataset contract.

A provider is ``provider(*, split="train", seed=0, classes=None, root=None, **options) ->
torch.utils.data.Dataset``; ``split`` is "train", "val" or "test". The dataset yields
``(x, y)`` with ``x`` a float32 tensor (C, H, W) and ``y`` an int, and has the attributes
``classes: list[str]`` (label i is classes[i]; with a class subset the labels are remapped to
0..n-1 in the order given), ``in_channels: int``, ``input_size: tuple[int, int]`` and
``targets: list[int]``. Optionally ``indices: list[int] | None``: each example's position in the
provider's whole image set, the same for every seed and split, so two splits share an image exactly
when they share an index; the store records a model's training images by them, and ``finetune`` and
``distill`` refuse a model that has seen their test images. Leave it out (or None) where no split
of any seed can hold another's images (fixed split folders).

Providers are registered by plugins (``reuse_register_datasets``); :func:`load` builds one by name.
"""
from __future__ import annotations

from typing import Any

from reuse_core.hookspecs import DatasetProvider

__all__ = ["DatasetProvider", "load"]


def load(name: str, **kwargs: Any):
    """The registered dataset ``name``, e.g. ``load("digits", split="val", seed=1, classes=[0, 1])``."""
    from reuse_core import plugins

    return plugins.datasets().get(name)(**kwargs)
