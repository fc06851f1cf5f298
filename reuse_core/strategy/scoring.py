"""Scoring a stored model's weights on the data it was trained on, outside a run: what
``reuse models export --quantize`` measures the accuracy change of a quantisation with, on the
validation split (``reuse demo`` also on the test split)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from reuse_core.store import ModelStore, training_options
from reuse_core.strategy.blocks import class_indices, evaluate, load_dataset
from reuse_core.strategy.context import RunContext


def split_scorer(store: ModelStore, ref: str, *, split: str = "val", device: str | torch.device = "cpu"
                 ) -> tuple[Callable[[dict], float] | None, str]:
    """(a function from a state dict of the stored model ``ref`` to its accuracy on ``split`` of
    the data it was trained with, and what that data is), or (None, why not). The data: the
    model's dataset and classes, with the seed, ``data_root`` and ``dataset_config`` of the run that
    made it (a quantised model's: its source's); a model without a recorded dataset (an imported
    one) or whose data cannot be read here has none."""
    manifest = store.manifest(ref)
    dataset = manifest.get("dataset")
    if not dataset:
        return None, f"model {manifest['id']} records no dataset (it was imported)"
    recorded = training_options(manifest)
    options = {"seed": recorded.get("seed", 0), "data_root": recorded.get("data_root"),
               "dataset_config": recorded.get("dataset_config")}
    try:
        data = load_dataset(dataset, options, split=split, classes=class_indices(dataset, manifest["classes"], options))
    except (ValueError, OSError) as e:  # a dataset this machine does not have, or classes it lacks
        return None, f"the {split} split of {dataset!r} cannot be read here ({e})"
    ctx = RunContext(strategy="export", store=store, hooks=None, run_dir=Path.cwd(), device=torch.device(device))
    model, _ = ctx.load_model(manifest["id"])

    def score(state: dict) -> float:
        model.load_state_dict(state)
        return evaluate(model, data, ctx.device)["accuracy"]

    return score, f"{dataset} {split} split, seed {options['seed']}, {len(data)} examples"
