"""The example plugin's strategy, attention transfer, registered through the plugin's hook and run
end to end through reuse-core's run layer and engine on tiny digits."""
from __future__ import annotations

import pytest
import torch

import reuse_core
from reuse_core import plugins
from reuse_core.plugins import BUILTIN_PLUGINS, ReusePluginManager
from reuse_core.store import ModelStore
from reuse_example.attention_transfer import attention_loss, attention_map


@pytest.fixture(scope="module")
def manager() -> ReusePluginManager:
    # Load the plugin module directly, so these tests also run from a source checkout.
    return ReusePluginManager(autoload=False, strict=True).load(BUILTIN_PLUGINS + ("reuse_example.plugin",))


@pytest.fixture(autouse=True)
def example_plugin(manager, monkeypatch, tmp_path):
    """reuse_core.run finds its strategies through this manager; runs/ lands in the test's folder."""
    monkeypatch.setattr(plugins, "get_plugin_manager", lambda: manager)
    monkeypatch.chdir(tmp_path)
    return manager


def test_attention_maps_are_normalised_channel_energy():
    a = torch.randn(2, 3, 4, 4)
    assert torch.allclose(attention_map(a), (a ** 2).sum(1))
    assert attention_loss(a, 5 * a) == pytest.approx(0.0, abs=1e-6), "the maps are normalised: scale does not matter"
    assert attention_loss(a, torch.randn(2, 7, 2, 2)) > 0, "other channel counts and sizes are pooled to match"


def test_attention_transfer_runs_end_to_end_through_the_engine(example_plugin, tmp_path):
    assert example_plugin.strategies.entry("attention-transfer").plugin == "reuse_example.plugin"
    store = ModelStore(tmp_path / "store")
    teacher = reuse_core.run("pretrain", store=store, quiet=True, backbone="small-cnn", classes=["0-2"],
                             label_budget=20, epochs=1, lr=0.1)
    result = reuse_core.run("attention-transfer", store=store, quiet=True, teacher=teacher.model,
                            student_backbone="example-resnet", student_backbone_config=["width=4"],
                            label_budget=10, epochs=2, lr=0.1)
    manifest = store.manifest(result.model)
    assert manifest["backbone"] == "example-resnet" and manifest["classes"] == ["0", "1", "2"]
    assert manifest["lineage"]["parents"] == [teacher.model]
    assert manifest["lineage"]["strategy"] == "attention-transfer"
    # the last two spatial blocks of each (small-cnn's third block, fc, is not spatial)
    assert manifest["lineage"]["options"]["pairs"] == ["conv1:stage2", "conv2:stage3"]
    assert result.metrics["epochs"] == 2 and (tmp_path / result.run_dir / "metrics.jsonl").exists()


def test_unknown_blocks_are_named(tmp_path):
    from reuse_core.strategy import OptionError

    store = ModelStore(tmp_path / "store")
    teacher = reuse_core.run("pretrain", store=store, quiet=True, backbone="small-cnn", classes=["0-1"],
                             label_budget=5, epochs=1)
    with pytest.raises(OptionError, match="the student has no block 'stage9'"):
        reuse_core.run("attention-transfer", store=store, quiet=True, teacher=teacher.model,
                       student_backbone="example-resnet", pairs=["conv2:stage9"], epochs=1)
