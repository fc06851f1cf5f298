"""Built-in datasets: digits (embedded), CIFAR-10/100 from a local folder, image folders.

A plugin like any other: it only implements ``reuse_register_datasets``.
"""
from __future__ import annotations

from reuse_core.data.digits import digits
from reuse_core.hookspecs import hookimpl


@hookimpl
def reuse_register_datasets(registry):
    registry.add("digits", digits, description="handwritten digits shipped inside scikit-learn: 1,797 real 8x8 "
                 "grayscale images, 10 classes; no download (the default)", in_channels=1, input_size=[8, 8],
                 num_classes=10, source="embedded")
