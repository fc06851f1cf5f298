"""The built-in vit-tiny backbone (reuse_core/builtin/attention_backbone.py), built on the fused
attention layer: any image size and channel count, the backbone contract, attention maps."""
from __future__ import annotations

import pytest
import torch

from reuse_core import backbone, plugins
from reuse_core.backbone import check_backbone, feature_blocks, replace_head
from reuse_core.builtin.attention_backbone import VisionTransformer, choose_patch_size, vit_tiny

from ..conftest import dispatched, randn


@pytest.mark.parametrize("channels,size", [(1, (8, 8)), (3, (32, 32)), (5, (13, 21)), (2, (1, 1))])
def test_vit_any_size_and_channels(channels, size, gen):
    model = vit_tiny(7, channels, image_size=size, dim=32, depth=2, heads=4)
    check_backbone(model)
    assert model.patch_size == choose_patch_size(size)
    x = randn((2, channels) + size, gen)
    with dispatched("attention", "attention_backward"):
        y = model(x)
        y.sum().backward()
    assert y.shape == (2, 7)
    assert all(p.grad is not None for p in model.parameters())
    # sizes other than the one the patch was chosen for work too (edge patches zero-padded)
    assert model(randn((1, channels, size[0] + 3, size[1] + 5), gen)).shape == (1, 7)


def test_vit_head_and_blocks():
    model = vit_tiny(10, 3, depth=3)
    assert model.head_name == "head" and model.block_names == ("patch", "blocks.0", "blocks.1", "blocks.2")
    assert len(feature_blocks(model)) == len(model.block_names)
    head = replace_head(model, 4)
    assert model.head is head and head.out_features == 4
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 4)


def test_vit_registered_and_fine_tunable():
    entry = plugins.backbones().entry("vit-tiny")
    assert entry.plugin == "reuse_core.builtin.backbones" and entry.meta["family"] == "vit"
    model = backbone.build("vit-tiny", num_classes=5, in_channels=1, image_size=8)
    backbone.freeze_features(model, trainable_last_blocks=1)
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks.") else "")
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head", f"blocks.{len(model.blocks) - 1}"}


def test_vit_attention_maps(gen):
    model = vit_tiny(3, 1, image_size=8, dim=16, depth=2, heads=2).eval()
    x = randn((2, 1, 8, 8), gen)
    maps = model.attention_maps(x)
    L = 1 + 8 * 8  # class token + an 8 x 8 grid of 1 x 1 patches
    assert [m.shape for m in maps] == [(2, 2, L, L)] * 2
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 2, L))
    # the slower path that forms the maps computes what the fused forward computes
    h = model.tokens(x)
    for blk in model.blocks:
        h, _ = blk(h, need_weights=True)
    torch.testing.assert_close(model.head(model.norm(h[:, 0])), model(x), rtol=1e-5, atol=1e-5)


def test_vit_bad_config():
    with pytest.raises(ValueError, match="multiple of heads"):
        VisionTransformer(3, dim=30, heads=4)
    with pytest.raises(ValueError, match=r"images \(B, C, H, W\)"):
        vit_tiny(3, 1)(torch.randn(2, 8))
