"""The built-in strategies, registered as a plugin exactly as a third-party one would be."""
from __future__ import annotations

from reuse_core import hookimpl
from reuse_core.builtin.strategies.cascade import CASCADE
from reuse_core.builtin.strategies.distill import DISTILL
from reuse_core.builtin.strategies.ensemble import ENSEMBLE
from reuse_core.builtin.strategies.finetune import FINETUNE
from reuse_core.builtin.strategies.merge import MERGE
from reuse_core.builtin.strategies.pretrain import PRETRAIN
from reuse_core.builtin.strategies.selfsup import SELFSUP
from reuse_core.builtin.strategies.soup import SOUP
from reuse_core.builtin.strategies.transfer_curve import TRANSFER_CURVE

STRATEGIES = (PRETRAIN, SELFSUP, FINETUNE, DISTILL, ENSEMBLE, CASCADE, SOUP, MERGE, TRANSFER_CURVE)


@hookimpl
def reuse_register_strategies(registry) -> None:
    for s in STRATEGIES:
        registry.add(s.name, s, description=s.description)
