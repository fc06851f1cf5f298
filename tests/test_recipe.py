"""Recipes: parsing and checking (errors name the step and the key, before anything runs), running
steps that use earlier steps' models by name, resuming an interrupted recipe, overrides."""
from __future__ import annotations

import json

import pytest

from reuse_core import plugins
from reuse_core import recipe as recipes
from reuse_core.recipe import RecipeError
from reuse_core.run import RunError
from reuse_core.store import ModelStore

RECIPE = """\
description = "tiny transfer"

[defaults]
seed = 1
lr = 0.1

[[step]]
name = "teacher"
strategy = "pretrain"
backbone = "small-cnn"
classes = ["0-4"]
label_budget = 10
epochs = 1

[[step]]
name = "transfer"
strategy = "finetune"
model = "teacher"
classes = ["5-9"]
label_budget = 4
epochs = 2
"""


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def test_steps_run_in_order_and_use_earlier_models_by_name(store, tmp_path):
    out = recipes.run(recipes.parse(RECIPE, "tiny.toml"), store=store, quiet=True)
    assert str(out.run_dir).startswith("runs/tiny-")
    teacher, transfer = out.steps["teacher"].model, out.steps["transfer"].model
    assert store.manifest(teacher)["name"] == "tiny.teacher"
    lineage = store.manifest(transfer)["lineage"]
    assert lineage["parents"] == [teacher] and lineage["options"]["model"] == "teacher"
    assert lineage["options"]["seed"] == 1 and lineage["options"]["lr"] == 0.1, "[defaults] reach every step"
    done = json.loads((out.run_dir / "result.json").read_text())
    assert done["steps"]["transfer"]["models"] == [transfer]
    assert (out.run_dir / "steps" / "teacher" / "metrics.jsonl").exists()


def _edit(old: str, new: str) -> str:
    assert old in RECIPE
    return RECIPE.replace(old, new)


@pytest.mark.parametrize(("text", "message"), [
    (_edit("[[step]]\nname = \"transfer\"", "[[step]\nname = \"transfer\""), "bad.toml: not valid TOML"),
    (_edit("description", "descripton"), "bad.toml: unknown top-level key 'descripton'"),
    (_edit('name = "teacher"\n', ""), "bad.toml, step 1: needs a name"),
    (_edit('name = "transfer"', 'name = "teacher"'), "bad.toml, step 'teacher': the name is taken by step 1"),
    (_edit('strategy = "finetune"\n', ""), "bad.toml, step 'transfer': needs a strategy"),
    (_edit('"pretrain"', '"pretrian"'), "bad.toml, step 'teacher': unknown strategy 'pretrian'; did you mean pretrain?"),
    (_edit("epochs = 2", "epoch = 2"), "bad.toml, step 'transfer': unknown option 'epoch'; did you mean epochs?"),
    (_edit("epochs = 2", 'epochs = "many"'), "bad.toml, step 'transfer': option 'epochs': expected an integer, got 'many'"),
    (_edit('model = "teacher"', 'model = "transfer"'),
     "bad.toml, step 'transfer': option 'model': refers to step 'transfer', which does not come before it"),
    (_edit('model = "teacher"', 'model = "teachr"'), "bad.toml, step 'transfer': option 'model': 'teachr' is no earlier step"),
    (_edit("lr = 0.1", "lr = 0.1\ntemprature = 2.0"), "bad.toml, [defaults]: 'temprature' is an option of no step"),
])
def test_bad_recipes_name_the_step_and_key_before_anything_runs(store, tmp_path, text, message):
    with pytest.raises(RecipeError) as e:
        recipes.run(recipes.parse(text, "bad.toml"), store=store, quiet=True)
    assert message in str(e.value)
    assert not (tmp_path / "runs").exists() and store.list() == []


def test_every_problem_is_listed_at_once(store):
    text = _edit("epochs = 1", "epochs = 0").replace("epochs = 2", "epoch = 2")
    with pytest.raises(RecipeError) as e:
        recipes.check(recipes.parse(text, "bad.toml"), store=store)
    assert "step 'teacher': option 'epochs': must be > 0" in str(e.value)
    assert "step 'transfer': unknown option 'epoch'" in str(e.value)


def test_a_missing_file_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="cannot read the recipe"):
        recipes.load(tmp_path / "nope.toml")


class _StopFinetune:
    def reuse_run_start(self, **kw):
        pass

    def reuse_epoch_end(self, *, strategy, epoch, metrics):
        if strategy == "finetune":
            raise KeyboardInterrupt

    def reuse_run_end(self, **kw):
        pass

    def reuse_adjust_loss(self, **kw):
        return None


def test_an_interrupted_recipe_resumes_without_redoing_finished_steps(store, monkeypatch):
    r = recipes.parse(RECIPE, "tiny.toml")
    with monkeypatch.context() as m:
        m.setattr(plugins, "lifecycle_relay", lambda: _StopFinetune())
        with pytest.raises(KeyboardInterrupt) as stopped:
            recipes.run(r, store=store, quiet=True)
    assert len(store.list()) == 1  # the teacher
    with pytest.raises(RunError, match="no unfinished 'tiny' run of this recipe with these values"):
        recipes.run(r.override("epochs", 3), store=store, resume=True, quiet=True)
    with pytest.raises(RecipeError, match="differs from the one"):
        recipes.run(r.override("epochs", 3), store=store, run_dir=stopped.value.run_dir, resume=True, quiet=True)
    out = recipes.run(r, store=store, resume=True, quiet=True)
    assert [m["lineage"]["strategy"] for m in store.list()] == ["pretrain", "finetune"]
    rows = (out.run_dir / "steps" / "transfer" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in rows] == [1, 2]


def test_override_sets_an_option_in_every_step_that_has_it():
    r = recipes.parse(RECIPE, "tiny.toml").override("label-budget", 2)
    assert [s.options["label_budget"] for s in r.steps] == [2, 2]
    with pytest.raises(RecipeError, match="no step has an option 'temperature'"):
        r.override("temperature", 2)


def test_given_models_stand_for_their_steps(store):
    first = recipes.run(recipes.parse(RECIPE, "tiny.toml"), store=store, quiet=True)
    again = recipes.run(recipes.parse(RECIPE, "tiny.toml"), store=store, quiet=True,
                        models={"teacher": first.steps["teacher"].model})
    assert not (again.run_dir / "steps" / "teacher").exists()
    assert store.manifest(again.steps["transfer"].model)["lineage"]["parents"] == [first.steps["teacher"].model]
    with pytest.raises(RecipeError, match="steps it does not have: nope"):
        recipes.run(recipes.parse(RECIPE, "tiny.toml"), store=store, quiet=True, models={"nope": "x"})
