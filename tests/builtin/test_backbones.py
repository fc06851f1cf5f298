"""Built-in backbones: the small ones, and one real model of every torchvision family, built
without weights, adapted to other class counts and channels, meeting the backbone contract."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models

from reuse_core import backbone, plugins
from reuse_core.backbone import BackboneError
from reuse_core.builtin.backbones import FIXED_INPUT_SIZE, MIN_INPUT_SIZE
from reuse_core.builtin.torchvision_models import FAMILIES, MODELS

# The smallest model of each torchvision family (families = torchvision's model modules).
REPRESENTATIVES = {
    "alexnet": "alexnet", "convnext": "convnext_tiny", "densenet": "densenet121", "efficientnet": "efficientnet_b0",
    "googlenet": "googlenet", "inception": "inception_v3", "maxvit": "maxvit_t", "mnasnet": "mnasnet0_5",
    "mobilenetv2": "mobilenet_v2", "mobilenetv3": "mobilenet_v3_small", "regnet": "regnet_x_400mf",
    "resnet": "resnet18", "shufflenetv2": "shufflenet_v2_x0_5", "squeezenet": "squeezenet1_1",
    "swin_transformer": "swin_t", "vgg": "vgg11", "vision_transformer": "vit_b_32",
}


def check_contract(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    """Forward, swap the head, freeze all but the last block: what fine-tuning will do."""
    backbone.check_backbone(model)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (len(x), num_classes)
    old_head = backbone.get_head(model)
    new_head = backbone.replace_head(model, num_classes + 2)
    assert backbone.get_head(model) is new_head and new_head is not old_head
    assert new_head.weight.shape[:2] == (num_classes + 2, old_head.weight.shape[1])  # Linear or 1x1 Conv2d
    backbone.freeze_features(model, trainable_last_blocks=1)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    expected = {id(p) for p in [*backbone.head_parameters(model), *backbone.feature_blocks(model)[-1].parameters()]}
    assert trainable == expected


def test_every_torchvision_classification_model_is_registered():
    reg = plugins.backbones()
    names = models.list_models(module=models)
    assert set(names) <= set(reg.names())
    families = {reg.entry(n).meta["family"] for n in names}
    assert families == set(REPRESENTATIVES)
    for n in names:
        meta = reg.entry(n).meta
        assert reg.entry(n).plugin == "reuse_core.builtin.backbones"
        assert meta["min_input_size"] is None or meta["min_input_size"] > 1
    assert reg.entry("inception_v3").meta["min_input_size"] == 75
    assert reg.entry("resnet50").meta["min_input_size"] is None
    assert reg.entry("vit_b_16").meta == {"family": "vision_transformer", "min_input_size": 224, "fixed_input_size": True}


def test_the_torchvision_table_is_the_installed_torchvision():
    """The table registration reads (so as not to import torchvision) against torchvision itself:
    a torchvision that adds, removes or moves a model fails here; update the table then."""
    names = models.list_models(module=models)
    assert list(MODELS) == names
    assert sum(len(v) for v in FAMILIES.values()) == len(MODELS)  # no model listed twice
    reg = plugins.backbones()
    for n in names:
        family = models.get_model_builder(n).__module__.rsplit(".", 1)[1]
        assert MODELS[n] == family, n
        fixed = family in FIXED_INPUT_SIZE
        description = f"torchvision {n}, untrained (weights=None)" + (
            "; inputs exactly image_size x image_size (config image_size, default 224)" if fixed else "")
        assert reg.entry(n).description == description
        assert reg.entry(n).meta == {"family": family, "min_input_size": 224 if fixed else MIN_INPUT_SIZE.get(family),
                                     "fixed_input_size": fixed}


@pytest.mark.parametrize("family", sorted(REPRESENTATIVES))
def test_one_model_of_each_torchvision_family(family):
    name = REPRESENTATIVES[family]
    meta = plugins.backbones().entry(name).meta
    config = {"image_size": 32} if family == "vision_transformer" else {}
    model = backbone.build(name, num_classes=5, in_channels=1, **config)
    size = 32 if family == "vision_transformer" else max(32, meta["min_input_size"] or 0)
    check_contract(model, torch.randn(1, 1, size, size), 5)  # eval mode: batch 1 is enough
    if meta["min_input_size"] and not meta["fixed_input_size"]:
        small = meta["min_input_size"] - 1
        with pytest.raises(BackboneError, match=rf"backbone '{name}' needs inputs of at least {small + 1}x{small + 1} pixels, got {small}x{small}; resize"):
            model(torch.randn(1, 1, small, small))
    if meta["fixed_input_size"]:
        with pytest.raises(BackboneError, match=rf"backbone '{name}' was built for {size}x{size} inputs, got 48x48; build it with image_size="):
            model(torch.randn(1, 1, 48, 48))


def test_seed_cnn_is_the_reference_architecture():
    model = backbone.build("seed-cnn", num_classes=10)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(64, 3, 3, 3), (64,), (128, 64, 3, 3), (128,), (1024, 128 * 8 * 8), (1024,), (10, 1024), (10,)]
    check_contract(model, torch.randn(3, 3, 32, 32), 10)
    with pytest.raises(BackboneError, match="backbone 'seed-cnn' was built for 32x32 inputs, got 28x28; build it with input_size=<H>"):
        model(torch.randn(1, 3, 28, 28))
    small = backbone.build("seed-cnn", num_classes=4, in_channels=1, input_size=8)
    check_contract(small, torch.randn(2, 1, 8, 8), 4)
    with pytest.raises(BackboneError, match="seed-cnn needs input_size to be a multiple of 4"):
        backbone.build("seed-cnn", 10, input_size=30)


def test_small_models_for_tiny_inputs():
    check_contract(backbone.build("small-cnn", 10, in_channels=1), torch.randn(4, 1, 8, 8), 10)
    check_contract(backbone.build("mlp", 10, in_channels=1, input_size=8), torch.randn(4, 1, 8, 8), 10)
    flat = backbone.build("mlp", 3, in_channels=20, input_size=1, hidden=(16,))
    check_contract(flat, torch.randn(5, 20), 3)
    with pytest.raises(BackboneError, match="mlp was built for 20 input values per sample"):
        flat(torch.randn(5, 21))


def test_contract_errors_say_what_is_missing():
    plain = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(BackboneError, match="Sequential has no head_name: a backbone must set model.head_name"):
        backbone.check_backbone(plain)
    plain.head_name = "0"
    with pytest.raises(BackboneError, match="has no block_names: a backbone must set model.block_names to a non-empty tuple"):
        backbone.check_backbone(plain)
    plain.block_names = ("1",)
    with pytest.raises(BackboneError, match="block_names names a missing submodule"):
        backbone.check_backbone(plain)
    plain.block_names, plain.head_name = ("0",), "0"
    with pytest.raises(BackboneError, match="block '0' contains the head '0'"):
        backbone.check_backbone(plain, "mine")
    with pytest.raises(BackboneError, match="backbone 'x' must be a torch.nn.Module, got int"):
        backbone.check_backbone(3, "x")
    model = backbone.build("small-cnn", 2)
    with pytest.raises(ValueError, match="trainable_last_blocks must be between 0 and 3"):
        backbone.freeze_features(model, 4)
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        backbone.build("small-cnn", 0)
