"""Built-in backbones: seed-cnn, mlp, small-cnn and every torchvision classification model.

A plugin like any other: it only implements ``reuse_register_backbones``. Every model meets the
backbone contract (:mod:`reuse_core.backbone`): built for any ``num_classes`` and ``in_channels``,
with ``head_name`` and ``block_names`` set. torchvision models are built with ``weights=None``
(nothing is downloaded); those that need a minimum (or a fixed) input size say so in their registry
entry and refuse smaller inputs with a clear error. The torchvision models are listed from a table
(:mod:`reuse_core.builtin.torchvision_models`): registering and listing them never imports
torchvision, building one does.
"""
from __future__ import annotations

import functools

from torch import nn

from reuse_core.backbone import BackboneError, InputSizeCheck
from reuse_core.builtin.torchvision_models import MODELS as TORCHVISION_MODELS
from reuse_core.hookspecs import hookimpl


class SeedCNN(nn.Module):
    """The reference CNN: conv 3->64 and 64->128 (3x3, padding 1), each ReLU + 2x2 max pool,
    fc 128*(s/4)^2 -> 1024, ReLU, fc -> classes; s = input_size (32 for CIFAR)."""

    def __init__(self, num_classes: int, in_channels: int = 3, input_size: int = 32):
        super().__init__()
        if input_size < 4 or input_size % 4:
            raise BackboneError(f"seed-cnn needs input_size to be a multiple of 4 (two 2x2 poolings), got {input_size}")
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 128, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(128 * (input_size // 4) ** 2, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.head_name = "fc2"
        self.block_names = ("conv1", "conv2", "fc1")
        self.register_forward_pre_hook(InputSizeCheck(
            "seed-cnn", input_size, exact=True, hint="; build it with input_size=<H> for HxH images (a multiple of 4)",
        ))

    def forward(self, x):
        x = self.pool(self.conv1(x).relu())
        x = self.pool(self.conv2(x).relu())
        return self.fc2(self.fc1(x.flatten(1)).relu())


class MLP(nn.Module):
    """Flattens its input (in_channels x input_size x input_size values; for flat vectors of F
    features use in_channels=F, input_size=1) and applies Linear+ReLU blocks, then the head."""

    def __init__(self, num_classes: int, in_channels: int = 3, input_size: int = 8, hidden: tuple[int, ...] = (256, 128)):
        super().__init__()
        if not hidden:
            raise BackboneError("mlp needs at least one hidden layer (hidden=(256, 128) by default)")
        self.in_features = in_channels * input_size * input_size
        widths = (self.in_features, *hidden)
        self.layers = nn.Sequential(*(nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(widths, widths[1:])))
        self.head = nn.Linear(widths[-1], num_classes)
        self.head_name = "head"
        self.block_names = tuple(f"layers.{i}" for i in range(len(hidden)))

    def forward(self, x):
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise BackboneError(
                f"mlp was built for {self.in_features} input values per sample (in_channels x input_size^2), got {x.shape[1]}"
            )
        return self.head(self.layers(x))


class SmallCNN(nn.Module):
    """A small CNN for tiny images (8x8 digits and up): two 3x3 convs, a 2x2 pool, an adaptive
    pool to 4x4, fc 64*16 -> 128, head."""

    def __init__(self, num_classes: int, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Sequential(nn.Linear(64 * 16, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)
        self.head_name = "head"
        self.block_names = ("conv1", "conv2", "fc")

    def forward(self, x):
        return self.head(self.fc(self.pool(self.conv2(self.conv1(x))).flatten(1)))


# ---- torchvision -------------------------------------------------------------------------------

# Smallest square input (height = width) each torchvision family accepts, measured with a forward
# pass of each family's models (the largest minimum within a family); families not listed take
# any size (their pooling is adaptive and their strides pad).
MIN_INPUT_SIZE: dict[str, int] = {
    "alexnet": 63, "convnext": 32, "densenet": 29, "googlenet": 15, "inception": 75, "squeezenet": 21,
    "swin_transformer": 4, "vgg": 32,
}
# Families whose models are built for one input size (config image_size, default 224).
FIXED_INPUT_SIZE: dict[str, str] = {"vision_transformer": "image_size", "maxvit": "input_size"}


def _find_head(model: nn.Module, num_classes: int) -> str:
    # The head is the last Linear (a 1x1 Conv2d for SqueezeNet) producing num_classes outputs.
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    conv = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.out_channels == num_classes]
    if not (linear or conv):
        raise BackboneError(f"no classification head with {num_classes} outputs found in {type(model).__name__}")
    return (linear or conv)[-1]


def _find_blocks(model: nn.Module, head_name: str, expand: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Modules with parameters, in forward (registration) order, up to the head: top-level
    children, with top-level Sequential/ModuleList containers, the head's container and the
    ``expand`` paths opened one level."""
    blocks: list[str] = []

    def visit(prefix: str, module: nn.Module, top: bool) -> bool:
        for name, child in module.named_children():
            path = prefix + name
            if path == head_name:
                return True
            if next(child.parameters(), None) is None:
                continue
            opens = (head_name.startswith(path + ".") or path in expand or any(e.startswith(path + ".") for e in expand)
                     or (top and isinstance(child, (nn.Sequential, nn.ModuleList))))
            if not opens:
                blocks.append(path)
            elif visit(path + ".", child, False):
                return True
        return False

    visit("", model, True)
    return tuple(blocks)


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=1, bias=conv.bias is not None, padding_mode=conv.padding_mode)
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def build_torchvision(tv_name: str, num_classes: int, in_channels: int = 3, **config) -> nn.Module:
    """torchvision's ``tv_name`` with ``weights=None``, ``num_classes`` outputs and
    ``in_channels`` input channels (the first convolution is replaced when not 3). ``config`` goes
    to the torchvision builder; ViT and MaxViT take ``image_size`` (default 224)."""
    from torchvision import models

    family = TORCHVISION_MODELS[tv_name]
    kwargs = dict(config)
    if family in ("googlenet", "inception"):
        # Auxiliary classifiers make forward return a tuple in training mode: off by default.
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    image_size = kwargs.pop("image_size", 224)
    if family in FIXED_INPUT_SIZE:
        kwargs[FIXED_INPUT_SIZE[family]] = image_size if family == "vision_transformer" else (image_size, image_size)
    model = models.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    model.head_name = _find_head(model, num_classes)
    model.block_names = _find_blocks(model, model.head_name, ("encoder.layers",) if family == "vision_transformer" else ())
    if family in FIXED_INPUT_SIZE:
        model.register_forward_pre_hook(InputSizeCheck(
            tv_name, image_size, exact=True, hint=f"; build it with image_size=<H> for HxH images ({tv_name} has constraints on H)",
        ))
    elif MIN_INPUT_SIZE.get(family, 1) > 1:
        model.register_forward_pre_hook(InputSizeCheck(tv_name, MIN_INPUT_SIZE[family]))
    return model


def torchvision_entries() -> list[tuple[str, str, dict]]:
    """(name, description, meta) for every torchvision classification model, from the table in
    :mod:`reuse_core.builtin.torchvision_models` (torchvision is imported only to build one)."""
    out = []
    for tv_name, family in TORCHVISION_MODELS.items():
        fixed = family in FIXED_INPUT_SIZE
        min_size = 224 if fixed else MIN_INPUT_SIZE.get(family)
        what = f"torchvision {tv_name}, untrained (weights=None)"
        if fixed:
            what += "; inputs exactly image_size x image_size (config image_size, default 224)"
        out.append((tv_name, what, {"family": family, "min_input_size": min_size, "fixed_input_size": fixed}))
    return out


def vit_tiny(num_classes: int, in_channels: int = 3, **config) -> nn.Module:
    """:func:`reuse_core.builtin.attention_backbone.vit_tiny`, imported when first built (it loads
    the fused attention kernels)."""
    from reuse_core.builtin import attention_backbone

    return attention_backbone.vit_tiny(num_classes, in_channels, **config)


@hookimpl
def reuse_register_backbones(registry):
    registry.add("seed-cnn", SeedCNN, description="the reference CNN for 32x32 RGB images (2 convs, 2 fcs); "
                 "config input_size (a multiple of 4, default 32)", family="seed-cnn", min_input_size=32,
                 fixed_input_size=True)
    registry.add("mlp", MLP, description="a multilayer perceptron for flat or tiny inputs; config input_size "
                 "(default 8), hidden (default (256, 128))", family="mlp", min_input_size=None, fixed_input_size=True)
    registry.add("small-cnn", SmallCNN, description="a small CNN for tiny images (8x8 digits and up)",
                 family="small-cnn", min_input_size=2, fixed_input_size=False)
    for name, description, meta in torchvision_entries():
        registry.add(name, functools.partial(build_torchvision, name), description=description, **meta)
    registry.add("vit-tiny", vit_tiny, description="a small vision transformer on the fused attention kernel, any image "
                 "size and channel count; config dim, depth, heads, patch_size or image_size", family="vit",
                 min_input_size=None, fixed_input_size=False)
