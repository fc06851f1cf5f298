"""The building blocks' data handling: dataset settings reach the provider from every way of
running a strategy, and a setting the provider lacks is named with the ones it takes."""
from __future__ import annotations

import pytest

from reuse_core import recipe
from reuse_core import run as reuse_run
from reuse_core.store import ModelStore
from reuse_core.strategy import OptionError
from reuse_core.strategy.blocks import load_splits

from ..data.test_imagefolder import write_images

OPTIONS = {"dataset": "imagefolder", "classes": None, "label_budget": None, "seed": 0, "dataset_config": None}


def test_dataset_config_reaches_the_provider(tmp_path):
    write_images(tmp_path / "images")
    options = {**OPTIONS, "data_root": str(tmp_path / "images"), "dataset_config": ["image_size=6", "grayscale=true"]}
    for split in load_splits(options):
        assert split.input_size == (6, 6) and split.in_channels == 1 and split[0][0].shape == (1, 6, 6)


def test_an_unknown_dataset_setting_names_the_known_ones(tmp_path):
    write_images(tmp_path / "images")
    options = {**OPTIONS, "data_root": str(tmp_path / "images"), "dataset_config": ["imag_size=6"]}
    with pytest.raises(OptionError, match=r"dataset 'imagefolder' has no setting 'imag_size' \(its settings: "
                                          r"image_size, grayscale\)"):
        load_splits(options)
    with pytest.raises(OptionError, match=r"dataset 'digits' has no setting 'seed' \(its settings: none\)"):
        load_splits({**OPTIONS, "dataset": "digits", "data_root": None, "dataset_config": ["seed=3"]})


def test_reuse_run_and_recipes_take_dataset_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "images", per_class=6)
    store = ModelStore(tmp_path / "store")
    common = dict(backbone="mlp", dataset="imagefolder", data_root=str(tmp_path / "images"), epochs=1, quiet=True)
    direct = reuse_run.run("pretrain", store=store, dataset_config=["image_size=5"], **common)
    assert store.manifest(direct.model)["config"] == {"in_channels": 3, "input_size": 5}
    steps = recipe.parse(f'''
[[step]]
name = "small"
strategy = "pretrain"
backbone = "mlp"
dataset = "imagefolder"
data_root = "{tmp_path / "images"}"
dataset_config = ["image_size=4", "grayscale=true"]
epochs = 1
''')
    out = recipe.run(steps, store=store, quiet=True)
    assert store.manifest(out.steps["small"].model)["config"] == {"in_channels": 1, "input_size": 4}
