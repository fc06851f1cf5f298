"""Built-in datasets: digits (embedded), CIFAR-10/100 from a local folder, image folders.

A plugin like any other: it only implements ``reuse_register_datasets``.
"""
from __future__ import annotations

from reuse_core.data.cifar import cifar10, cifar100
from reuse_core.data.digits import digits
from reuse_core.data.imagefolder import imagefolder
from reuse_core.hookspecs import hookimpl


@hookimpl
def reuse_register_datasets(registry):
    registry.add("digits", digits, description="handwritten digits shipped inside scikit-learn: 1,797 real 8x8 "
                 "grayscale images, 10 classes; no download (the default)", in_channels=1, input_size=[8, 8],
                 num_classes=10, source="embedded")
    registry.add("cifar10", cifar10, description="CIFAR-10 from a local folder in the official layout (binary or "
                 "python version); root, $REUSE_CORE_CIFAR10 or $REUSE_CORE_DATA", in_channels=3, input_size=[32, 32],
                 num_classes=10, source="local folder")
    registry.add("cifar100", cifar100, description="CIFAR-100 from a local folder in the official layout (binary or "
                 "python version); root, $REUSE_CORE_CIFAR100 or $REUSE_CORE_DATA; option label_mode=fine|coarse",
                 in_channels=3, input_size=[32, 32], num_classes=100, source="local folder")
    registry.add("imagefolder", imagefolder, description="images in class folders (torchvision ImageFolder): "
                 "root/<class>/* or root/{train,val,test}/<class>/*; options image_size, grayscale",
                 in_channels=None, input_size=None, num_classes=None, source="local folder")
