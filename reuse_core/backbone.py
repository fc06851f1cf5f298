"""The backbone contract and its helpers.

A backbone factory is ``factory(num_classes: int, in_channels: int = 3, **config) -> nn.Module``.
The module it returns carries two plain instance attributes:

- ``head_name: str``: dotted path of the classification head (an ``nn.Linear``, or a 1x1
  ``nn.Conv2d`` for convolutional heads such as SqueezeNet's), e.g. ``"fc"``, ``"classifier.1"``.
- ``block_names: tuple[str, ...]``: dotted paths of the feature-extractor blocks, in forward order.

With these, fine-tuning can swap the head (:func:`replace_head`), freeze everything else
(:func:`freeze_features`) or unfreeze the last N blocks. :func:`check_backbone` says what is missing.
"""
from __future__ import annotations

import torch
from torch import nn

from reuse_core.hookspecs import BackboneFactory

__all__ = ["BackboneError", "BackboneFactory", "InputAdapter", "InputSizeCheck", "build", "check_backbone", "feature_blocks",
           "freeze_features", "get_head", "head_parameters", "replace_head", "set_head"]


class BackboneError(ValueError):
    """A model breaks the backbone contract, or gets an input it cannot take."""


def _head_name(model: nn.Module) -> str:
    name = getattr(model, "head_name", None)
    if not isinstance(name, str) or not name:
        raise BackboneError(
            f"{type(model).__name__} has no head_name: a backbone must set model.head_name to the dotted "
            f"path of its classification head (e.g. 'fc' or 'classifier.1')"
        )
    return name


def get_head(model: nn.Module) -> nn.Module:
    name = _head_name(model)
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise BackboneError(f"{type(model).__name__}.head_name is {name!r}, but the model has no such submodule") from None


def set_head(model: nn.Module, module: nn.Module) -> None:
    parent_name, _, leaf = _head_name(model).rpartition(".")
    get_head(model)  # the old head must exist: never create a path by accident
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Put a freshly initialised head for ``num_classes`` in place of the old one and return it:
    an ``nn.Linear`` with the old ``in_features`` (a 1x1 ``nn.Conv2d`` with the old
    ``in_channels`` for a convolutional head), on the old head's device and dtype."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    old = get_head(model)
    ref = next(old.parameters())
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    elif isinstance(old, nn.Conv2d):
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size, stride=old.stride,
                        padding=old.padding, bias=old.bias is not None)
    else:
        raise BackboneError(f"the head {model.head_name!r} is a {type(old).__name__}; replace_head needs nn.Linear or nn.Conv2d")
    new.to(device=ref.device, dtype=ref.dtype)
    set_head(model, new)
    return new


def feature_blocks(model: nn.Module) -> list[nn.Module]:
    names = getattr(model, "block_names", None)
    if not isinstance(names, tuple) or not names or not all(isinstance(n, str) for n in names):
        raise BackboneError(
            f"{type(model).__name__} has no block_names: a backbone must set model.block_names to a non-empty "
            f"tuple of the dotted paths of its feature-extractor blocks, in forward order"
        )
    try:
        return [model.get_submodule(n) for n in names]
    except AttributeError as e:
        raise BackboneError(f"{type(model).__name__}.block_names names a missing submodule: {e}") from None


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(get_head(model).parameters())


def freeze_features(model: nn.Module, trainable_last_blocks: int = 0) -> None:
    """Set ``requires_grad=False`` on every parameter except the head's and those of the last
    ``trainable_last_blocks`` feature blocks (parameters outside any block, such as a ViT's class
    token, stay frozen)."""
    blocks = feature_blocks(model)
    if not 0 <= trainable_last_blocks <= len(blocks):
        raise ValueError(f"trainable_last_blocks must be between 0 and {len(blocks)} (the model's blocks), got {trainable_last_blocks}")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in blocks[len(blocks) - trainable_last_blocks:]:
        for p in block.parameters():
            p.requires_grad_(True)
    for p in head_parameters(model):
        p.requires_grad_(True)


def check_backbone(model: object, name: str | None = None) -> None:
    """Raise :class:`BackboneError` saying what is missing if ``model`` breaks the contract."""
    what = f"backbone {name!r}" if name else "the backbone"
    if not isinstance(model, nn.Module):
        raise BackboneError(f"{what} must be a torch.nn.Module, got {type(model).__name__}")
    head = get_head(model)
    if not isinstance(head, (nn.Linear, nn.Conv2d)):
        raise BackboneError(f"{what}: head {model.head_name!r} is a {type(head).__name__}, expected nn.Linear or nn.Conv2d")
    feature_blocks(model)
    for block_name in model.block_names:
        if model.head_name == block_name or model.head_name.startswith(block_name + "."):
            raise BackboneError(f"{what}: block {block_name!r} contains the head {model.head_name!r}; blocks are the features only")


class InputSizeCheck:
    """A forward pre-hook that refuses inputs smaller than a backbone needs, with a clear message
    (instead of a shape error deep inside the model). A class, so the model stays picklable."""

    def __init__(self, backbone: str, min_size: int, exact: bool = False, hint: str = ""):
        self.backbone, self.min_size, self.exact, self.hint = backbone, min_size, exact, hint

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() < 3:
            return
        h, w = x.shape[-2:]
        if self.exact and (h, w) != (self.min_size, self.min_size):
            raise BackboneError(f"backbone {self.backbone!r} was built for {self.min_size}x{self.min_size} inputs, got {h}x{w}{self.hint}")
        if not self.exact and min(h, w) < self.min_size:
            raise BackboneError(
                f"backbone {self.backbone!r} needs inputs of at least {self.min_size}x{self.min_size} pixels, got {h}x{w}; "
                f"resize the images (e.g. torchvision.transforms.Resize({self.min_size})) or pick a backbone for "
                f"small images (`reuse backbones` shows each one's minimum){self.hint}"
            )


class InputAdapter:
    """A forward pre-hook that brings inputs to what a model was built for, as practitioners adapt
    a pretrained model to other images: grey images repeated to ``channels`` (colour ones averaged
    when ``channels`` is 1), then bilinearly resized to ``size`` (height, width). Inputs already in
    that form pass unchanged. Stored as the config key ``input_adapter`` (:func:`build` attaches it)."""

    def __init__(self, channels: int, size: tuple[int, int] | list[int]):
        self.channels, self.size = int(channels), (int(size[0]), int(size[1]))

    def config(self) -> dict:
        return {"channels": self.channels, "size": list(self.size)}

    def __call__(self, module: nn.Module, args: tuple):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            return None
        if x.shape[1] == 1 and self.channels > 1:
            x = x.expand(-1, self.channels, -1, -1)
        elif x.shape[1] > 1 and self.channels == 1:
            x = x.mean(dim=1, keepdim=True)
        if tuple(x.shape[-2:]) != self.size:
            x = torch.nn.functional.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return (x, *args[1:])


def build(name: str, num_classes: int, in_channels: int = 3, *, input_adapter: dict | None = None,
          **config) -> nn.Module:
    """Build the registered backbone ``name`` (untrained) and check it meets the contract.
    ``input_adapter`` (``{"channels", "size"}``) attaches an :class:`InputAdapter` first in line."""
    from reuse_core import plugins

    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    factory = plugins.backbones().get(name)
    model = factory(num_classes, in_channels, **config)
    check_backbone(model, name)
    if input_adapter is not None:
        model.register_forward_pre_hook(InputAdapter(**input_adapter), prepend=True)
    return model
