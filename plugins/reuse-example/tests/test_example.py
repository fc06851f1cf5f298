"""The example plugin's own tests: it registers through reuse-core's plugin manager and its
backbone meets the contract (head swap, freezing) and trains."""
from __future__ import annotations

import torch

from reuse_core import backbone
from reuse_core.plugins import BUILTIN_PLUGINS, ReusePluginManager
from reuse_example.resnet import TinyResNet


def manager() -> ReusePluginManager:
    # Load the plugin module directly, so these tests also run from a source checkout.
    return ReusePluginManager(autoload=False, strict=True).load(BUILTIN_PLUGINS + ("reuse_example.plugin",))


def test_registers_its_backbone():
    entry = manager().backbones.entry("example-resnet")
    assert entry.plugin == "reuse_example.plugin" and entry.meta["family"] == "example-resnet"


def test_meets_the_backbone_contract():
    model = manager().backbones.get("example-resnet")(num_classes=4, in_channels=1, width=8)
    backbone.check_backbone(model, "example-resnet")
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    backbone.replace_head(model, 7)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    backbone.freeze_features(model, trainable_last_blocks=1)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"stage3", "fc"}


def test_trains():
    torch.manual_seed(0)
    model = TinyResNet(num_classes=3, in_channels=1, width=8)
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 3
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
