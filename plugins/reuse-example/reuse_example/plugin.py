"""The reuse-core plugin module: the entry point "example" in group "reuse_core" names it."""
from __future__ import annotations

from reuse_core import hookimpl


@hookimpl
def reuse_register_backbones(registry):
    # Imported here so that listing plugins does not build anything.
    from reuse_example.resnet import TinyResNet

    registry.add(
        "example-resnet", TinyResNet,
        description="a small residual CNN (3 stages, width 16 by default; config width) from reuse-example",
        family="example-resnet", min_input_size=None, fixed_input_size=False,
    )


@hookimpl
def reuse_register_strategies(registry):
    from reuse_example.attention_transfer import ATTENTION_TRANSFER

    registry.add(ATTENTION_TRANSFER.name, ATTENTION_TRANSFER, description=ATTENTION_TRANSFER.description)
