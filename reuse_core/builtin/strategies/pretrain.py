"""``pretrain``: train a registered backbone from scratch on a dataset or a class subset of it, and
save it to the store as the root of a lineage. With a label budget it is also the from-scratch
baseline a fine-tuned model is measured against."""
from __future__ import annotations

import torch

from reuse_core.builtin.strategies.common import (
    NAME_OPTION, backbone_options, data_options, fit, load_splits, parse_config, save, train_options,
)
from reuse_core.strategy import Strategy, StrategyResult


def run(ctx, options: dict) -> StrategyResult:
    from reuse_core import backbone

    train, val, test = load_splits(options)
    config = {"in_channels": train.in_channels, **parse_config(options["backbone_config"])}
    torch.manual_seed(options["seed"])  # the initial weights follow the seed too
    model = backbone.build(options["backbone"], len(train.classes), **config)
    fitted = fit(ctx, model, train, val, options)
    return save(ctx, model, backbone=options["backbone"], config=config, dataset=options["dataset"],
                classes=train.classes, parents=[], options=options, fitted=fitted, test=test)


PRETRAIN = Strategy(
    name="pretrain",
    description="train a backbone from scratch on a dataset (or some of its classes) and save it to the store",
    options=(*backbone_options(), *data_options(), *train_options(), NAME_OPTION),
    run=run,
)
