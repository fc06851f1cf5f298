"""soup end to end on tiny digits: models fine-tuned from one parent, uniform and greedy, and the
refusals of models that do not share a parent or an architecture."""
from __future__ import annotations

import pytest
import torch

from reuse_core import run as reuse_run
from reuse_core.combine import SoupError

FT = dict(classes=["5-9"], epochs=1, label_budget=10, seed=0)


@pytest.fixture(scope="module")
def children(store, teacher, tmp_path_factory):
    """Three fine-tunes of the teacher, one seed (so one head initialisation), three learning rates."""
    return [reuse_run.run("finetune", store=store, run_dir=tmp_path_factory.mktemp(f"ft{i}"), quiet=True,
                          model=teacher.model, lr=lr, **FT)
            for i, lr in enumerate((0.02, 0.05, 0.1))]


@pytest.mark.parametrize("method", ["uniform", "greedy"])
def test_soup_of_fine_tuned_children(store, teacher, children, method):
    ids = [c.model for c in children]
    result = reuse_run.run("soup", store=store, quiet=True, models=ids, method=method)
    m = result.metrics
    manifest = store.manifest(result.model)
    assert m["parent"] == teacher.model
    assert manifest["lineage"]["parents"] == m["chosen"] and manifest["backbone"] == "small-cnn"
    assert manifest["classes"] == ["5", "6", "7", "8", "9"]
    state = store.load(result.model)[0]
    if method == "uniform":
        assert m["chosen"] == ids
        for k, v in state.items():
            if v.is_floating_point():
                torch.testing.assert_close(v, sum(store.load(i)[0][k] for i in ids) / 3)
    else:
        assert m["chosen"][0] == ids[max(range(3), key=lambda i: m["ingredients_val_accuracy"][i])]
        assert m["val_accuracy"] >= max(m["ingredients_val_accuracy"])
        added = [h["model"] for h in m["greedy_history"] if h["added"]]
        assert added == m["chosen"]


def test_refuses_models_without_a_common_parent(store, teacher, children):
    stranger_parent = reuse_run.run("pretrain", store=store, quiet=True, backbone="small-cnn", classes=["0-4"],
                                    epochs=1, label_budget=5)
    stranger = reuse_run.run("finetune", store=store, quiet=True, model=stranger_parent.model, **FT)
    with pytest.raises(SoupError, match="do not share a parent"):
        reuse_run.run("soup", store=store, quiet=True, models=[children[0].model, stranger.model])
    with pytest.raises(SoupError, match="has no parent in its lineage"):
        reuse_run.run("soup", store=store, quiet=True, models=[children[0].model, teacher.model])


def test_refuses_models_of_another_architecture(store, teacher, children):
    # the same parent, fine-tuned to other classes: another head
    other = reuse_run.run("finetune", store=store, quiet=True, model=teacher.model, **dict(FT, classes=["5-7"]))
    with pytest.raises(SoupError, match="one architecture"):
        reuse_run.run("soup", store=store, quiet=True, models=[children[0].model, other.model])
